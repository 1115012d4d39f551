import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist37.chunks import read_chunk, read_chunk_metadata
from mnist37.images import Decoding
from mnist37.sources.folder import list_split, make_shards
from mnist37.prototypes import pixel_sums
from mnist37.shards import chunk_path, decode_shard
from tests.conftest import PROJECT_ROOT, decode_files, make_image_folder, write_png


def shards_of(folder, split="train", size=50):
    return make_shards(list_split(folder, split, ["3", "7"]), size)


def assert_same_sums(a, b):
    assert a.classes.tolist() == b.classes.tolist() and a.counts.tolist() == b.counts.tolist()
    np.testing.assert_array_equal(a.sums, b.sums)


@pytest.mark.parametrize("shard_size, expected_sizes", [(128, [128]), (19, [19] * 6 + [14]), (2, [2] * 64), (500, [128])])
def test_shards_cover_every_sample_once_in_order(image_folder, shard_size, expected_sizes):
    listing = list_split(image_folder, "train", ["3", "7"])
    shards = make_shards(listing, shard_size)
    assert [len(s) for s in shards] == expected_sizes
    assert [s.index for s in shards] == list(range(len(shards)))
    assert [p for s in shards for p in s.paths] == listing.paths()
    assert [c for s in shards for c in s.class_indices.tolist()] == listing.class_indices.tolist()


def test_groups_split_a_shard_at_class_folders(image_folder):
    shard = shards_of(image_folder)[1]  # images 50..99: 14 threes, then 36 sevens
    groups = shard.groups()
    assert [(folder, len(names)) for folder, names in groups] == [("train/3", 14), ("train/7", 36)]
    assert [f"{folder}/{os.fsdecode(n)}" for folder, names in groups for n in names] == shard.paths


def test_decode_shard_writes_its_chunk_and_sums(image_folder, tmp_path):
    shard = shards_of(image_folder)[1]
    done = decode_shard(shard, image_folder, tmp_path / "chunks", Decoding((8, 8)), with_sums=True)
    assert done.chunk_path == str(chunk_path(tmp_path / "chunks", shard)) == str(tmp_path / "chunks/train/train-50-000001.arrow")
    chunk = read_chunk(done.chunk_path)
    expected = decode_files(image_folder, shard.paths, (8, 8))
    np.testing.assert_array_equal(chunk.images, expected.images)
    assert chunk.paths == shard.paths and chunk.class_indices.tolist() == shard.class_indices.tolist()
    assert done.digest == expected.digest and done.num_images == 50 and not done.reused
    sums = pixel_sums(expected.images, shard.class_indices)
    assert_same_sums(done.pixel_sums, sums)
    assert done.counts.tolist() == sums.per_class(2).tolist() == [14, 36]
    assert done.peak_rss_bytes > 10 * 2**20


def test_a_shard_of_3_of_1000_classes_returns_and_keeps_3_rows_of_sums(tmp_path):
    """Sums (in the task's result and in the chunk's footer) grow with the classes a shard
    holds, not with the data set's: 3 rows here, where there were 1,000."""
    import pickle

    classes = [f"c{i:04d}" for i in range(1000)]
    rng = np.random.default_rng(5)
    for name in classes:
        write_png(tmp_path / "data" / "train" / name / "0.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    shards = make_shards(list_split(tmp_path / "data", "train", classes), 3)
    shard = shards[300]  # images 900..902, one per class
    done = decode_shard(shard, tmp_path / "data", tmp_path / "chunks", Decoding((8, 8)), with_sums=True)
    assert done.pixel_sums.classes.tolist() == [900, 901, 902]
    assert done.pixel_sums.sums.shape == (3, 8, 8) and done.pixel_sums.counts.tolist() == [1, 1, 1]
    assert done.counts.shape == (1000,) and np.flatnonzero(done.counts).tolist() == [900, 901, 902]
    expected = decode_files(tmp_path / "data", shard.paths, (8, 8)).images.astype(np.int64)
    np.testing.assert_array_equal(done.pixel_sums.sums, expected)
    assert len(pickle.dumps(done)) < 8 * 8 * 8 * 1000  # what one row per class would take
    footer = read_chunk_metadata(done.chunk_path)
    assert footer["pixel_sums"].sums.shape == (3, 8, 8)
    again = decode_shard(shard, tmp_path / "data", tmp_path / "chunks", Decoding((8, 8)), with_sums=True)
    assert again.reused
    assert_same_sums(again.pixel_sums, done.pixel_sums)


def test_evaluation_shards_return_counts_without_sums(image_folder, tmp_path):
    shard = shards_of(image_folder, "valid", 100)[0]
    done = decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=False)
    assert done.pixel_sums is None and done.counts.tolist() == [12, 12]


def test_unchanged_shards_are_reused_with_their_sums(image_folder, tmp_path):
    shards = shards_of(image_folder, size=30)
    first = [decode_shard(s, image_folder, tmp_path, Decoding((8, 8)), with_sums=True) for s in shards]
    mtimes = [os.stat(d.chunk_path).st_mtime_ns for d in first]
    again = [decode_shard(s, image_folder, tmp_path, Decoding((8, 8)), with_sums=True) for s in shards]
    assert all(d.reused for d in again) and not any(d.reused for d in first)
    assert [os.stat(d.chunk_path).st_mtime_ns for d in again] == mtimes  # not rewritten
    for a, b in zip(first, again):
        assert_same_sums(a.pixel_sums, b.pixel_sums)
        assert (a.digest, a.counts.tolist(), a.num_bytes) == (b.digest, b.counts.tolist(), b.num_bytes)
    fresh = [decode_shard(s, image_folder, tmp_path, Decoding((8, 8), reuse=False), with_sums=True) for s in shards]
    assert not any(d.reused for d in fresh)


def test_a_touched_file_re_decodes_only_its_own_shard(image_folder, tmp_path):
    shards = shards_of(image_folder, size=30)
    for s in shards:
        decode_shard(s, image_folder, tmp_path, Decoding((8, 8)), with_sums=True)
    touched = image_folder / shards[2].paths[7]
    write_png(touched, np.full((8, 8), 255, dtype=np.uint8))  # new pixels, new size and mtime
    again = [decode_shard(s, image_folder, tmp_path, Decoding((8, 8)), with_sums=True) for s in shards]
    assert [d.reused for d in again] == [True, True, False, True, True]
    assert read_chunk(again[2].chunk_path).images[7].min() == 255


def test_same_size_rewrite_is_noticed_by_mtime(image_folder, tmp_path):
    shard = shards_of(image_folder, size=30)[0]
    decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=True)
    path = image_folder / shard.paths[0]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert not decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=True).reused


def test_an_added_file_re_decodes_only_the_shards_it_moves(image_folder, tmp_path):
    before = shards_of(image_folder, size=30)
    for s in before:
        decode_shard(s, image_folder, tmp_path, Decoding((8, 8)), with_sums=True)
    write_png(image_folder / "train" / "7" / "zzz.png", np.zeros((8, 8), dtype=np.uint8))  # sorts last
    after = shards_of(image_folder, size=30)
    reused = [decode_shard(s, image_folder, tmp_path, Decoding((8, 8)), with_sums=True).reused for s in after]
    assert reused == [True, True, True, True, False]


def test_a_foreign_or_partial_file_under_a_chunk_name_is_not_trusted(image_folder, tmp_path):
    shard = shards_of(image_folder)[0]
    path = Path(chunk_path(tmp_path, shard))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"ARROW1\0\0 half a chunk")
    done = decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=True)
    assert not done.reused and read_chunk_metadata(path)["num_images"] == 50


def test_a_writer_killed_mid_write_leaves_no_chunk(image_folder, tmp_path):
    """SIGKILL a real process while it writes a chunk: the final name never appears, and the
    next decode of that shard does not trust what was left. The writer is paused (SIGSTOP)
    the moment its temporary has bytes, so it is caught mid-write however fast it writes."""
    target = tmp_path / "chunks" / "train" / "train-50-000000.arrow"
    for _ in range(5):  # a ~60 MB write lasts tens of ms: catch it, or try again
        writer = subprocess.Popen([sys.executable, "-c", f"""
import numpy as np
from mnist37.chunks import chunk_table, write_chunk
n = 80_000
table = chunk_table(np.zeros((n, 28, 28), dtype=np.uint8), np.zeros(n, dtype=np.int32), [""] * n, ["3"], "train")
print("writing", flush=True)
write_chunk({str(target)!r}, table)
"""], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "writing"
        partial = []
        while not partial and writer.poll() is None:
            partial = [p for p in target.parent.glob(".*.partial") if p.stat().st_size > 0]
        if partial:
            os.kill(writer.pid, signal.SIGSTOP)
            caught = not target.exists()
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        if partial and caught:
            break
        target.unlink(missing_ok=True)
    else:
        pytest.fail("never caught the writer mid-write")
    assert not target.exists() and partial[0].exists()
    done = decode_shard(shards_of(image_folder)[0], image_folder, tmp_path / "chunks", Decoding((8, 8)), with_sums=True)
    assert not done.reused and len(read_chunk(done.chunk_path)) == 50


def test_bad_files_are_left_out_of_the_chunk_and_remembered(image_folder, tmp_path):
    shard = shards_of(image_folder, "valid", 100)[0]
    (image_folder / shard.paths[5]).write_bytes(b"garbage")
    (image_folder / shard.paths[20]).unlink()  # disappeared after listing
    done = decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=True)
    assert done.rejected == [(shard.paths[5], "not an image"), (shard.paths[20], "file disappeared after listing")]
    assert (done.num_files, done.num_images, done.counts.tolist()) == (24, 22, [11, 11])
    chunk = read_chunk(done.chunk_path)
    assert chunk.paths == [p for i, p in enumerate(shard.paths) if i not in (5, 20)]
    assert chunk.class_indices.tolist() == [0] * 11 + [1] * 11
    kept = decode_files(image_folder, chunk.paths, (8, 8))
    assert_same_sums(done.pixel_sums, pixel_sums(kept.images, chunk.class_indices))
    # A file that is gone cannot be stat'ed: the next run decodes again and says the same.
    again = decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=True)
    assert not again.reused and again.rejected == done.rejected


def test_a_reused_chunk_reports_its_rejections(image_folder, tmp_path):
    shard = shards_of(image_folder, "valid", 100)[0]
    (image_folder / shard.paths[3]).write_bytes(b"")
    first = decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=False)
    again = decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=False)
    assert again.reused and again.rejected == first.rejected == [(shard.paths[3], "empty file (0 bytes)")]
    assert again.num_images == first.num_images == 23


def test_converting_non_grayscale_is_part_of_the_reuse_key(image_folder, tmp_path):
    shard = shards_of(image_folder, "valid", 100)[0]
    write_png(image_folder / shard.paths[0], np.full((8, 8), 9, dtype=np.uint8), mode="RGB")
    rejecting = decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=False)
    assert rejecting.rejected == [(shard.paths[0], "expected 8-bit grayscale, found RGB")]
    converting = decode_shard(shard, image_folder, tmp_path, Decoding((8, 8), convert=True), with_sums=False)
    assert not converting.reused and converting.rejected == [] and converting.num_images == 24
    assert read_chunk(converting.chunk_path).images[0].tolist() == [[9] * 8] * 8


def flip_pixels(path: Path, images: np.ndarray, count: int) -> None:
    """Invert `count` bytes in the middle of the chunk's pixels, as bit rot or a bad copy would."""
    data = bytearray(path.read_bytes())
    start = data.find(images.tobytes()) + images.nbytes // 2 - count // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(data)


def edit_footer_counts(path: Path) -> None:
    """Change a digit of the counts in the footer's JSON (`mnist37.held`: [[index, name,
    images], ...]): the footer still parses."""
    meta = read_chunk_metadata(path)
    held = json.dumps([[c, name, int(meta["counts"][c])] for c, name in meta["held_classes"].items()]).encode()
    data = bytearray(path.read_bytes())
    at = data.rfind(held) + held.index(b"]")  # just after the first class's count
    data[at - 1:at] = b"9" if data[at - 1:at] != b"9" else b"8"
    path.write_bytes(data)


@pytest.mark.parametrize("damage, reason", [
    ("pixels", r"contents do not match the checksum written with them \(xxh3_128:\w+ in its footer, "
               r"xxh3_128:\w+ computed\): damaged since it was written"),
    ("footer", r"contents do not match the checksum written with them"),
    ("another data set", r"written from other files \(names, sizes or modification times differ\)"),
    ("another class list", r"chunk of another data set \(split train, classes \['3', '5'\], 8x8; "
                           r"expected split train, classes \['3', '7'\], 8x8\)"),
    ("truncated", r"not an Arrow IPC file"),
])
def test_a_damaged_or_foreign_chunk_is_decoded_again_and_says_why(image_folder, tmp_path, damage, reason):
    shards = shards_of(image_folder, size=30)
    first = [decode_shard(s, image_folder, tmp_path / "chunks", Decoding((8, 8)), with_sums=True) for s in shards]
    path = Path(first[2].chunk_path)
    if damage == "pixels":
        flip_pixels(path, read_chunk(path).images.copy(), 200)
    elif damage == "footer":
        edit_footer_counts(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:  # the same shard's chunk from another folder, renamed into place
        other = image_folder.parent / "other"
        classes = {"another data set": ("3", "7"), "another class list": ("3", "5")}[damage]
        make_image_folder(other, {"train": {classes[0]: 64, classes[1]: 64}}, seed=1)
        foreign = make_shards(list_split(other, "train", list(classes)), 30)[2]
        os.replace(decode_shard(foreign, other, tmp_path / "other-chunks", Decoding((8, 8)), with_sums=True).chunk_path, path)
    again = [decode_shard(s, image_folder, tmp_path / "chunks", Decoding((8, 8)), with_sums=True) for s in shards]
    assert [d.reused for d in again] == [True, True, False, True, True]
    assert [d.discarded for d in again[:2] + again[3:]] == [""] * 4
    assert re.fullmatch(rf"{re.escape(str(path))}: .*{reason}.*", again[2].discarded), again[2].discarded
    for a, b in zip(first, again):
        assert_same_sums(a.pixel_sums, b.pixel_sums)
        assert (a.digest, a.checksum, a.counts.tolist()) == (b.digest, b.checksum, b.counts.tolist())
    assert decode_shard(shards[2], image_folder, tmp_path / "chunks", Decoding((8, 8)), with_sums=True).reused  # mended


def test_verify_chunks_false_skips_the_hashing_and_trusts_what_it_finds(image_folder, tmp_path):
    """The knob exists to measure what verification costs; what it gives up is shown here."""
    shard = shards_of(image_folder, size=30)[0]
    path = Path(decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=True).chunk_path)
    flip_pixels(path, read_chunk(path).images.copy(), 50)
    assert decode_shard(shard, image_folder, tmp_path, Decoding((8, 8), verify=False), with_sums=True).reused
    assert not decode_shard(shard, image_folder, tmp_path, Decoding((8, 8)), with_sums=True).reused


def test_a_missing_chunk_is_no_news(image_folder, tmp_path):
    done = decode_shard(shards_of(image_folder)[0], image_folder, tmp_path, Decoding((8, 8)), with_sums=True)
    assert not done.reused and done.discarded == ""


def test_splits_of_fewer_shards_than_cpus_get_a_note_naming_the_shard_size(tmp_path, monkeypatch):
    """A decode or classify task takes one shard: a split cut into fewer shards than the
    cluster has CPUs leaves CPUs waiting, and the plan's note names the splits and a
    --shard-size that gives each CPU two shards of the smaller one; none where the shards
    already go round, or the splits are too small to matter."""
    from mnist37 import plan as plan_module
    from mnist37.config import load
    from mnist37.locate import locate
    from mnist37.plan import idle_cpus_note, plan
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": {"a": 10, "b": 10, "c": 10}, "valid": {"a": 2, "b": 2, "c": 2}})

    def planned(shard_size: int):
        return plan(locate(load(data=str(root), classes="all", shard_size=shard_size, chunk_dir=str(tmp_path / "c"))))

    assert idle_cpus_note(planned(64), 4) is None  # 30 images: not worth 4 CPUs' note
    monkeypatch.setattr(plan_module, "IDLE_NOTE_IMAGES_PER_CPU", 4)
    one = planned(64)
    assert idle_cpus_note(one, 4) == ("note: train/ 30 images in 1 shard (--shard-size 64), for 4 CPUs: a decode or "
                                      "classify task takes one shard, so CPUs wait; --shard-size 4 gives each CPU "
                                      "two (chunks of another shard size are decoded again, once)")
    monkeypatch.setattr(plan_module, "IDLE_NOTE_IMAGES_PER_CPU", 1)  # the evaluation split's 6 count too
    assert idle_cpus_note(one, 4).startswith("note: train/ 30 images in 1 shard, valid/ 6 images in 1 shard "
                                             "(--shard-size 64), for 4 CPUs")
    assert "--shard-size 1 gives" in idle_cpus_note(one, 4)
    assert idle_cpus_note(one, 1) is None
    monkeypatch.setattr(plan_module, "IDLE_NOTE_IMAGES_PER_CPU", 4)
    assert sum(s.split == "train" for s in planned(1).shards) >= 4 and idle_cpus_note(planned(1), 4) is None


def test_the_default_shard_size_follows_the_decoded_image_size():
    """shard_size 0 (auto, the default): 8192 images, or as many as fit 16 MiB decoded (a power
    of two) where the configuration fixes the images' size; a size the user gives is kept."""
    from mnist37.config import load
    from mnist37.plan import images_per_shard

    assert load().shard_size == 0
    assert images_per_shard(load()) == 8192  # native sizes: unknown before listing
    assert images_per_shard(load(image_shape="28 28", channels="gray")) == 8192  # MNIST: 6.4 MB
    assert images_per_shard(load(image_size="32x32", channels="rgb")) == 4096  # 8192 would be 25 MB
    assert images_per_shard(load(image_size="64x64", channels="rgb")) == 1024
    assert images_per_shard(load(image_size="64x64")) == 1024  # auto channels count as color
    assert images_per_shard(load(image_size="64x64", channels="gray")) == 4096
    assert images_per_shard(load(image_size="224x224", channels="rgb")) == 64
    assert images_per_shard(load(image_size="4096x4096", channels="rgb")) == 1  # one image is 48 MiB
    assert images_per_shard(load(image_size="224x224", shard_size=300)) == 300


def test_a_planned_run_names_its_chunks_by_the_shard_size_it_uses(tmp_path):
    """Planned in-process on real JPEG folders: the auto size cuts the shards and names them,
    and the plan's config carries it (results.json's shards.shard_size, the idle-CPU note)."""
    from mnist37.locate import locate
    from mnist37.plan import plan
    from tests.test_mixed_sizes import config, photo_folder

    root = photo_folder(tmp_path / "photos", lambda split, c, i: (24, 32))  # 30 train, 12 val images
    big = plan(locate(config(root, tmp_path, image_size="1448x1448")))  # 6.3 MB each: 2 fit 16 MiB
    assert big.cfg.shard_size == 2
    assert [s.name for s in big.shards if s.split == "train"] == [f"train-2-{i:06d}" for i in range(15)]
    assert [len(s) for s in big.shards] == [2] * 21
    small = plan(locate(config(root, tmp_path, image_size="16x16")))  # 768 bytes each
    assert small.cfg.shard_size == 8192 and [s.name for s in small.shards] == ["train-8192-000000", "val-8192-000000"]
    given = plan(locate(config(root, tmp_path, image_size="1448x1448", shard_size=7)))
    assert given.cfg.shard_size == 7 and [len(s) for s in given.shards if s.split == "train"] == [7, 7, 7, 7, 2]
