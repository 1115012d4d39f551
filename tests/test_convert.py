"""The converter: what it writes reads back in `datasets` and `webdataset` unchanged, and the
job gives the source's figures on it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mnist37.config import load
from mnist37.convert import ConvertError, convert
from mnist37.steps import worker_processes
from tests.conftest import PROJECT_ROOT, make_image_folder
from tests.test_formats import assert_same_figures, folder_records, run, write_idx
from tests.test_storage import assert_flushed_then_published, disk_events  # noqa: F401 (a fixture)


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "png", {"train": {"3": 40, "7": 45, "9": 10},
                                                "valid": {"3": 12, "7": 11, "9": 3}})


def test_parquet_reads_back_in_datasets(folder, tmp_path):
    from datasets import ClassLabel, Dataset, Image as HFImage

    summary = convert(load(data=str(folder), classes="all", shard_size=30, chunk_dir=str(tmp_path / "c")),
                      tmp_path / "hf", "parquet", workers=2)
    assert summary["records"] == {"train": 95, "valid": 26} and summary["files"] == 4 + 1
    files = sorted(p.name for p in (tmp_path / "hf" / "data").iterdir())
    assert files == [f"train-{i:05d}-of-00004.parquet" for i in range(4)] + ["valid-00000-of-00001.parquet"]
    ds = Dataset.from_parquet([str(tmp_path / "hf" / "data" / f) for f in files[:4]])
    assert isinstance(ds.features["label"], ClassLabel) and ds.features["label"].names == ["3", "7", "9"]
    assert isinstance(ds.features["image"], HFImage)
    raw = ds.cast_column("image", HFImage(decode=False))
    expected = folder_records(folder, "train", ["3", "7", "9"])
    assert [(r["image"]["bytes"], r["label"]) for r in raw] == [(data, label) for _, data, label in expected]
    first = folder / "train" / expected[0][0]
    assert np.array_equal(np.array(ds[0]["image"]), np.array(Image.open(first)))  # decoded by datasets


def test_webdataset_reads_back_in_webdataset(folder, tmp_path):
    import webdataset as wds

    convert(load(data=str(folder), classes="3 7", shard_size=32, chunk_dir=str(tmp_path / "c")),
            tmp_path / "wds", "webdataset")
    urls = sorted(str(p) for p in (tmp_path / "wds").glob("train-*.tar"))
    assert len(urls) == 3
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    expected = folder_records(folder, "train", ["3", "7"])
    assert [(s["png"], int(s["cls"])) for s in samples] == [(data, label) for _, data, label in expected]
    assert (tmp_path / "wds" / "classes.txt").read_text() == "3\n7\n"


@pytest.mark.parametrize("target", ["parquet", "webdataset", "idx"])
def test_converted_data_gives_the_sources_figures(ray_local, folder, tmp_path, target):
    idx = write_idx(folder, tmp_path / "idx", ["3", "7", "9"], [3, 7, 9])
    expected = run(tmp_path, folder, "png", classes="all", shard_size=25)
    for name, source in (("png", folder), ("idx", idx)):
        dest = tmp_path / f"{name}-{target}"
        convert(load(data=str(source), classes="all", shard_size=25, chunk_dir=str(tmp_path / f"c-{name}")),
                dest, target)
        got = run(tmp_path, dest, f"{name}-{target}", classes="all", shard_size=25)
        assert_same_figures(expected, got)


def test_a_ray_driver_spawns_its_worker_processes_and_other_processes_fork(ray_local):
    """A Ray driver's gRPC connections and threads must not be forked mid-use (Ray does not
    support fork after `ray.init()`): a converter forked from this process crashed the session
    Ray's raylet, and this process with it, in one CI run (steps.worker_processes). The
    converter and the in-process executor take their pools' start method from it; the test
    above runs the converter's spawned pool."""
    assert ray_local.is_initialized() and worker_processes().get_start_method() == "spawn"
    run = subprocess.run([sys.executable, "-c", "from mnist37.steps import worker_processes; "
                          "print(worker_processes().get_start_method())"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "fork", run.stderr


def test_an_existing_destination_is_refused(folder, tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(ConvertError, match="there already exists; remove it or choose another destination"):
        convert(load(data=str(folder), chunk_dir=str(tmp_path / "c")), tmp_path / "there", "parquet")


def test_the_job(folder, tmp_path):
    run = subprocess.run([sys.executable, "jobs/convert.py", "--data", str(folder), "--to", "webdataset",
                          "--dest", str(tmp_path / "out"), "--shard-size", "50", "--chunk-dir", str(tmp_path / "c")],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "121 records in 3 files" in run.stdout
    assert json.loads(run.stdout[:run.stdout.rindex("}") + 1])["classes"] == ["3", "7", "9"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".", "out"))] == ["out"]  # no temporary left


def test_a_conversion_is_on_disk_before_it_is_published(folder, tmp_path, disk_events):
    dest = tmp_path / "out"
    convert(load(data=str(folder), shard_size=50, chunk_dir=str(tmp_path / "c")), dest, "webdataset", workers=1)
    assert (dest / "classes.txt").exists()
    assert_flushed_then_published(disk_events, dest)


def test_a_killed_conversions_folder_is_removed_by_the_next(folder, tmp_path):
    from tests.test_partials import writer

    dest = tmp_path / "out"
    left = writer(tmp_path / ".out.4242-dead1234.partial")  # a converter's temporary, its writer killed
    left.kill()
    left.wait()
    mine = tmp_path / ".mine.partial"
    mine.write_text("a user's own file, not a converter's")
    convert(load(data=str(folder), shard_size=50, chunk_dir=str(tmp_path / "c")), dest, "parquet", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".mine.partial"]
