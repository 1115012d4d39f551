"""Per-image predictions (mnist37.predictions) on real Ray, real PNGs and every format the tests
build: the confusion and the top-k figures rebuilt from the rows equal results.json's, rows
and file names do not depend on the shard size, a folder reused by another run holds only its
files, and `mnist37.load(out).predictions` reads them back, from an object store too."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mnist37
from mnist37.config import ConfigError, load
from mnist37.evaluation import evaluate as evaluate_plan
from mnist37.evaluation import results_json
from mnist37.on_ray.tasks import RayExecutor
from mnist37.predictions import PredictionsError, chunk_table, make_request, read
from tests.conftest import make_image_folder
from tests.test_formats import plan, write_hf_parquet, write_idx, write_webdataset

pytestmark = pytest.mark.ray

CLASSES = ["3", "7", "9"]


def rebuilt_confusion(table: pa.Table, metric: str, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (table["true"].to_numpy(), table[f"{metric}_predicted"].to_numpy()), 1)
    return matrix


def assert_rebuilt(table: pa.Table, results: dict) -> None:
    """Every metric's confusion, and the top-k hits per class where there are, from the rows."""
    classes = results["classes"]
    assert table.num_rows == sum(results["counts"][results["config"]["eval_split"]].values())
    assert table["true_name"].to_pylist() == [classes[t] for t in table["true"].to_pylist()]
    for metric, figures in results["metrics"].items():
        confusion = rebuilt_confusion(table, metric, len(classes))
        assert confusion.tolist() == figures["confusion"]
        right = table[f"{metric}_predicted"].to_numpy() == table["true"].to_numpy()
        margins = table[f"{metric}_margin"].to_numpy()
        assert (margins[right] == 0).all() and (margins[~right] >= 0).all()
        if f"{metric}_top_k" in table.column_names:
            hits = np.bincount(table["true"].to_numpy()[table[f"{metric}_top_k"].to_numpy()], minlength=len(classes))
            assert [hits[i] / n if n else None for i, n in enumerate(confusion.sum(axis=1))] == \
                list(figures["top_k"]["per_class"].values())
            assert hits.sum() == figures["top_k"]["correct"]


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    """Equal, but for l2's distances to prototypes, which are within the fast sums' bound of exact
    and, from a matrix product, move by a few float32 ulps with the images computed beside them
    (the chunk's size): docs/output.md. Predictions, margins and top-k are exact and equal."""
    assert a.column_names == b.column_names
    for name in a.column_names:
        if name in ("l2_distance", "l2_distances"):
            x, y = (np.stack(t[name].to_numpy(zero_copy_only=False)).astype(np.float64) for t in (a, b))
            np.testing.assert_allclose(x, y, rtol=1e-5)
        else:
            assert a[name].equals(b[name]), name


def run(tmp_path, data, name, out=None, **overrides):
    """The evaluation in this process on the session's Ray: (results.json's dict, the predictions)."""
    out = out or tmp_path / f"out-{name}"
    cfg = load(data=str(data), out=str(out), chunk_dir=str(tmp_path / f"chunks-{name}"),
               cache_dir=str(tmp_path / "cache"), **overrides)
    results = results_json(evaluate_plan(plan(cfg), executor=RayExecutor(cfg.max_in_flight, cfg.gpus_per_task)))
    return results, read(out, results["predictions"])


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "png", {"train": {"3": 40, "7": 45, "9": 10},
                                                "valid": {"3": 12, "7": 11, "9": 3}})


def archive_of(folder, target):
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname="images")
    return target


def test_every_format_rebuilds_the_confusion_and_top_k(ray_local, folder, tmp_path):
    sources = {
        "folder": folder,
        "archive": archive_of(folder, tmp_path / "images.tgz"),
        "parquet": write_hf_parquet(folder, tmp_path / "hf", CLASSES),
        "webdataset": write_webdataset(folder, tmp_path / "wds", CLASSES, per_tar=10),
        "idx": write_idx(folder, tmp_path / "idx", CLASSES, [3, 7, 9]),
    }
    tables = {}
    for name, data in sources.items():
        results, table = run(tmp_path, data, name, classes=CLASSES, shard_size=7, predictions="full", top_k=2)
        assert_rebuilt(table, results)
        assert results["metrics"]["l1"]["top_k"]["k"] == 2
        assert table.column_names == ["path", "split", "true", "true_name",
                                      *(f"{m}_{c}" for m in ("l1", "l2")
                                        for c in ("predicted", "distance", "margin", "distances", "top_k"))]
        distances = np.stack(table["l1_distances"].to_numpy(zero_copy_only=False))
        rows = np.arange(table.num_rows)
        assert np.array_equal(distances[rows, table["true"].to_numpy()], table["l1_distance"].to_numpy())
        tables[name] = table
    paths = {name: t["path"].to_pylist() for name, t in tables.items()}
    assert paths["folder"][:2] == ["valid/3/0.png", "valid/3/1.png"] and paths["archive"] == paths["folder"]
    assert paths["parquet"][0] == "data/valid-00000-of-00001.parquet:0"  # the container and the record
    assert paths["webdataset"][0] == "valid-000000.tar:000000" and paths["idx"][0] == "valid-images-idx3-ubyte:0"
    # The same images in the same order give the same rows, whatever the format.
    for name, table in tables.items():
        assert_same_rows(table.drop(["path"]), tables["folder"].drop(["path"]))


def test_rows_and_names_do_not_depend_on_the_shard_size(ray_local, folder, tmp_path):
    names = {}
    tables = []
    for shard_size in (7, 1000):
        results, table = run(tmp_path, folder, f"s{shard_size}", classes=CLASSES, shard_size=shard_size)
        names[shard_size] = [f["name"] for f in results["predictions"]["files"]]
        tables.append(table)
    assert names == {7: [f"valid-{i:06d}.parquet" for i in range(4)], 1000: ["valid-000000.parquet"]}
    assert_same_rows(tables[0], tables[1])
    assert tables[0].column_names == ["path", "split", "true", "true_name", "l1_predicted", "l1_distance",
                                      "l1_margin", "l2_predicted", "l2_distance", "l2_margin"]  # brief, 3 classes: no top-k


def test_a_reused_folder_holds_this_runs_files_only(ray_local, folder, tmp_path):
    out = tmp_path / "out"
    first = mnist37.evaluate(folder, out=out, classes=CLASSES, shard_size=7, predictions="full",
                             cache_dir=str(tmp_path / "cache"), chunk_dir=str(tmp_path / "chunks"))
    files = sorted(p.name for p in (out / "predictions").iterdir())
    assert files == [f"valid-{i:06d}.parquet" for i in range(4)]
    kept = {name: (out / "predictions" / name).read_bytes() for name in files}
    # Again, every chunk reused: the same files, byte for byte, so two runs can be diffed.
    again = mnist37.evaluate(folder, out=out, classes=CLASSES, shard_size=7, predictions="full",
                             cache_dir=str(tmp_path / "cache"), chunk_dir=str(tmp_path / "chunks"))
    assert again.results["shards"]["files_decoded"] == 0
    assert {name: (out / "predictions" / name).read_bytes() for name in files} == kept
    assert again.predictions.equals(first.predictions)
    # Another shard size: its one file, the four earlier ones gone.
    bigger = mnist37.evaluate(folder, out=out, classes=CLASSES, shard_size=1000, cache_dir=str(tmp_path / "cache"),
                              chunk_dir=str(tmp_path / "chunks"))
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["valid-000000.parquet"]
    assert_same_rows(bigger.predictions, first.predictions.select(bigger.predictions.column_names))
    # None: no files left, and the Results says so.
    off = mnist37.evaluate(folder, out=out, classes=CLASSES, predictions="none", cache_dir=str(tmp_path / "cache"),
                           chunk_dir=str(tmp_path / "chunks"))
    assert list((out / "predictions").iterdir()) == []
    assert off.results["predictions"] == {"columns": "none", "top_k": 0, "location": "predictions", "rows": 0,
                                          "num_bytes": 0, "write_s": 0, "files": []}
    with pytest.raises(mnist37.NoPredictions, match=r"out: this run wrote no per-image predictions \(predictions = "
                                                    r"none\); run it with predictions = brief or full"):
        off.predictions


def test_a_file_of_another_run_is_refused(ray_local, folder, tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    mnist37.evaluate(folder, out=out, classes=CLASSES, cache_dir=str(tmp_path / "cache"))
    mnist37.evaluate(folder, out=other, classes=["3", "7"], cache_dir=str(tmp_path / "cache"))
    shutil.copy(other / "predictions" / "valid-000000.parquet", out / "predictions" / "valid-000000.parquet")
    with pytest.raises(PredictionsError, match=r"predictions/valid-000000\.parquet: written by another run than "
                                               r"results\.json describes"):
        mnist37.load(out).predictions
    listing = mnist37.load(other).results["predictions"]
    with pytest.raises(PredictionsError, match=r"other/predictions: 23 rows, but results\.json lists 24"):
        read(other, listing | {"files": [f | {"rows": f["rows"] + 1} for f in listing["files"]]})
    (out / "predictions" / "valid-000000.parquet").unlink()
    with pytest.raises(PredictionsError, match=r"predictions/valid-000000\.parquet: not found; results\.json lists it"):
        mnist37.load(out).predictions


def test_top_k_defaults_to_5_from_10_classes(ray_local, tmp_path):
    ten = [str(c) for c in range(10)]
    data = make_image_folder(tmp_path / "ten", {"train": {c: 6 for c in ten}, "valid": {c: 4 for c in ten}},
                             shape=(6, 6))
    results = mnist37.evaluate(data, out=tmp_path / "out", classes="all", cache_dir=str(tmp_path / "cache"))
    assert {m: f["k"] for m, f in results.top_k.items()} == {"l1": 5, "l2": 5}
    assert_rebuilt(results.predictions, results.results)
    for metric, figures in results.top_k.items():
        # top-5 is at least top-1, class by class
        assert all(figures["per_class"][c] >= results.per_class[metric][c] for c in ten)
    table = (tmp_path / "out" / "table.txt").read_text()
    assert table.splitlines()[0].split() == ["class", "l1", "l2", "l1", "top5", "l2", "top5"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<th>l1 top5</th>" in page and "<th>l1 top5</th>" in results._repr_html_()
    mean = next(line for line in table.splitlines() if line.startswith("mean of classes")).split()[3:]
    assert mean == [f"{f:.4f}" for f in (*results.mean_class_accuracy.values(),
                                         *(results.top_k[m]["mean_class_accuracy"] for m in results.metrics))]
    two = mnist37.evaluate(data, out=tmp_path / "two", classes="3 7", cache_dir=str(tmp_path / "cache"))
    assert two.top_k == {} and "top_k" not in two.results["metrics"]["l1"]


def test_top_k_and_predictions_errors_are_one_line(ray_local, image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"top_k: 2 is not less than the 2 classes: every image's class would be "
                                          r"among its 2 nearest; give a smaller k, or 0 for none"):
        mnist37.evaluate(image_folder, out=tmp_path / "out", top_k=2, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "out" / "results.json").exists()
    with pytest.raises(ConfigError, match=r"predictions: unknown choice 'all'; expected one of none, brief, full"):
        mnist37.evaluate(image_folder, predictions="all")
    with pytest.raises(ConfigError, match=r"top_k: expected a positive k, 0 \(none\) or -1 \(auto\), got -2"):
        mnist37.evaluate(image_folder, top_k=-2)


def test_an_object_store_prefix_gets_the_same_files(ray_local, folder, tmp_path):
    """Tasks publish each file to the store themselves; load reads them back from there."""
    from tests.s3server import serving

    local = mnist37.evaluate(folder, out=tmp_path / "out", classes=CLASSES, shard_size=7, predictions="full",
                             cache_dir=str(tmp_path / "cache"))
    with serving("predictions") as s3:
        stored = mnist37.evaluate(folder, out="s3://predictions/runs/x", classes=CLASSES, shard_size=7,
                                  predictions="full", cache_dir=str(tmp_path / "cache"))
        listed = s3.client().list_objects_v2(Bucket="predictions", Prefix="runs/x/predictions/")
        table = stored.predictions
        s3.client().delete_object(Bucket="predictions", Key="runs/x/predictions/valid-000001.parquet")
        with pytest.raises(PredictionsError, match=r"s3://predictions/runs/x/predictions/valid-000001\.parquet: not "
                                                   r"found; results\.json lists it"):
            mnist37.load("s3://predictions/runs/x").predictions
    assert sorted(o["Key"] for o in listed["Contents"]) == [f"runs/x/predictions/valid-{i:06d}.parquet"
                                                             for i in range(4)]
    assert table.equals(local.predictions)
    assert_rebuilt(table, stored.results)


def test_chunk_table_brief_and_full():
    request = make_request("full", "/x", "valid", ["a", "b", "c"], ["l1"], 2, np.zeros((3, 2, 2), np.float32), True)
    distances = np.array([[0.1, 0.3, 0.2], [0.5, 0.25, 0.75]], dtype=np.float32)
    table = chunk_table(request.for_chunk(3), ["valid/a/0.png", "valid/b/1.png"], np.array([0, 2]),
                        {"l1": np.array([0, 1])}, {"l1": distances}, {"l1": np.array([True, False])}, "k")
    assert request.for_chunk(3).name == "valid-000003.parquet"
    assert table.to_pydict() == {
        "path": ["valid/a/0.png", "valid/b/1.png"], "split": ["valid", "valid"], "true": [0, 2],
        "true_name": ["a", "c"], "l1_predicted": [0, 1], "l1_distance": [np.float32(0.1), np.float32(0.75)],
        "l1_margin": [0.0, np.float32(0.75) - np.float32(0.25)],
        "l1_distances": [list(distances[0]), list(distances[1])], "l1_top_k": [True, False]}
    assert table.schema.field("l1_distances").type == pa.list_(pa.float32())
    assert table.schema.metadata[b"mnist37.key"] == b"k"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    assert pq.read_table(pa.BufferReader(sink.getvalue())).equals(table)


def test_writing_predictions_never_imports_pandas(tmp_path):
    """pa.array() imports pandas where it is installed (~1.5 s of each classify worker's first
    file here): a chunk's predictions are built from buffers instead."""
    import subprocess
    import sys

    code = f"""
import sys
import numpy as np
from mnist37.predictions import make_request, write_chunk
request = make_request("full", {str(tmp_path)!r}, "valid", ["a", "b"], ["l1"], 1, np.zeros((2, 2), np.float32), True)
written = write_chunk(request.for_chunk(0), "x", ["p0", "p1"], np.array([0, 1]), {{"l1": np.array([0, 0])}},
                      {{"l1": np.ones((2, 2), np.float32)}}, {{"l1": np.array([True, False])}})
assert written.rows == 2, written
print("pandas" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
    assert pq.read_table(tmp_path / "predictions" / "valid-000000.parquet")["l1_top_k"].to_pylist() == [True, False]
