"""The Python API (mnist37.api): evaluate() runs the job in-process on real Ray and real PNGs,
load() reads its folder back, Results shows itself in a notebook; errors are exceptions."""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mnist37
from mnist37 import Mnist37Error
from mnist37.config import ConfigError
from tests.conftest import PROJECT_ROOT, make_image_folder
from tests.test_evaluate_job import FASTBOOK_L1

pytestmark = pytest.mark.ray

CONTROL = re.compile(r"\r|\x1b\[")  # a carriage return or an ANSI escape sequence


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def test_evaluate_returns_the_figures_of_results_json(ray_local, image_folder, tmp_path, cache):
    out = tmp_path / "out"
    results = mnist37.evaluate(image_folder, out=out, cache_dir=cache, shard_size=5)
    written = json.loads((out / "results.json").read_text())
    assert isinstance(results, mnist37.Results) and results.out == str(out)
    assert results.classes == written["classes"] == ["3", "7"] and results.metrics == ["l1", "l2"]
    assert results.results == written
    assert written["config"]["shard_size"] == 5  # the keyword reached the job
    for metric, figures in written["metrics"].items():
        assert results.per_class[metric] == figures["per_class"]
        assert results.mean_class_accuracy[metric] == figures["mean_class_accuracy"]
        assert results.overall_accuracy[metric] == figures["overall_accuracy"]
        assert results.confusion[metric].dtype == np.int64
        assert results.confusion[metric].tolist() == figures["confusion"]
        assert results.confusion[metric].sum() == figures["total"] == 24
    assert results.prototypes.dtype == np.float32 and results.prototypes.shape == (2, 8, 8)
    assert np.array_equal(results.prototypes, np.load(out / "prototypes.npy"))
    assert results.report == str(out / "report.html") and (out / "report.html").is_file()
    # the process's own Ray (ray_local) was used and is left running
    assert ray_local.is_initialized()


def test_load_reads_back_what_evaluate_returned(ray_local, image_folder, tmp_path, cache):
    returned = mnist37.evaluate(str(image_folder), out=str(tmp_path / "out"), cache_dir=cache, metrics="l2")
    loaded = mnist37.load(tmp_path / "out")
    assert loaded.metrics == returned.metrics == ["l2"]
    for name in ("out", "classes", "per_class", "mean_class_accuracy", "overall_accuracy", "report", "results"):
        assert getattr(loaded, name) == getattr(returned, name), name
    assert np.array_equal(loaded.prototypes, returned.prototypes)
    assert loaded.confusion.keys() == returned.confusion.keys()
    assert all(np.array_equal(loaded.confusion[m], returned.confusion[m]) for m in loaded.metrics)
    assert repr(loaded) == repr(returned)


def test_fastbook_figures_on_mnist_sample(ray_local, mnist_sample_tgz, cache_dir, tmp_path):
    results = mnist37.evaluate(mnist_sample_tgz, out=tmp_path / "sample", cache_dir=str(cache_dir))
    assert round(results.per_class["l1"]["3"], 4) == FASTBOOK_L1["3"]
    assert round(results.per_class["l1"]["7"], 4) == FASTBOOK_L1["7"]
    assert round(results.mean_class_accuracy["l1"], 4) == FASTBOOK_L1["mean"]
    assert results.prototypes.shape == (2, 28, 28)
    assert results.confusion["l1"].sum(axis=1).tolist() == [1010, 1028]
    examples = results.examples("l1")
    assert examples.num_rows > 0 and {"true", "side", "path", "margin"} <= set(examples.column_names)
    assert "0.9511" in results._repr_html_()


def test_out_none_writes_a_new_temporary_folder(ray_local, image_folder, cache):
    first = mnist37.evaluate(image_folder, cache_dir=cache)
    second = mnist37.evaluate(image_folder, cache_dir=cache)
    assert first.out != second.out and "mnist37-" in first.out
    assert mnist37.load(first.out).results == first.results


@pytest.mark.parametrize("keywords, match", [
    ({"shard_sise": 5}, r"unknown key 'shard_sise'"),
    ({"metrics": ["l3"]}, r"metrics: unknown metric 'l3'"),
    ({"on_bad_file": "ignore"}, r"on_bad_file"),
])
def test_a_bad_config_key_raises_naming_it(image_folder, tmp_path, keywords, match):
    with pytest.raises(ConfigError, match=match):
        mnist37.evaluate(image_folder, out=tmp_path / "out", **keywords)
    assert not (tmp_path / "out").exists()


def test_a_bad_image_raises_a_data_error_and_the_process_goes_on(ray_local, image_folder, tmp_path, cache):
    (image_folder / "valid" / "7" / "0.png").write_bytes(b"not a png at all")
    with pytest.raises(Mnist37Error, match=r"valid/7/0\.png") as raised:
        mnist37.evaluate(image_folder, out=tmp_path / "bad", cache_dir=cache)
    assert not isinstance(raised.value, SystemExit)
    assert not (tmp_path / "bad" / "results.json").exists()
    # the process, and the Ray it runs, still work: the same data with the file skipped
    results = mnist37.evaluate(image_folder, out=tmp_path / "skipped", cache_dir=cache, on_bad_file="skip")
    assert [r["path"] for r in results.results["rejected"]] == ["valid/7/0.png"]


def test_missing_data_raises_dataset_error(tmp_path):
    with pytest.raises(mnist37.DatasetError, match="nowhere"):
        mnist37.evaluate(tmp_path / "nowhere", out=tmp_path / "out")


def test_ray_address_beside_the_process_own_ray_is_refused(ray_local, image_folder, tmp_path):
    with pytest.raises(Mnist37Error, match=r"ray_address 'local': this process already runs Ray"):
        mnist37.evaluate(image_folder, out=tmp_path / "out", ray_address="local")
    assert ray_local.is_initialized()


SCRIPT = textwrap.dedent("""
    import sys
    import ray
    import mnist37

    data, out, cache = sys.argv[1:]
    try:
        mnist37.evaluate(data + "/missing-class", out=out + "/a", cache_dir=cache, ray_address="local")
    except mnist37.Mnist37Error as e:
        print("raised", type(e).__name__, e)
    try:  # an error found by the tasks of the job's own Ray: a file that is not a PNG
        mnist37.evaluate(data, out=out + "/b", cache_dir=cache, ray_address="local")
    except mnist37.Mnist37Error as e:
        print("raised", type(e).__name__, e)
    print("ray after the error:", ray.is_initialized())
    results = mnist37.evaluate(data, out=out + "/c", cache_dir=cache, ray_address="local", on_bad_file="skip")
    print("ray after the run:", ray.is_initialized())
    print(repr(results))
""")


def test_own_ray_started_and_stopped_errors_raised_no_control_codes(image_folder, tmp_path):
    """In a fresh process (no Ray of its own yet), stdout and stderr piped, as a notebook's
    kernel has them: errors raised and survived, the job's Ray stopped, progress in plain lines."""
    (image_folder / "valid" / "7" / "0.png").write_bytes(b"GIF89a, not a PNG")
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(image_folder), str(tmp_path), str(tmp_path / "cache")],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    raised = [line for line in run.stdout.splitlines() if line.startswith("raised")]
    assert len(raised) == 2, run.stdout + run.stderr
    assert "DatasetError" in raised[0] and "missing-class" in raised[0]
    assert "BadFilesError 1 of 152 image files cannot be used" in raised[1]
    assert "valid/7/0.png" in run.stdout.partition(raised[1])[2]  # the message's list of files
    assert "ray after the error: False" in run.stdout and "ray after the run: False" in run.stdout
    assert "Results(" in run.stdout and "2 classes" in run.stdout
    assert "decode: " in run.stderr  # progress, as plain lines
    assert not CONTROL.search(run.stdout + run.stderr), repr(CONTROL.search(run.stdout + run.stderr))


def test_repr_html_shows_the_table_and_the_prototypes(ray_local, image_folder, tmp_path, cache):
    results = mnist37.evaluate(image_folder, out=tmp_path / "out", cache_dir=cache)
    page = results._repr_html_()
    assert page.count("<table") == 1 and page.count('<img src="data:image/png;base64,') == 2
    assert "<th>l1</th>" in page and "<th>l2</th>" in page and "mean of classes" in page
    assert f"{results.mean_class_accuracy['l1']:.4f}" in page
    assert f"{results.per_class['l2']['7']:.4f}" in page
    assert "report.html" in page
    color = dataclasses.replace(results, prototypes=np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32))
    assert color._repr_html_().count('<img src="data:image/png;base64,') == 2  # [C, 3, H, W] drawn as RGB


def test_repr_html_beyond_fifty_classes_is_the_short_form(ray_local, tmp_path, cache):
    names = [f"c{i:02d}" for i in range(60)]
    data = make_image_folder(tmp_path / "many", {"train": dict.fromkeys(names, 2), "valid": dict.fromkeys(names, 1)},
                             shape=(4, 4))
    results = mnist37.evaluate(data, out=tmp_path / "out", cache_dir=cache, classes="all")
    assert results.confusion["l1"].shape == (60, 60) and "confusion" not in results.results["metrics"]["l1"]
    page = results._repr_html_()
    assert page.count("<img") == 30 and "60 classes: the 15 worst and 15 best by l1" in page


def test_predictions_are_a_table_of_every_image_or_say_why_not(ray_local, image_folder, tmp_path, cache):
    results = mnist37.evaluate(image_folder, out=tmp_path / "out", cache_dir=cache)
    table = results.predictions
    assert table.num_rows == 24 and table["path"][0].as_py() == "valid/3/0.png"
    assert table.to_pandas()["l1_predicted"].tolist() == table["l1_predicted"].to_pylist()
    assert results.predictions is table  # read once
    off = mnist37.evaluate(image_folder, out=tmp_path / "off", cache_dir=cache, predictions="none")
    with pytest.raises(mnist37.NoPredictions, match="wrote no per-image predictions"):
        off.predictions


def test_load_of_a_folder_without_results_json(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "prototypes.npy").write_bytes(b"")
    with pytest.raises(mnist37.ResultsNotFound, match=r"half: results\.json not found; not the output folder"):
        mnist37.load(tmp_path / "half")


def test_load_reads_an_object_store_prefix(ray_local, image_folder, tmp_path, cache):
    """A run's folder copied to a real S3 server on loopback reads back the same."""
    from tests.s3server import serving

    local = mnist37.evaluate(image_folder, out=tmp_path / "out", cache_dir=cache)
    with serving("results") as s3:
        s3.upload(tmp_path / "out", "results", "runs/x")
        stored = mnist37.load("s3://results/runs/x/")
        with pytest.raises(mnist37.ResultsNotFound, match=r"s3://results/runs/y: results\.json not found"):
            mnist37.load("s3://results/runs/y")
        examples = stored.examples("l2")
    assert stored.report == "s3://results/runs/x/report.html"
    assert stored.results == local.results and stored.classes == local.classes
    assert np.array_equal(stored.prototypes, local.prototypes)
    assert all(np.array_equal(stored.confusion[m], local.confusion[m]) for m in local.metrics)
    assert examples.equals(local.examples("l2"))


def test_the_callers_signal_handlers_are_back_after_the_call(ray_local, image_folder, tmp_path, cache):
    import signal

    def mine(signum, frame):
        pass

    previous, terminate = signal.signal(signal.SIGINT, mine), signal.getsignal(signal.SIGTERM)
    try:
        mnist37.evaluate(image_folder, out=tmp_path / "out", cache_dir=cache)
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGTERM) == terminate
    finally:
        signal.signal(signal.SIGINT, previous)


def test_evaluate_from_another_thread(ray_local, image_folder, tmp_path, cache):
    """Python lets only the main thread set signal handlers: a call from a thread (a web app's
    worker, a GUI) runs the job without taking them."""
    import threading

    got: list = []
    thread = threading.Thread(target=lambda: got.append(_call(image_folder, tmp_path / "out", cache)))
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert isinstance(got[0], mnist37.Results), got[0]


def _call(data, out, cache):
    try:
        return mnist37.evaluate(data, out=out, cache_dir=cache)
    except Exception as e:  # noqa: BLE001: handed back to the test's thread to show
        return e
