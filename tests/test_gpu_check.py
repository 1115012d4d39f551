"""jobs/gpu_check.py, the check a lead runs on a lent GPU machine: without CUDA it refuses to
pass (exit 1) unless asked for its CPU half alone; that half end to end on real MNIST and a small
PNG folder (as a lent GPU machine runs it: no Ray, no pyspng); and its throughput study
(benchmarks/gpu_throughput/), whose every timed call's predictions are checked. The checks
themselves (tests/gpu_agreement.py) are tested in tests/test_gpu_agreement.py."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.gpu_throughput import gpu_throughput as study
from mnist37.classify import classify_images
from tests.conftest import PROJECT_ROOT, make_image_folder
from tests.decoded_sets import EvalSplit

# Runs the job as the device machine would: `import ray` and `import pyspng` fail.
AS_ON_DEVICE = ("import runpy, sys; sys.modules['ray'] = sys.modules['pyspng'] = None; "
                "sys.argv = ['jobs/gpu_check.py', *sys.argv[1:]]; "
                "runpy.run_path('jobs/gpu_check.py', run_name='__main__')")


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AS_ON_DEVICE, *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.no_cuda  # where CUDA is visible the GPU half would run
def test_without_cuda_the_check_fails_in_one_line_before_any_work(mnist_sample_tgz, cache_dir):
    run = run_check("--data", str(mnist_sample_tgz), "--sample", str(mnist_sample_tgz), "--cache-dir", str(cache_dir))
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [
        f"error: no CUDA device visible to torch {torch.__version__}: the GPU check cannot check the CUDA path here "
        "(--cpu-only runs its CPU half alone)"]


@pytest.mark.no_cuda  # where CUDA is visible the GPU half would run
def test_cpu_half_without_cuda_ray_or_pyspng(mnist_sample_tgz, cache_dir, tmp_path):
    # Real mnist_sample; for --data, a small folder in full MNIST's layout (training/ and
    # testing/, digits 0-9); a 37-class set made in memory: all checked against the NumPy reference.
    digits = make_image_folder(tmp_path / "digits", {"training": {str(d): 12 for d in range(10)},
                                                     "testing": {str(d): 5 for d in range(10)}}, shape=(28, 28))
    run = run_check("--data", str(digits), "--sample", str(mnist_sample_tgz), "--cache-dir", str(cache_dir),
                    "--cpu-batches", "1000", "4096", "--reps", "2", "--warmup", "0", "--cpu-only",
                    "--synthetic-classes", "37")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "PNG decoder: Pillow (no pyspng)" in out
    visible = "present, not used" if torch.cuda.is_available() else "not visible"
    assert [line for line in out.splitlines() if "CUDA" in line] == [
        f"--cpu-only: the CPU half alone (torch {torch.__version__}, CUDA {visible})"]
    assert "mnist: decoded training 120 + testing 50 images (10 classes, 2 shards)" in out
    assert "mnist_sample: decoded train 12,396 + valid 2,038 images (2 classes, 3 shards)" in out
    assert "color: decoded train 1,200 + valid 1,200 images (2 classes, 2 shards)" in out
    assert "color: valid split, 1,200 images, cpu " in out  # classified in three channels
    assert "synthetic 37 classes: train 296, evaluation 148 images 28x28, cpu " in out
    # fastbook's figures, found by the reference's own float64 means and distances, and by mnist37 on the CPU.
    assert ("  cpu l1 vs the NumPy float64 reference: mean class accuracy 0.9511, reference 0.9511; "
            "2,038 predictions the same") in out
    agreements = [line for line in out.splitlines() if "vs the NumPy float64 reference" in line]
    assert len(agreements) == 8 and all(" predictions the same" in line for line in agreements)  # 4 sets x 2 metrics
    assert "mean of classes  0.9511  0.9661" in out  # mnist_sample's l1 and l2 table row
    exactness = [line for line in out.splitlines() if "distances vs exact" in line]
    assert len(exactness) == 8 and all(line.endswith("of float32's error bound: ok") for line in exactness)
    header = next(line for line in out.splitlines() if line.split()[:3] == ["batch", "device", "host"])
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("1,000", "4,096")]
    assert "images/s" in header and "input GB/s" in header and "median s" in header
    assert [(r[0], r[1], r[2], r[6], r[7:]) for r in rows] == [
        ("1,000", "cpu", "pageable", "2", ["as", "expected"]), ("4,096", "cpu", "pageable", "2", ["as", "expected"])]
    assert all(float(r[3].replace(",", "")) > 0 for r in rows)
    assert out.rstrip().splitlines()[-1].startswith("CPU half passed in ")
    assert "Traceback" not in run.stderr


def test_bad_data_is_one_error_line(mnist_sample_tgz, cache_dir):
    # mnist_sample has no training/ split: full MNIST's config cannot use it.
    run = run_check("--data", str(mnist_sample_tgz), "--sample", str(mnist_sample_tgz), "--cache-dir", str(cache_dir),
                    "--cpu-only")
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and "training" in run.stderr and "Traceback" not in run.stderr


def test_throughput_checks_every_calls_predictions():
    rng = np.random.default_rng(3)
    split = EvalSplit(rng.integers(0, 256, (50, 6, 6), dtype=np.uint8), rng.integers(0, 3, 50), [""] * 50)
    protos = rng.random((3, 6, 6), dtype=np.float32)
    pixels, labels = study.tiled(split, 120, pinned=False)
    assert pixels.shape == (120, 6, 6) and labels.shape == (120,)
    assert (pixels[50:100] == split.images).all() and (pixels[100:] == split.images[:20]).all()
    assert (labels[100:] == split.class_indices[:20]).all()
    once = classify_images(split.images, split.class_indices, protos, ["l1"], "cpu")
    expected, none = {"l1": once.predicted["l1"].numpy()}, {"l1": np.zeros(50, dtype=bool)}
    timing = study.throughput(pixels, labels, protos, "cpu", 120, 2, 1, expected, none)
    assert (timing.device, timing.memory, timing.batch, len(timing.seconds), timing.wrong_calls, timing.tie_flips) == (
        "cpu", "pageable", 120, 2, 0, 0)
    assert timing.images_per_s == 120 / timing.median_s
    table = study.format_timings([timing], 36).splitlines()
    assert len(table) == 2 and table[1].split()[:3] == ["120", "cpu", "pageable"] and table[1].endswith("as expected")
    # Image 7 (rows 7, 57, 107 of the batch) expected in another class: wrong in all 3 calls,
    # unless image 7 is a tie.
    other = {"l1": expected["l1"].copy()}
    other["l1"][7] = (other["l1"][7] + 1) % 3
    assert study.throughput(pixels, labels, protos, "cpu", 120, 2, 1, other, none).wrong_calls == 3
    tie = {"l1": np.arange(50) == 7}
    flipped = study.throughput(pixels, labels, protos, "cpu", 120, 2, 1, other, tie)
    assert (flipped.wrong_calls, flipped.tie_flips) == (0, 3)
    assert study.format_timings([flipped], 36).endswith("as expected but 3 proven ties")
