"""Full MNIST (10 classes, 70,000 images) through the real job, checked against a plain NumPy
computation over the same files: one process, no shards, no Ray, no torch."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_evaluate_job import run_job

pytestmark = pytest.mark.ray  # the job on full MNIST


@pytest.fixture(scope="module")
def full_run(mnist_png_tgz, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist")
    run = run_job("--config", "configs/mnist.toml", "--data", str(mnist_png_tgz), "--out", str(out),
                  "--cache-dir", str(cache_dir), timeout=600)
    assert run.returncode == 0, run.stderr
    return run, out, json.loads((out / "results.json").read_text())


def load(folder: Path) -> np.ndarray:
    return np.stack([np.array(Image.open(f)) for f in sorted(folder.glob("*.png"))])


def test_ten_classes_equal_a_plain_numpy_computation(full_run):
    run, out, results = full_run
    root = Path(results["data"]["root"])
    classes = [str(d) for d in range(10)]
    assert results["classes"] == classes
    assert sum(results["counts"]["training"].values()) == 60_000 and sum(results["counts"]["testing"].values()) == 10_000
    means = np.stack([load(root / "training" / c).astype(np.float64).mean(axis=0) / 255 for c in classes])
    np.testing.assert_array_equal(np.load(out / "prototypes.npy"), means.astype(np.float32))
    protos = means.astype(np.float32).astype(np.float64).reshape(10, -1)
    confusion = {"l1": np.zeros((10, 10), dtype=np.int64), "l2": np.zeros((10, 10), dtype=np.int64)}
    for true, c in enumerate(classes):
        x = load(root / "testing" / c).astype(np.float64).reshape(-1, 1, 784) / 255 - protos[None]
        for metric, dist in (("l1", np.abs(x).mean(-1)), ("l2", np.sqrt((x ** 2).mean(-1)))):
            np.add.at(confusion[metric], (true, dist.argmin(axis=1)), 1)
    for metric in ("l1", "l2"):
        assert results["metrics"][metric]["confusion"] == confusion[metric].tolist(), metric
    table = (out / "table.txt").read_text()
    print(table)
    assert all(f"{results['metrics']['l1']['per_class'][c]:.4f}" in table for c in classes)
