"""Golden keys: the names and keys under which a fixed corpus's chunks and folder listings are
kept, pinned as literal values.

The literals below were captured once from the code as it was (commit e7823ad) and are meant
to stay. A chunk is reused only while the key it records equals the key the code computes
now, and it is found only under the name the code computes now; so a value changing here means
every user's chunk cache (or kept folder listing) is silently decoded (listed) again on their
next run. A refactor must leave every value as it is. Changing one is legitimate only as a
deliberate change of what a chunk means (new decode settings, another digest): then update the
value in the same commit and say so in its message, since every cache will be rebuilt.

The corpus is built so that no library version moves it: PNGs assembled byte by byte (stored
deflate blocks, so no zlib version changes a byte), a tar with every header field fixed, IDX
files from the format's definition, every file's mtime set to a fixed nanosecond value. The
Parquet files are checked in (tests/golden/*.parquet) rather than written here: a key hashes the
container's size, and pyarrow's writer (its `created_by` string, its defaults) changes that
size from one version to the next; the test checks that they hold the corpus's PNGs.

The calls that compute a key live in the helpers at the top, one per kind, so that moving the
modules (mnist37.sources) changes a few lines there and none of the pinned values.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from mnist37.config import load

GOLDEN = Path(__file__).resolve().parent / "golden"
SHAPE = (6, 8)  # not square: a key that swapped height and width would change
SHARD_SIZE = 4  # train: 5 + 4 images, so one shard spans both class folders
COUNTS = {"train": {"3": 5, "7": 4}, "valid": {"3": 2, "7": 3}}
MTIME_NS = 1_600_000_000_123_456_789  # the first file's; each next file's is 1_000_000_007 ns later
CHANGED = "a pinned key changed: every user's chunk cache decodes again (see the module doc)"


# ---------------------------------------------------------------------------------------------
# The calls under test, one helper per kind: a module move changes these lines only.


def decode_settings(convert: bool) -> str:
    from mnist37.png import decode_settings as settings

    return settings(convert)


def planned(data: Path, chunk_dir: Path):
    """The in-process plan (no Ray): located, then listed and cut into shards here."""
    from mnist37.locate import locate
    from mnist37.plan import plan

    return plan(locate(load(data=str(data), classes="3 7", shard_size=SHARD_SIZE, chunk_dir=str(chunk_dir))))


def folder_files_key(root: Path, shard, convert: bool) -> str:
    from mnist37.images import Decoding
    from mnist37.sources.folder import groups_key

    return groups_key(root, shard.groups(), Decoding(SHAPE, convert).settings)


def folder_listed_files_key(shard, stamps: np.ndarray, convert: bool) -> str:
    from mnist37.images import Decoding
    from mnist37.sources.folder import groups_key

    return groups_key("unused: the stamps stand in for a stat", shard.groups(), Decoding(SHAPE, convert).settings,
                      stamps)


def container_key(shard, root: Path, convert: bool) -> str:
    from mnist37.images import Decoding

    return shard.key(root, Decoding(SHAPE, convert))


def chunk_name(chunk_dir: Path, shard) -> str:
    from mnist37.shards import chunk_path

    return Path(chunk_path(chunk_dir, shard)).relative_to(chunk_dir).as_posix()


def decoded(plan, shard):
    """(DecodedShard, the reuse record its chunk holds), decoded in this process."""
    from mnist37.chunks import read_chunk_metadata
    from mnist37.shards import decode_shard

    done = decode_shard(shard, plan.root, plan.chunk_dir, plan.decoding, with_sums=True)
    return done, read_chunk_metadata(done.chunk_path)


def kept_listing_names(root: Path, split: str, class_name: str, reuse_dir: Path, monkeypatch) -> list[str]:
    """The files a listing of `root/split/class_name` keeps in `reuse_dir`. A listing is kept
    only once its folder has settled (folder.SETTLED_S); this one was just written, so the
    wait is patched away rather than slept through."""
    from mnist37.sources import folder

    monkeypatch.setattr(folder, "SETTLED_S", float("-inf"))
    folder.list_class_folder(root, split, class_name, reuse_dir)
    return sorted(os.listdir(reuse_dir))


# ---------------------------------------------------------------------------------------------
# The corpus


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of uint8 [H, W] `pixels`, its image data in stored (uncompressed)
    deflate blocks: the same bytes whatever zlib or Pillow is installed."""
    h, w = pixels.shape
    raw = b"".join(b"\0" + row.tobytes() for row in pixels)  # filter type 0 per row
    assert len(raw) < 65536  # one stored block
    stream = (b"\x78\x01" + b"\x01" + struct.pack("<HH", len(raw), len(raw) ^ 0xFFFF) + raw
              + struct.pack(">I", zlib.adler32(raw)))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", stream) + chunk(b"IEND", b""))


def corpus() -> dict[str, list[tuple[str, str, bytes]]]:
    """split -> [(class, file name, PNG bytes)], in listing order."""
    rng = np.random.default_rng(37)
    return {split: [(c, f"{i}.png", png_bytes(rng.integers(0, 256, SHAPE, dtype=np.uint8)))
                    for c, n in classes.items() for i in range(n)]
            for split, classes in COUNTS.items()}


class Clock:
    """Fixed modification times, handed out in order."""

    def __init__(self):
        self.next = MTIME_NS

    def stamp(self, path: Path) -> None:
        os.utime(path, ns=(self.next, self.next))
        self.next += 1_000_000_007


def write_folder(root: Path, clock: Clock) -> Path:
    for split, images in corpus().items():
        for c, name, data in images:
            path = root / split / c / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            clock.stamp(path)
    return root


def write_tar(root: Path, clock: Clock) -> Path:
    """WebDataset shards, one per split: <key>.png and <key>.cls (the class index), every
    header field fixed; classes.txt names the classes."""
    root.mkdir(parents=True)
    for split, images in corpus().items():
        with tarfile.open(root / f"{split}-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (c, _, data) in enumerate(images):
                for ext, content in (("png", data), ("cls", str(list(COUNTS[split]).index(c)).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size, info.mtime, info.mode = len(content), 1_600_000_000, 0o644
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(content))
        clock.stamp(root / f"{split}-000000.tar")
    (root / "classes.txt").write_text("3\n7\n")
    clock.stamp(root / "classes.txt")
    return root


def write_idx(root: Path, clock: Clock) -> Path:
    """MNIST's IDX pair per split, from the format's definition; labels are the class values."""
    from PIL import Image

    root.mkdir(parents=True)
    for split, images in corpus().items():
        pixels = np.stack([np.array(Image.open(io.BytesIO(data))) for _, _, data in images])
        labels = np.array([int(c) for c, _, _ in images], dtype=np.uint8)
        files = {
            f"{split}-images-idx3-ubyte": b"\0\0\x08\x03" + struct.pack(">III", len(pixels), *SHAPE) + pixels.tobytes(),
            f"{split}-labels-idx1-ubyte": b"\0\0\x08\x01" + struct.pack(">I", len(labels)) + labels.tobytes()}
        for name, data in files.items():
            (root / name).write_bytes(data)
            clock.stamp(root / name)
    return root


def write_parquet(root: Path, clock: Clock) -> Path:
    """The checked-in Parquet files (see the module doc), checked to hold the corpus: an image
    column of {bytes, path} structs, the label as the class value, three rows a row group."""
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    for split, images in corpus().items():
        shutil.copyfile(GOLDEN / f"{split}.parquet", root / f"{split}.parquet")
        clock.stamp(root / f"{split}.parquet")
        table = pq.read_table(root / f"{split}.parquet")
        assert [r["bytes"] for r in table.column("image").to_pylist()] == [data for *_, data in images]
        assert table.column("label").to_pylist() == [int(c) for c, *_ in images]
    return root


@pytest.fixture
def corpus_dir(tmp_path) -> dict[str, Path]:
    clock = Clock()  # one sequence, in this order: every file's mtime is fixed
    return {"folder": write_folder(tmp_path / "folder", clock), "parquet": write_parquet(tmp_path / "parquet", clock),
            "webdataset": write_tar(tmp_path / "webdataset", clock), "idx": write_idx(tmp_path / "idx", clock)}


# ---------------------------------------------------------------------------------------------
# The pinned values


def test_decode_settings():
    assert decode_settings(False) == "grayscale-8bit/v2/reject-non-grayscale"
    assert decode_settings(True) == "grayscale-8bit/v2/convert-non-grayscale"


# Folder shards, by chunk file name (a renamed chunk is not found: every shard decodes again) ->
#   files key, reject policy: what a local chunk records and is reused by (names, sizes, mtimes
#     and decode settings; a change re-decodes every folder chunk);
#   files key, convert policy: the same under non_grayscale = "convert";
#   files key from the listed stamps below: what chunks of objects in a store are reused by;
#   content digest of the shard's files: summed into results.json's data fingerprint, so a
#     change there changes every run's fingerprint.
FOLDER_KEYS = {
    "train/train-4-000000.arrow": (
        "0b79de3de2c3d3a35f29171c2b86b2a8", "584c5758ea3957f2a064e5566a674f63",
        "20dc8697c998edd80064a79dc2bf5b35", "9339dff9c610418f69413436a3f3549b"),
    "train/train-4-000001.arrow": (
        "b2b370e53d1f403863c14361d68984df", "95ada0d2bc6cefdba9545060f113a69f",
        "037eaf7cfbe411e5c4f4135f11952c32", "bafb722ac1338a4d8292ed8ecf48bf17"),
    "train/train-4-000002.arrow": (
        "b98e29e422df604bab48016bab5548c3", "6464d0c89b37d7e760e8bf681256add6",
        "92281dcad60adc1fe54ded8d1b75471a", "804f82e8d730cb13b2b19c3bd508b7a2"),
    "valid/valid-4-000000.arrow": (
        "b206891aac55aca863dc836098d801a4", "f2cdea62447e0e85eecc1c847e0c492e",
        "c5115d48f55286b08ff7b18b7020f3b2", "23f7fbd373821ee63eae6d0c52d5c9ba"),
    "valid/valid-4-000001.arrow": (
        "ec64e4db2ba41fdc97751ffab5b035ca", "621750bc14c054d4b1840f79db5c3170",
        "ce3162a12e7d48d3794a99107fac3410", "a3285303e617b77e7cdad4585588c2a6"),
}


def listed_stamps(n: int, offset: int) -> np.ndarray:
    """int64 [n, 2]: (size, mtime ns) as an object store's listing might give them."""
    i = np.arange(offset, offset + n, dtype=np.int64)
    return np.stack([100 + i, 1_700_000_000_000_000_000 + 999 * i], axis=1)


def test_folder_keys(corpus_dir, tmp_path):
    root = corpus_dir["folder"]
    plan = planned(root, tmp_path / "chunks")
    assert plan.format == "folder" and plan.shape == SHAPE
    got, seen = {}, 0
    for shard in plan.shards:
        done, record = decoded(plan, shard)
        key = folder_files_key(root, shard, False)
        assert record["files_key"] == key  # what the chunk records is what a later run computes
        # Local files and listed objects share one key scheme: the stat'ed (size, mtime)
        # given as listed stamps make the same key.
        stats = [os.stat(root / p) for p in shard.paths]
        assert folder_listed_files_key(shard, np.array([(s.st_size, s.st_mtime_ns) for s in stats]), False) == key
        got[chunk_name(tmp_path / "chunks", shard)] = (
            key, folder_files_key(root, shard, True),
            folder_listed_files_key(shard, listed_stamps(len(shard), seen), False), done.digest)
        seen += len(shard)
    assert got == FOLDER_KEYS, CHANGED


# Container shards: format -> chunk file name -> (key under the reject policy, key under the
# convert policy, shard digest), as for folders: the key is what a container chunk is reused
# by (the container's path, size and mtime, the shard's range, columns, class map, shape,
# decode settings and digest scheme); the digest goes into the data fingerprint.
CONTAINER_KEYS = {
    "parquet": {
        "train/train-parquet-4-000000.arrow": (
            "4919f64562452a2cebb538118e9f9e92", "3b2c7260242739d80c70fd8c789882d8",
            "0e05afbe8f18b965513faceaabd0c4f9"),
        "train/train-parquet-4-000001.arrow": (
            "dc4e6d7f01de3c0d208508b984a299d3", "f284a83c11652978260dc034ae9e51b0",
            "763b949d58e7df7e8e4b471dc4f3a370"),
        "valid/valid-parquet-4-000000.arrow": (
            "7cdcff150781cab10adef422828f8300", "95940a7b91d8f4ff01296f80e8081241",
            "02372da76fe83bc697ae8c26828dbcc8"),
    },
    "webdataset": {
        "train/train-webdataset-4-000000.arrow": (
            "73c7f6c72a9aaff662602953344d5fcf", "1a59603fd9ca49d559bb6f1f87aa2d97",
            "5bc004131adb030638cdcb6ff72709d5"),
        "valid/valid-webdataset-4-000000.arrow": (
            "c6ab56d319f084554238c7610a9139c2", "2a753f8a70b9e7486e1b090dfb1cd3e8",
            "ed1efc1e4e4b6cb916889d54b1380b05"),
    },
    "idx": {
        "train/train-idx-4-000000.arrow": (
            "bae369314421b77bcd79d1e0bffe8be4", "35a34f769203ec7bd956250020a09666",
            "fdee066d8d45de160c42005fe55f2a94"),
        "train/train-idx-4-000001.arrow": (
            "daeeaf098717827e0d388bcc65ec1527", "a39c12c16ca3c27c1c51f6fa13913bcd",
            "cf961ea542f8410f9bb209f0af5b2972"),
        "train/train-idx-4-000002.arrow": (
            "a8e850e54be0a15d3d9ccbf79887b6f6", "ac0901aeb833895fa228fe3b917397db",
            "7db1a6a965ce0be3a928afc32b6b0883"),
        "valid/valid-idx-4-000000.arrow": (
            "2fba63ffda84366411c5871a2b9f4a27", "9328982cf58c9dd787acac161a8dceb8",
            "45945f5ce9abe30f75b909bd73fe7aa2"),
        "valid/valid-idx-4-000001.arrow": (
            "db32a46364bee5fe12acbbfacbff03b4", "aa492a79cc409d53ae50fdc17cd596bf",
            "ce829fd220433ddd2778a6ef19de0229"),
    },
}


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "idx"])
def test_container_keys(corpus_dir, tmp_path, fmt):
    root = corpus_dir[fmt]
    plan = planned(root, tmp_path / "chunks")
    assert plan.format == fmt and plan.shape == SHAPE
    got = {}
    for shard in plan.shards:
        done, record = decoded(plan, shard)
        key = container_key(shard, plan.root, False)
        assert record["files_key"] == key
        got[chunk_name(tmp_path / "chunks", shard)] = (key, container_key(shard, plan.root, True), done.digest)
    assert got == CONTAINER_KEYS[fmt], CHANGED


def test_kept_listing_name(corpus_dir, tmp_path, monkeypatch):
    """A kept listing is named by a hash of its folder's path as given. The root is given
    relative to the working folder, so the path hashed (b"folder/train/3") is the same
    wherever tmp_path is; the job's roots are absolute, named by the same hash."""
    monkeypatch.chdir(tmp_path)
    names = kept_listing_names(Path("folder"), "train", "3", tmp_path / "listings", monkeypatch)
    assert names == ["1f949ca7ba82a0d362e179e8.npz"]  # blake2b(b"folder/train/3", digest_size=12)


# Chunks that mnist37 wrote before a chunk kept pixel sums only for the classes it holds
# (commit 0af93a2, by `decoded` above, from the folder corpus): their footers hold a row of
# sums for every class, zeros for a class without images. They are checked in as written
# then, and must be reused as they are, with the sums a fresh decode gives.
OLD_CHUNKS = GOLDEN / "chunks-0af93a2"


def test_chunks_with_sums_for_every_class_are_still_reused(corpus_dir, tmp_path):
    from mnist37.chunks import read_chunk_metadata

    root = corpus_dir["folder"]
    shutil.copytree(OLD_CHUNKS, tmp_path / "old")
    old = planned(root, tmp_path / "old")
    fresh = planned(root, tmp_path / "fresh")
    train = [s for s in old.shards if s.split == "train"]
    assert [chunk_name(tmp_path / "old", s) for s in train] == sorted(
        p.relative_to(OLD_CHUNKS).as_posix() for p in OLD_CHUNKS.rglob("*.arrow"))
    held = []
    for shard in train:
        path = tmp_path / "old" / chunk_name(tmp_path / "old", shard)
        raw = read_raw_sums(path)
        assert len(raw) == 2 * 8 * SHAPE[0] * SHAPE[1]  # a row for each of the 2 classes
        before = path.read_bytes()
        reused = decode_shard_here(old, shard)
        assert reused.reused and reused.discarded == "", reused.discarded
        assert path.read_bytes() == before  # reused as it is, not written again
        new = decode_shard_here(fresh, shard)
        assert not new.reused
        assert reused.pixel_sums.classes.tolist() == new.pixel_sums.classes.tolist()
        np.testing.assert_array_equal(reused.pixel_sums.sums, new.pixel_sums.sums)
        np.testing.assert_array_equal(reused.pixel_sums.counts, new.pixel_sums.counts)
        assert (reused.counts.tolist(), reused.digest) == (new.counts.tolist(), new.digest)
        assert read_chunk_metadata(new.chunk_path)["pixel_sums"].classes.tolist() == new.pixel_sums.classes.tolist()
        assert len(read_raw_sums(Path(new.chunk_path))) == len(new.pixel_sums.classes) * 2 * SHAPE[0] * SHAPE[1]  # uint16
        held.append(new.pixel_sums.classes.tolist())
    assert held == [[0], [0, 1], [1]]  # the first and last shard hold one class each: one row of sums


def read_raw_sums(path: Path) -> bytes:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).schema.metadata[b"mnist37.pixel_sums"]


def decode_shard_here(plan, shard):
    from mnist37.shards import decode_shard

    return decode_shard(shard, plan.root, plan.chunk_dir, plan.decoding, with_sums=True)
