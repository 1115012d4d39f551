"""Bad records in container formats, accounted like bad files: found = used + rejected per
class, each rejected record named `<container>:<key or row>` with its reason, in both
policies; records of classes not selected are ignored, not rejected. IDX files whose header
disagrees with their length stop the job with one line naming the file."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import mnist37
from tests.conftest import make_image_folder
from tests.test_evaluate_job import run_job

pytestmark = pytest.mark.ray  # the job, on the session's Ray
from tests.test_formats import folder_records, write_idx


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


GOOD = png(np.random.default_rng(3).integers(0, 256, (8, 8), dtype=np.uint8))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("png"), {"train": {"3": 20, "7": 20, "9": 5},
                                                               "valid": {"3": 8, "7": 8, "9": 2}})


def parquet_corpus(clean, root):
    """Clean rows of every split, then bad rows appended to the training file. Returns
    {record path: reason}."""
    features = {"image": {"_type": "Image"}, "label": {"names": ["3", "7", "9"], "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    (root / "data").mkdir(parents=True)
    bad = {}
    for split in ("train", "valid"):
        rows = [({"bytes": data, "path": name}, label) for name, data, label in
                folder_records(clean, split, ["3", "7", "9"])]
        source = f"data/{split}-00000-of-00001.parquet"
        if split == "train":
            extra = [(None, 0, "row without image bytes", "3"),
                     ({"bytes": None, "path": "x.png"}, 1, "row without image bytes", "7"),
                     ({"bytes": GOOD[:-30], "path": "cut.png"}, 0, "truncated PNG", "3"),
                     ({"bytes": GOOD, "path": "five.png"}, 5, "label 5 out of range 0..2", None),
                     ({"bytes": GOOD, "path": "nolabel.png"}, None, "no label", None),
                     ({"bytes": png(np.zeros((4, 4), np.uint8)), "path": "small.png"}, 1, "expected 8x8, found 4x4",
                      "7")]
            for i, (_, _, reason, name) in enumerate(extra):
                bad[f"{source}:{len(rows) + i}"] = (reason, name)
            rows += [(image, label) for image, label, _, _ in extra]
        table = pa.table({"image": pa.array([r[0] for r in rows], schema.field("image").type),
                          "label": pa.array([r[1] for r in rows], pa.int64())}, schema=schema)
        pq.write_table(table, root / source, row_group_size=16)
    return root, bad, 0


def webdataset_corpus(clean, root):
    import webdataset as wds

    root.mkdir(parents=True)
    bad = {}
    for split in ("train", "valid"):
        records = folder_records(clean, split, ["3", "7", "9"])
        with wds.TarWriter(str(root / f"{split}-000000.tar")) as sink:
            for i, (_, data, label) in enumerate(records):
                sink.write({"__key__": f"{i:06d}", "png": data, "cls": label})
    (root / "classes.txt").write_text("3\n7\n9\n")
    with wds.TarWriter(str(root / "train-000001.tar")) as sink:
        sink.write({"__key__": "nocls", "png": GOOD})
        sink.write({"__key__": "nopng", "cls": 1})
        sink.write({"__key__": "word", "png": GOOD, "cls": "seven"})
        sink.write({"__key__": "high", "png": GOOD, "cls": 3})
        sink.write({"__key__": "cut", "png": GOOD[:-30], "cls": 0})
        sink.write({"__key__": "fine", "png": GOOD, "cls": 0})
        sink.write({"__key__": "last", "png": GOOD, "cls": 1})
    bad.update({"train-000001.tar:nocls": ("no .cls member", None), "train-000001.tar:nopng": ("no image member", "7"),
                "train-000001.tar:word": ("class 'seven' is not an integer", None),
                "train-000001.tar:high": ("label 3 out of range 0..2", None),
                "train-000001.tar:cut": ("truncated PNG", "3")})
    # Cut the tar inside the last record's PNG member: that record is rejected, the rest is kept.
    path = root / "train-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[:data.rindex(b"last.png") + 512 + 100])
    bad["train-000001.tar:last"] = (f"truncated tar (last.png cut short: 100 of {len(GOOD)} bytes)", "7")
    return root, bad, 1  # "fine", a good record between bad ones


CORPORA = {"parquet": parquet_corpus, "webdataset": webdataset_corpus}


@pytest.mark.parametrize("fmt", CORPORA)
def test_skip_policy_accounts_every_record(fmt, clean, ray_local, tmp_path):
    """Both runs in this process on the session's Ray (mnist37.evaluate runs the job's main)."""
    data, bad, extra_threes = CORPORA[fmt](clean, tmp_path / fmt)
    skip = {"on_bad_file": "skip", "classes": "3 7", "chunk_dir": str(tmp_path / "chunks"), "shard_size": 7}
    results = mnist37.evaluate(data, out=tmp_path / "out", **skip).results
    assert results["data"]["format"] == fmt
    assert {r["path"]: r["reason"] for r in results["rejected"]} == {p: reason for p, (reason, _) in bad.items()}
    assert results["counts"] == {"train": {"3": 20 + extra_threes, "7": 20}, "valid": {"3": 8, "7": 8}}
    train = results["files"]["train"]
    for name in ("3", "7"):
        assert train[name]["rejected"] == sum(1 for _, c in bad.values() if c == name)
    unclassed = sum(1 for _, c in bad.values() if c is None)
    assert train["(no class)"] == {"found": unclassed, "used": 0, "rejected": unclassed, "ignored": 0}
    assert train["(other classes)"] == {"found": 0, "used": 0, "rejected": 0, "ignored": 5}  # class 9
    for split in results["files"].values():
        for a in split.values():
            assert a["found"] == a["used"] + a["rejected"]
    # Reused chunks report the same rejections.
    reused = mnist37.evaluate(data, out=tmp_path / "again", **skip).results
    assert reused["shards"]["files_decoded"] == 0
    assert (reused["rejected"], reused["files"]) == (results["rejected"], results["files"])


@pytest.mark.parametrize("fmt", CORPORA)
def test_error_policy_lists_the_bad_records(fmt, clean, tmp_path):
    data, bad, _ = CORPORA[fmt](clean, tmp_path / fmt)
    run = run_job("--data", str(data), "--out", str(tmp_path / "out"), "--classes", "3", "7",
                  "--chunk-dir", str(tmp_path / "chunks"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"error: {len(bad)} of " in run.stderr
    for path, (reason, _) in bad.items():
        assert f"  {path}: {reason}\n" in run.stderr


def test_idx_header_that_disagrees_with_the_length_is_one_line(clean, tmp_path):
    data = write_idx(clean, tmp_path / "idx", ["3", "7", "9"], [3, 7, 9], splits=("train", "valid"))
    labels = data / "valid-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes() + b"\x03")
    run = run_job("--data", str(data), "--out", str(tmp_path / "out"), "--chunk-dir", str(tmp_path / "c"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: valid-labels-idx1-ubyte: header declares 18 bytes of data (26 bytes in all), but the file has 27")


def test_a_gz_idx_file_shorter_than_its_header(clean, tmp_path):
    import gzip

    data = write_idx(clean, tmp_path / "idx", ["3", "7", "9"], [3, 7, 9], gz=True)
    images = data / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-64 * 3]))
    run = run_job("--data", str(data), "--out", str(tmp_path / "out"), "--chunk-dir", str(tmp_path / "c"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "error: train-images-idx3-ubyte.gz: header declares more records than the file holds (records ")
