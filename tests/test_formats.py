"""Container formats against the real libraries that write them: Parquet from Hugging Face
`datasets`, tar shards from `webdataset.TarWriter`, IDX written byte by byte from the format's
definition. The same images as a PNG folder give bit-identical prototypes and figures."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist37.config import load
from mnist37.evaluation import evaluate as evaluate_plan
from mnist37.evaluation import results_json
from mnist37.locate import locate
from mnist37.plan import plan as plan_located
from mnist37.sources import detect
from mnist37.on_ray.tasks import RayExecutor
from mnist37.sources.base import FormatError
from tests.conftest import PROJECT_ROOT, make_image_folder

def plan(cfg):
    """The job's plan for `cfg`: located first, as the job does."""
    return plan_located(locate(cfg))


def evaluate(cfg):
    """(results, prototypes, example images) of the whole evaluation on the connected Ray."""
    done = evaluate_plan(plan(cfg), executor=RayExecutor(cfg.max_in_flight, cfg.gpus_per_task))
    return results_json(done), done.prototypes, done.classification.examples.images()



def folder_records(root: Path, split: str, classes: list[str]) -> list[tuple[str, bytes, int]]:
    """(file name, PNG bytes, class index) of every image of a split, in listing order."""
    return [(f"{c}/{name}", (root / split / c / name).read_bytes(), i)
            for i, c in enumerate(classes) for name in sorted(os.listdir(root / split / c))]


def write_hf_parquet(folder: Path, target: Path, classes: list[str], splits=("train", "valid"),
                     under_data: bool = True) -> Path:
    """What `datasets` writes for an image classification set: Image and ClassLabel features."""
    from datasets import ClassLabel, Dataset, Image as HFImage

    for split in splits:
        records = folder_records(folder, split, classes)
        ds = Dataset.from_dict({"image": [{"bytes": data, "path": name} for name, data, _ in records],
                                "label": [label for *_, label in records]})
        ds = ds.cast_column("image", HFImage()).cast_column("label", ClassLabel(names=classes))
        out = target / ("data" if under_data else "") / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out))
    return target


def write_webdataset(folder: Path, target: Path, classes: list[str], per_tar: int = 50,
                     splits=("train", "valid")) -> Path:
    import webdataset as wds

    target.mkdir(parents=True, exist_ok=True)
    for split in splits:
        records = folder_records(folder, split, classes)
        for start in range(0, len(records), per_tar):
            with wds.TarWriter(str(target / f"{split}-{start // per_tar:06d}.tar")) as sink:
                for i, (name, data, label) in enumerate(records[start:start + per_tar], start):
                    sink.write({"__key__": f"{i:06d}", "png": data, "cls": label})
    (target / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return target


def idx_bytes(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """IDX from its definition: magic 0x00000803 (ubyte, 3 dims) / 0x00000801, big-endian sizes."""
    n, rows, cols = images.shape
    image_file = bytes([0, 0, 0x08, 3]) + struct.pack(">III", n, rows, cols) + images.astype(np.uint8).tobytes()
    label_file = bytes([0, 0, 0x08, 1]) + struct.pack(">I", n) + labels.astype(np.uint8).tobytes()
    return image_file, label_file


def write_idx(folder: Path, target: Path, classes: list[str], label_values: list[int], gz: bool = False,
              splits=("train", "valid")) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for split in splits:
        records = folder_records(folder, split, classes)
        images = np.stack([np.array(Image.open(io.BytesIO(data))) for _, data, _ in records])
        labels = np.array([label_values[label] for *_, label in records])
        for kind, data in zip(("images-idx3", "labels-idx1"), idx_bytes(images, labels)):
            name = f"{split}-{kind}-ubyte"
            if gz:
                (target / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (target / name).write_bytes(data)
    return target


@pytest.fixture
def folder(tmp_path) -> Path:
    # Three classes, so that picking two leaves records of another class to ignore.
    return make_image_folder(tmp_path / "png", {"train": {"3": 40, "7": 45, "9": 10},
                                                "valid": {"3": 12, "7": 11, "9": 3}})


def run(tmp_path, data, name, **overrides):
    cfg = load(data=str(data), out=str(tmp_path / f"out-{name}"), chunk_dir=str(tmp_path / f"chunks-{name}"),
               **overrides)
    return evaluate(cfg)


def assert_same_figures(a, b):
    (ra, pa_, _), (rb, pb, _) = a, b
    assert pa_.tobytes() == pb.tobytes()  # bit-identical prototypes
    assert ra["counts"] == rb["counts"]
    for metric in ra["metrics"]:
        assert ra["metrics"][metric] == rb["metrics"][metric]


@pytest.mark.parametrize("shard_size", [1000, 30])
def test_formats_give_the_folders_figures(ray_local, folder, tmp_path, shard_size):
    classes = ["3", "7", "9"]
    sources = {
        "parquet": write_hf_parquet(folder, tmp_path / "hf", classes),
        "webdataset": write_webdataset(folder, tmp_path / "wds", classes),
        "idx": write_idx(folder, tmp_path / "idx", classes, [3, 7, 9]),
    }
    for selection in (["3", "7"], ["7", "3", "9"]):
        expected = run(tmp_path, folder, f"png-{shard_size}", classes=selection, shard_size=shard_size)
        assert expected[0]["data"]["format"] == "folder"
        for fmt, data in sources.items():
            got = run(tmp_path, data, f"{fmt}-{shard_size}", classes=selection, shard_size=shard_size)
            assert got[0]["data"]["format"] == fmt
            assert_same_figures(expected, got)
            files = got[0]["files"]["train"]
            assert files["3"] == {"found": 40, "used": 40, "rejected": 0, "ignored": 0}
            if selection == ["3", "7"]:
                assert files["(other classes)"]["ignored"] == 10
            else:
                assert "(other classes)" not in files


def test_reuse_and_a_touched_container(ray_local, folder, tmp_path):
    data = write_webdataset(folder, tmp_path / "wds", ["3", "7", "9"], per_tar=40)
    first = run(tmp_path, data, "a")[0]["shards"]
    again = run(tmp_path, data, "a")[0]["shards"]
    assert first["files_reused"] == 0 and not any(s["reused"] for s in first["per_shard"])
    assert all(s["reused"] for s in again["per_shard"])
    os.utime(data / "train-000001.tar", ns=(1, 1))  # one container changed: only its shard decodes
    third = run(tmp_path, data, "a")[0]["shards"]["per_shard"]
    assert [s["index"] for s in third if not s["reused"]] == [1]


def test_idx_gz_and_classes_all(ray_local, folder, tmp_path):
    data = write_idx(folder, tmp_path / "idxgz", ["3", "7", "9"], [3, 7, 9], gz=True)
    results = run(tmp_path, data, "gz", classes="all", shard_size=16)[0]
    assert results["classes"] == ["3", "7", "9"]
    expected = run(tmp_path, folder, "png", classes="3 7 9")
    assert results["counts"] == expected[0]["counts"]


def test_detection_and_layouts(folder, tmp_path):
    assert detect(folder) == "folder"
    flat = write_hf_parquet(folder, tmp_path / "flat", ["3", "7", "9"], under_data=False)
    assert detect(flat) == "parquet"
    per_split = tmp_path / "per-split"
    for split in ("train", "valid"):
        (per_split / split).mkdir(parents=True)
        (flat / f"{split}-00000-of-00001.parquet").rename(per_split / split / "part-0.parquet")
    cfg = load(data=str(per_split), classes="all", chunk_dir=str(tmp_path / "c"))
    planned = plan(cfg)
    assert planned.format == "parquet" and planned.classes == ["3", "7", "9"] and planned.shape == (8, 8)
    wrapped = tmp_path / "wrapped"
    write_webdataset(folder, wrapped / "mnist", ["3", "7", "9"])
    planned = plan(load(data=str(wrapped), classes="all", chunk_dir=str(tmp_path / "c2")))
    assert planned.format == "webdataset" and planned.root == (wrapped / "mnist").resolve()


def test_parquet_shards_are_row_group_ranges(folder, tmp_path):
    import pyarrow.parquet as pq

    data = write_hf_parquet(folder, tmp_path / "hf", ["3", "7", "9"])
    groups = pq.read_metadata(data / "data" / "train-00000-of-00001.parquet").num_row_groups
    planned = plan(load(data=str(data), classes="all", shard_size=1, chunk_dir=str(tmp_path / "c")))
    train = [s for s in planned.shards if s.split == "train"]
    assert [(s.start, s.stop) for s in train] == [(g, g + 1) for g in range(groups)]


def test_errors_name_the_file(folder, tmp_path):
    data = write_idx(folder, tmp_path / "idx", ["3", "7", "9"], [3, 7, 9])
    with pytest.raises(FormatError, match="no idx files for split 'nope'; found splits: train, valid"):
        plan(load(data=str(data), eval_split="valid", train_split="nope", chunk_dir=str(tmp_path / "c")))
    path = data / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(FormatError, match=r"train-images-idx3-ubyte: header declares 95 x 8 x 8 bytes .* but the file has"):
        plan(load(data=str(data), chunk_dir=str(tmp_path / "c")))
    hf = write_hf_parquet(folder, tmp_path / "hf", ["3", "7", "9"])
    with pytest.raises(FormatError, match=r"class '5' is not among its class names \['3', '7', '9'\]"):
        plan(load(data=str(hf), classes="3 5", chunk_dir=str(tmp_path / "c")))
    with pytest.raises(FormatError, match=r"no column 'img' \(image_column\)"):
        plan(load(data=str(hf), image_column="img", chunk_dir=str(tmp_path / "c")))


def test_idx_files_named_with_a_dot(folder, tmp_path):
    data = write_idx(folder, tmp_path / "idx", ["3", "7", "9"], [3, 7, 9])
    for path in data.iterdir():  # as some MNIST mirrors name them: train-images.idx3-ubyte
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    planned = plan(load(data=str(data), classes="all", shard_size=40, chunk_dir=str(tmp_path / "c")))
    assert planned.format == "idx" and planned.classes == ["3", "7", "9"] and planned.shape == (8, 8)
    assert [(s.source, s.labels_source, s.start, s.stop) for s in planned.shards if s.split == "train"] == \
        [("train-images.idx3-ubyte", "train-labels.idx1-ubyte", a, b) for a, b in ((0, 40), (40, 80), (80, 95))]


def test_tar_reader_reads_what_tarfile_writes(tmp_path):
    """The tar reader (runs of plain headers in bulk, every other header one at a time) finds
    exactly the regular files tarfile finds, in order: ustar, GNU long names, pax path records
    and webdataset's pax headers, prefixes, directories and links passed over, a member whose
    contents look like a header, members across reads, a tar cut short."""
    import tarfile

    from mnist37.sources.tar import TarCutShort
    from mnist37.sources.tar import members as tar_members

    rng = np.random.default_rng(0)
    fake = tarfile.TarInfo("fake.png")
    fake.size = 7
    members = [(f"{i:06d}.{ext}", rng.bytes(int(rng.integers(1, 1300)))) for i in range(3000) for ext in ("png", "cls")]
    members[10:10] = [("looks-like-a-header.png", fake.tobuf(tarfile.USTAR_FORMAT) + b"after the fake header")]
    members[20:20] = [("d" * 150 + "/long-name.png", b"long"), ("p" * 90 + "/" + "q" * 90 + ".png", b"prefix")]
    members[3000:3000] = [("big.png", rng.bytes(5 << 20))]  # more than one read
    path = tmp_path / "mixed.tar"
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        with tarfile.open(path, "w", format=fmt) as tar:
            directory = tarfile.TarInfo("a-folder")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            for i, (name, data) in enumerate(members):
                if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name[-100:]:
                    continue  # ustar cannot hold it
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 1.5 + i if fmt == tarfile.PAX_FORMAT else i  # a float: a pax header, as webdataset's
                tar.addfile(info, io.BytesIO(data))
                if i == 15:
                    link = tarfile.TarInfo("a-link")
                    link.type, link.linkname = tarfile.SYMTYPE, name
                    tar.addfile(link)
        with tarfile.open(path) as tar:
            expected = [(m.name.encode(), tar.extractfile(m).read()) for m in tar if m.isreg()]
        whole = path.read_bytes()
        # From a file, and from a stream that is not one (an object's, here in memory).
        for opened in (lambda: open(path, "rb"), lambda: io.BufferedReader(io.BytesIO(path.read_bytes()))):
            path.write_bytes(whole)
            with opened() as f:
                found = tar_members(f, "mixed.tar")
            assert found.error is None
            assert list(zip(found.names.tolist(), found.data)) == expected
            # Cut inside the last member's contents: every member before it, and the cut named.
            path.write_bytes(whole[:whole.rindex(b"002999.cls") + 512 + 1])
            with opened() as f:
                found = tar_members(f, "mixed.tar")
            assert isinstance(found.error, TarCutShort) and found.error.member == b"002999.cls"
            assert list(zip(found.names.tolist(), found.data)) == expected[:-1]
        # Without the end-of-archive blocks, the members are all there too.
        path.write_bytes(whole)
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        path.write_bytes(whole[:last.offset_data + (last.size + 511) // 512 * 512])
        with open(path, "rb") as f:
            found = tar_members(f, "mixed.tar")
        assert found.error is None and list(zip(found.names.tolist(), found.data)) == expected


def test_parquet_image_bytes_are_the_columns_own_buffers():
    """The image column's bytes, read from its Arrow buffers (offsets and data), equal
    to_pylist's, for a struct or binary column, sliced, in chunks, with null rows and null bytes."""
    import pyarrow as pa

    from mnist37.sources.parquet import image_bytes

    rows = [{"bytes": b"aa", "path": "x"}, None, {"bytes": None, "path": "y"}, {"bytes": b"bbb", "path": "z"},
            {"bytes": b"", "path": "w"}, {"bytes": b"c" * 300, "path": "v"}]
    struct_column = pa.array(rows)
    columns = [struct_column, struct_column.slice(1), struct_column.slice(2, 3),
               pa.chunked_array([struct_column.slice(0, 2), struct_column.slice(3)]),
               pa.array([b"x", None, b"yz"], pa.large_binary()).slice(1), pa.array([b"p", b"", None], pa.binary())]
    for column in columns:
        expected = [r["bytes"] if isinstance(r, dict) else r for r in column.to_pylist()]
        assert list(image_bytes(column, "s.parquet")) == expected


def test_member_names_split_into_keys_as_webdataset_does():
    """Keys and extensions of many member names at once, as one name at a time: at the first
    dot of the base name, the extension's case ignored."""
    from mnist37.sources.webdataset import member_key, member_keys

    names = [b"000042.png", b"000042.cls", b"x/y.png", b"x.y/z.PNG", b"abc.Cls", b"noext", b"a.png.cls",
             b".png", b"dir/.cls", b"k.pngx", b"k.pn", b"d.d/e", b"", b"long/" * 20 + b"k.png"]
    keys, has_dot, is_png, is_cls = member_keys(np.array(names, dtype="S"))
    for i, name in enumerate(names):
        split = member_key(name)
        assert has_dot[i] == (split is not None)
        if split is not None:
            assert (keys[i], is_png[i], is_cls[i]) == (split[0], split[1] == b"png", split[1] == b"cls")


def test_decoding_and_reading_chunks_never_import_pandas(folder, tmp_path):
    """pyarrow imports pandas, where it is installed, for pa.array(), pa.scalar() and
    to_numpy(): ~0.4 s of every Ray worker's first task. What a decode task and a classify
    task do, for a folder and each container format, runs here in a fresh process that must
    end without pandas loaded (and must have had it to load: `datasets` needs it)."""
    import importlib.util

    assert importlib.util.find_spec("pandas") is not None, "pandas is installed with the test extras"
    sources = {"folder": folder, "parquet": write_hf_parquet(folder, tmp_path / "pq", ["3", "7", "9"]),
               "webdataset": write_webdataset(folder, tmp_path / "wds", ["3", "7", "9"], per_tar=30),
               "idx": write_idx(folder, tmp_path / "idx", ["3", "7", "9"], [3, 7, 9])}
    code = f"""
import sys
from mnist37.config import load
from mnist37.locate import locate
from mnist37.plan import plan
from mnist37.shards import decode_shard  # noqa: E402
from mnist37.chunks import read_chunk
for name, data in {({k: str(v) for k, v in sources.items()})!r}.items():
    planned = plan(locate(load(data=data, classes=["3", "7"], shard_size=16, chunk_dir=data + "-chunks")))
    images = 0
    for shard in planned.shards:
        done = decode_shard(shard, planned.root, planned.chunk_dir, planned.decoding, True)
        assert len(read_chunk(done.chunk_path, done.checksum).images) == done.num_images
        images += done.num_images
    assert images == 108, (name, images)
    assert "pandas" not in sys.modules, name
print("no pandas")
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "no pandas", run.stderr[-3000:]
