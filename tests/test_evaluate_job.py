"""jobs/evaluate.py end to end, as a user runs it: a subprocess that starts its own local Ray."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mnist37.fastbook

from tests.conftest import PROJECT_ROOT, make_image_folder, shared_ray_address

pytestmark = pytest.mark.ray  # the job, with its own local Ray

# fastbook chapter 4's published figures for the L1 baseline on MNIST_SAMPLE.
FASTBOOK_L1 = {"3": 0.9168, "7": 0.9854, "mean": 0.9511}


def run_job(*argv: str, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """jobs/evaluate.py as a user runs it under `ray job submit`: joining a running cluster, the
    test session's (tests/conftest.py), unless the test chooses one itself (--ray-address,
    `local` for a Ray of the job's own; RAY_ADDRESS; RAY_TMPDIR)."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env_extra or {})}
    if "--ray-address" not in argv and not {"RAY_ADDRESS", "RAY_TMPDIR"} & set(env_extra or {}):
        argv = (*argv, "--ray-address", shared_ray_address())
    return subprocess.run([sys.executable, "jobs/evaluate.py", *argv], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_fastbook_figures_on_mnist_sample(sample_run):
    run, _, results = sample_run
    l1 = results["metrics"]["l1"]
    assert round(l1["per_class"]["3"], 4) == FASTBOOK_L1["3"]
    assert round(l1["per_class"]["7"], 4) == FASTBOOK_L1["7"]
    assert round(l1["mean_class_accuracy"], 4) == FASTBOOK_L1["mean"]
    l2 = results["metrics"]["l2"]
    table = run.stdout
    for label, metric in (("3  (n=1010)", "3"), ("7  (n=1028)", "7")):
        line = next(line for line in table.splitlines() if line.startswith(label))
        assert f"{l1['per_class'][metric]:.4f}" in line and f"{l2['per_class'][metric]:.4f}" in line
    assert f"{l1['mean_class_accuracy']:.4f}" in next(line for line in table.splitlines() if line.startswith("mean"))


def test_agrees_with_the_seed_computation_exactly(sample_run):
    _, _, results = sample_run
    seed = mnist37.fastbook.evaluate(Path(results["data"]["root"]))
    confusion = results["metrics"]["l1"]["confusion"]
    assert (confusion[0][0], confusion[1][1]) == (seed["3"], seed["7"])


def test_results_json_documents_the_run(sample_run):
    _, out, results = sample_run
    root = Path(results["data"]["root"])
    assert results["classes"] == ["3", "7"] and results["image_shape"] == [28, 28]
    assert results["counts"] == {
        split: {c: sum(1 for f in (root / split / c).iterdir() if f.suffix == ".png") for c in ("3", "7")}
        for split in ("train", "valid")}
    assert results["counts"] == {"train": {"3": 6131, "7": 6265}, "valid": {"3": 1010, "7": 1028}}
    for metric in ("l1", "l2"):
        m = results["metrics"][metric]
        assert np.array(m["confusion"]).sum(axis=1).tolist() == [1010, 1028]
        assert m["overall_accuracy"] == pytest.approx(np.trace(m["confusion"]) / 2038)
    assert results["config"]["shard_size"] == 8192 and results["config"]["device"] == "auto"
    assert results["shards"]["count"] == {"train": 2, "valid": 1}
    assert results["shards"]["files_decoded"] + results["shards"]["files_reused"] == 14434
    assert results["throughput"]["decode_files_per_s"] > 0
    memory = results["memory"]
    assert memory["workers"] >= 1 and 0 < memory["driver_peak_rss_bytes"] and 0 < memory["worker_peak_rss_bytes"]
    assert results["ray"]["cluster_resources"]["CPU"] >= 1
    assert {"ray_init", "scan", "decode", "prototypes", "classify", "total"} <= set(results["elapsed_s"])
    assert len(results["data"]["fingerprint"]) == 32


def test_second_run_reuses_every_chunk_and_agrees(sample_run, mnist_sample_tgz, cache_dir, tmp_path):
    _, first_out, first = sample_run
    run = run_job("--data", str(mnist_sample_tgz), "--out", str(tmp_path), "--cache-dir", str(cache_dir))
    assert run.returncode == 0, run.stderr
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["shards"]["files_reused"] == 14434 and again["shards"]["files_decoded"] == 0
    assert again["metrics"] == first["metrics"] and again["data"]["fingerprint"] == first["data"]["fingerprint"]
    assert again["prototypes_sha256"] == first["prototypes_sha256"]
    assert np.load(tmp_path / "prototypes.npy").tobytes() == np.load(first_out / "prototypes.npy").tobytes()
    # The four class folders, extracted seconds before, have settled: their listings are kept
    # beside the chunks for the next run.
    assert len(list((Path(again["shards"]["chunk_dir"]) / ".listings").glob("*.npz"))) == 4


def test_prototype_images_are_viewable(sample_run):
    _, out, results = sample_run
    for name in results["classes"]:
        with Image.open(out / f"prototype_{name}.png") as image:
            assert (image.mode, image.size) == ("L", (28, 28))
            pixels = np.asarray(image)
        assert 0 < pixels.mean() < 255 and pixels.max() > 100  # a visible digit, not blank
    with Image.open(out / "prototypes.png") as sheet:
        assert sheet.size == (2 * 28 * 8, 28 * 8)


def test_missing_data_is_one_line_exit_1(tmp_path):
    run = run_job("--data", str(tmp_path / "nowhere.tgz"), "--out", str(tmp_path / "out"))
    assert run.returncode == 1
    assert f"error: data: {tmp_path / 'nowhere.tgz'} does not exist" in run.stderr
    assert "Traceback" not in run.stderr


def test_bad_image_stops_the_job_with_its_name(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": {"3": 5, "7": 5}, "valid": {"3": 3, "7": 3}})
    (data / "valid" / "7" / "1.png").write_bytes(b"not a png")
    run = run_job("--data", str(data), "--out", str(tmp_path / "out"), "--shard-size", "4")
    assert run.returncode == 1
    assert "error: 1 of 16 image files cannot be used (on_bad_file = error" in run.stderr
    assert "\n  valid/7/1.png: not an image\n" in run.stderr + "\n"
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_table_file_matches_stdout(sample_run):
    run, out, _ = sample_run
    assert (out / "table.txt").read_text().strip() in run.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.mark.parametrize("how", ["flag", "RAY_ADDRESS", "left by ray start"])
def test_a_cluster_that_is_not_there_fails_at_once_and_says_where_the_address_came_from(how, image_folder, tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    argv, env = ["--data", str(image_folder), "--out", str(tmp_path / "out")], {}
    if how == "flag":
        argv += ["--ray-address", address]
    elif how == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    else:  # what a `ray start` that died without `ray stop` leaves in Ray's temp dir
        temp = tmp_path / "ray-temp"
        (temp / "ray").mkdir(parents=True)
        (temp / "ray" / "ray_current_cluster").write_text(address + "\n")
        env["RAY_TMPDIR"] = str(temp)
    run = run_job(*argv, timeout=60, env_extra=env)  # ray.init() alone would retry for minutes
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"no Ray cluster answers at {address} (Connection refused)" in run.stderr
    expected = {"flag": "error: ray_address:", "RAY_ADDRESS": "error: RAY_ADDRESS:",
                "left by ray start": "`ray stop` clears it"}[how]
    assert expected in run.stderr and "--ray-address local" in run.stderr
    assert not (tmp_path / "out" / "results.json").exists()
