"""jobs/gpu_check.py: without CUDA it refuses to pass (exit 1) unless asked for its CPU half
alone; that half end to end on real MNIST and a small PNG folder (as a lent GPU machine runs
it: no Ray, no pyspng); its comparison logic (ulps, proven ties, the difference listing) on
real tensors from classify_images and both distance layouts; and the NumPy float64 reference
every device's predictions are checked against, which fails on wrong predictions."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from mnist37 import classify as classify_module
from mnist37 import gpu_check as check
from mnist37.classify import PIXEL_VALUES, classify_images
from mnist37.config import load
from tests.conftest import PROJECT_ROOT, make_image_folder

needs_cuda = pytest.mark.cuda  # skipped where no CUDA device is visible (tests/conftest.py), CI included

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


def test_ulps_apart_counts_float32_steps():
    x = np.float32(0.1234)
    up = np.nextafter(np.nextafter(x, np.float32(1)), np.float32(1))
    assert check.ulps_apart(x, x) == 0
    assert check.ulps_apart(x, up) == 2 and check.ulps_apart(up, x) == 2
    # Across zero: -tiny, -0.0 / +0.0, +tiny are neighbours.
    tiny = np.float32(1e-45)
    assert check.ulps_apart(-tiny, tiny) == 2 and check.ulps_apart(np.float32(-0.0), np.float32(0.0)) == 0
    assert check.ulps_apart([1.0, 2.0], [1.0, 2.0]).tolist() == [0, 0]


def tie_problem():
    """Three 4x4 images and three prototypes: image 0 lies exactly between prototypes 0 and 1
    (each one pixel of 0.5 off a black image), image 1 is prototype 2 itself (far from the others)."""
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    images[1] = 255
    images[2, 0] = 255
    protos = np.zeros((3, 4, 4), dtype=np.float32)
    protos[0, 0, 0] = protos[1, 0, 1] = 0.5
    protos[2] = 1.0
    labels = np.array([0, 2, 0])
    exact = {m: check.exact_distances(images, protos, m) for m in ("l1", "l2")}
    split = check.EvalSplit(images, labels, ["valid/a/0.png", "valid/c/1.png", "valid/a/2.png"])
    return images, labels, protos, split, exact


def outcome(images, labels, protos) -> check.Outcome:
    done = classify_images(images, labels, protos, ["l1", "l2"], "cpu")
    return check.Outcome("cpu", done.confusions, {m: t.numpy() for m, t in done.predicted.items()},
                         {m: t.numpy() for m, t in done.distances.items()}, 0.0)


def copied(o: check.Outcome) -> check.Outcome:
    return dataclasses.replace(o, predicted={m: p.copy() for m, p in o.predicted.items()},
                               distances={m: d.copy() for m, d in o.distances.items()})


def test_a_difference_at_an_exact_tie_is_proven_and_listed_with_both_distances():
    images, labels, protos, split, exact = tie_problem()
    cpu = outcome(images, labels, protos)
    assert cpu.distances["l1"][0, 0] == cpu.distances["l1"][0, 1] and cpu.predicted["l1"][0] == 0
    # The other device saw class 1 one ulp closer and picked it: allowed, since the two are tied.
    other = copied(cpu)
    other.predicted["l1"][0] = 1
    other.distances["l1"][0, 1] = np.nextafter(other.distances["l1"][0, 1], np.float32(0))
    comparison = check.compare(cpu, other, split, exact)
    assert comparison.ok and comparison.max_ulps == {"l1": 1, "l2": 0}
    [d] = comparison.differences
    assert (d.metric, d.row, d.path, d.true, d.picks, d.tie) == ("l1", 0, "valid/a/0.png", 0, (0, 1), True)
    assert d.cpu == (0.5 / 16, 0.5 / 16) and d.exact == (0.5 / 16, 0.5 / 16)
    assert d.gpu[1] < d.gpu[0] and 0 < d.bound[0] == d.bound[1] < 1e-5
    line = check.format_difference(d, ["a", "b", "c"])
    assert line.startswith("l1 valid/a/0.png (true a): cpu says a, gpu says b; ") and line.endswith("a proven tie")
    assert "(0 ulps apart)" in line and "(1 ulps apart)" in line


def test_a_difference_far_from_a_tie_fails_the_comparison():
    images, labels, protos, split, exact = tie_problem()
    cpu = outcome(images, labels, protos)
    other = copied(cpu)
    other.predicted["l2"][1] = 0  # image 1 is prototype 2 exactly, nowhere near prototype 0
    comparison = check.compare(cpu, other, split, exact)
    assert not comparison.ok
    [d] = comparison.differences
    assert (d.metric, d.row, d.picks, d.tie) == ("l2", 1, (2, 0), False)
    assert d.cpu[0] == 0.0 and d.cpu[1] > 0.9
    assert check.format_difference(d, ["a", "b", "c"]).endswith("NOT a tie: a distance is off by more than "
                                                                "float32's error bound")


def test_is_tie_needs_close_classes_and_every_distance_within_its_bound():
    exact, bound = (0.25, 0.25), (1e-6, 1e-6)
    assert check.is_tie((0.25, 0.25 + 5e-7), (0.25 + 5e-7, 0.25), exact, bound)
    assert not check.is_tie((0.25, 0.25 + 2e-6), (0.25 + 5e-7, 0.25), exact, bound)
    assert not check.is_tie((0.25, 0.25), (0.25, 0.25 - 2e-6), exact, bound)
    # Every distance within its bound, but the classes are further apart than the bounds reach.
    assert not check.is_tie((0.25, 0.25 + 3e-6), (0.25, 0.25 + 3e-6), (0.25, 0.25 + 3e-6), bound)


def test_error_bound_is_gamma_of_the_pixel_count_plus_two():
    # 784 pixels: (786 u) / (1 - 786 u), u = 2^-24, about 469 float32 ulps of a distance in [0.25, 0.5).
    bound = check.error_bound(np.array([0.3]), 784)[0]
    assert bound == pytest.approx(0.3 * 786 * 2.0 ** -24, rel=1e-4)
    assert 400 < bound / np.spacing(np.float32(0.3)) < 500


def test_exactness_flags_a_distance_beyond_the_bound():
    images, labels, protos, split, exact = tie_problem()
    cpu = outcome(images, labels, protos)
    assert all(e.ok and e.max_ulps == 0 for e in check.exactness(cpu, exact, 16))
    off = copied(cpu)
    off.distances["l2"][2, 1] *= np.float32(1.001)
    [l1, l2] = check.exactness(off, exact, 16)
    assert l1.ok and not l2.ok and l2.worst > 100 and l2.max_ulps > 1000
    assert check.format_exactness(l2).endswith("of float32's error bound: WRONG")


def test_exact_distances_start_from_the_devices_float32_pixels():
    assert np.array_equal(PIXEL_VALUES.numpy(), np.arange(256, dtype=np.float32) / np.float32(255))
    images, _, protos, _, _ = tie_problem()
    assert check.exact_distances(images, protos, "l1")[0].tolist() == [0.5 / 16, 0.5 / 16, 1.0]
    with pytest.raises(ValueError, match="Unknown metric 'l3'; expected one of l1, l2"):
        check.exact_distances(images, protos, "l3")


def tie_training_set() -> check.EvalSplit:
    """Training images whose class means are tie_problem's prototypes exactly: class 0 has one
    image with pixel (0, 0) white and one black (mean 0.5 there), class 1 likewise at (0, 1),
    class 2 one white image."""
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    images[0, 0, 0] = images[2, 0, 1] = 255
    images[4] = 255
    return check.EvalSplit(images, np.array([0, 0, 1, 1, 2]), [""] * 5)


def test_the_reference_finds_the_prototypes_and_the_first_of_tied_classes():
    images, labels, protos, split, exact = tie_problem()
    references = check.reference(tie_training_set(), split, 3, ["l1", "l2"])
    for metric, ref in references.items():
        assert np.array_equal(ref.distances, exact[metric])  # the same means, found from the images
        assert ref.predicted.tolist() == [0, 2, 0]  # image 0 and 2: tied between 0 and 1, the first wins
        assert ref.confusion.tolist() == [[2, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert all(a.ok and a.ties == [] and a.wrong == [] for a in check.agree(outcome(images, labels, protos),
                                                                             references, split))
    with pytest.raises(ValueError, match="class 2 has no training images"):
        check.reference(check.EvalSplit(images[:2], np.array([0, 1]), ["", ""]), split, 3, ["l1"])
    with pytest.raises(ValueError, match="Unknown metric 'l3'; expected one of l1, l2"):
        check.reference(tie_training_set(), split, 3, ["l3"])


def test_the_reference_fails_wrong_predictions_and_lets_ties_pass():
    images, labels, protos, split, exact = tie_problem()
    references = check.reference(tie_training_set(), split, 3, ["l1", "l2"])
    good = outcome(images, labels, protos)
    wrong = copied(good)
    wrong.predicted["l2"][1] = 0  # image 1 is prototype 2 itself: nowhere near a tie
    wrong.predicted["l1"][0] = 1  # image 0 lies exactly between prototypes 0 and 1: a tie
    [l1, l2] = check.agree(wrong, references, split)
    assert (l1.ok, l1.ties, l1.wrong) == (True, [0], [])
    assert (l2.ok, l2.ties, l2.wrong) == (False, [], [1])
    assert (l2.device_accuracy, l2.reference_accuracy) == (0.5, 1.0)
    line = check.format_agreement(l2, split, ["a", "b", "c"], wrong, references)
    assert line == ("cpu l2 vs the NumPy float64 reference: mean class accuracy 0.5000, reference 1.0000; WRONG: "
                    "1 of 3 predictions differ beyond a tie (first: valid/c/1.png, true c: says a, reference c)")
    assert check.format_agreement(l1, split, ["a", "b", "c"], wrong, references).endswith(
        "3 predictions the same but 1 proven ties")


def test_the_reference_fails_prototypes_of_the_wrong_classes_on_real_mnist(mnist_sample_tgz, cache_dir, tmp_path):
    cfg = load(None, data=str(mnist_sample_tgz), cache_dir=str(cache_dir), chunk_dir=str(tmp_path / "chunks"),
               reuse_chunks=False)
    data = check.decode_set("mnist_sample", cfg, workers=1)
    split, train = check.eval_split(data), check.read_split(data.train_chunks)
    references = check.reference(train, split, 2, ["l1"])
    assert all(a.ok for a in check.agree(check.classify_set(data, "cpu"), references, split))
    swapped = check.classify_split(split, data.prototypes[::-1].copy(), ["l1"], "cpu")  # 3s' mean as 7s' and back
    [a] = check.agree(swapped, references, split)
    assert not a.ok and len(a.wrong) > 1900 and round(a.reference_accuracy, 4) == 0.9511


# Class counts the distance check runs on data made in memory (check.synthetic_problem), on
# the CPU and, where there is one, CUDA. Issue 33 (classify's distance kernels) adds 1000 here
# once its kernels take that many classes; jobs/gpu_check.py --synthetic-classes 1000 runs it on a lent GPU.
DISTANCE_CASES = [2, 10, 37]


@pytest.mark.parametrize("num_classes", DISTANCE_CASES)
def test_many_classes_agree_with_the_reference(num_classes):
    train, split, prototypes = check.synthetic_problem(num_classes)
    assert split.images.shape == (4 * num_classes, 28, 28) and len(train.images) == 8 * num_classes
    references = check.reference(train, split, num_classes, ["l1", "l2"])
    exact = {m: check.exact_distances(split.images, prototypes, m) for m in ("l1", "l2")}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        done = check.classify_split(split, prototypes, ["l1", "l2"], device, chunk_images=50)
        assert all(a.ok for a in check.agree(done, references, split)), device
        assert all(e.ok for e in check.exactness(done, exact, 784)), device
        assert round(check.mean_class_accuracy(references["l2"].confusion), 4) == 1.0  # well separated classes


def test_reference_blocks_keep_a_thousand_classes_in_bounds():
    assert check.block_images(10, 784) == 534 and check.block_images(1000, 784) == 5
    assert check.block_images(10 ** 7, 784) == 1


def test_throughput_checks_every_calls_predictions():
    rng = np.random.default_rng(3)
    split = check.EvalSplit(rng.integers(0, 256, (50, 6, 6), dtype=np.uint8), rng.integers(0, 3, 50), [""] * 50)
    protos = rng.random((3, 6, 6), dtype=np.float32)
    pixels, labels = check.tiled(split, 120, pinned=False)
    assert pixels.shape == (120, 6, 6) and labels.shape == (120,)
    assert (pixels[50:100] == split.images).all() and (pixels[100:] == split.images[:20]).all()
    assert (labels[100:] == split.class_indices[:20]).all()
    once = classify_images(split.images, split.class_indices, protos, ["l1"], "cpu")
    expected, none = {"l1": once.predicted["l1"].numpy()}, {"l1": np.zeros(50, dtype=bool)}
    timing = check.throughput(pixels, labels, protos, "cpu", 120, 2, 1, expected, none)
    assert (timing.device, timing.memory, timing.batch, len(timing.seconds), timing.wrong_calls, timing.tie_flips) == (
        "cpu", "pageable", 120, 2, 0, 0)
    assert timing.images_per_s == 120 / timing.median_s
    table = check.format_timings([timing], 36).splitlines()
    assert len(table) == 2 and table[1].split()[:3] == ["120", "cpu", "pageable"] and table[1].endswith("as expected")
    # Image 7 (rows 7, 57, 107 of the batch) expected in another class: wrong in all 3 calls,
    # unless image 7 is a tie.
    other = {"l1": expected["l1"].copy()}
    other["l1"][7] = (other["l1"][7] + 1) % 3
    assert check.throughput(pixels, labels, protos, "cpu", 120, 2, 1, other, none).wrong_calls == 3
    tie = {"l1": np.arange(50) == 7}
    flipped = check.throughput(pixels, labels, protos, "cpu", 120, 2, 1, other, tie)
    assert (flipped.wrong_calls, flipped.tie_flips) == (0, 3)
    assert check.format_timings([flipped], 36).endswith("as expected but 3 proven ties")


def test_near_ties_are_images_whose_two_nearest_classes_are_within_their_bounds():
    images, labels, protos, split, exact = tie_problem()
    # Image 2 (a white top row) is as far from prototype 0's pixel as from prototype 1's: a tie too.
    assert check.near_ties(exact["l1"], 16).tolist() == [True, False, True]
    assert check.near_ties(exact["l1"][:, :1], 16).tolist() == [False, False, False]


@needs_cuda
@pytest.mark.parametrize("pinned, shape", [(False, (28, 28)), (True, (28, 28)), (True, (3, 16, 16))])
def test_cuda_predictions_match_the_cpu_to_a_tie(monkeypatch, pinned, shape):
    # Small batches: many copies through both device buffers (and staging buffers when unpinned);
    # and a color batch, [N, 3, H, W] against [C, 3, H, W] prototypes.
    monkeypatch.setattr(classify_module, "BATCH_IMAGES", 512)
    rng = np.random.default_rng(2)
    pixels = torch.from_numpy(rng.integers(0, 256, (5000, *shape), dtype=np.uint8))
    images = (pixels.pin_memory() if pinned else pixels).numpy()
    labels = rng.integers(0, 10, 5000)
    protos = rng.random((10, *shape), dtype=np.float32)
    outcomes = {}
    for device in ("cpu", "cuda"):
        done = classify_images(images, labels, protos, ["l1", "l2"], device)
        assert done.device.type == device
        outcomes[device] = check.Outcome(device, done.confusions,
                                         {m: t.cpu().numpy() for m, t in done.predicted.items()},
                                         {m: t.cpu().numpy() for m, t in done.distances.items()}, 0.0)
    exact = {m: check.exact_distances(images, protos, m) for m in ("l1", "l2")}
    for o in outcomes.values():
        pixels_per_image = int(np.prod(shape))
        assert all(e.ok for e in check.exactness(o, exact, pixels_per_image)), check.exactness(o, exact, pixels_per_image)
    comparison = check.compare(outcomes["cpu"], outcomes["cuda"], check.EvalSplit(images, labels, list(range(5000))),
                               exact)
    assert comparison.ok, [check.format_difference(d, list("0123456789")) for d in comparison.differences]
