"""The checks that say whether a device classifies right (tests/gpu_agreement.py), and, where
CUDA is, the GPU's correctness itself: CUDA's distances and predictions against the CPU's, the
exact distances and a NumPy float64 reference, on real MNIST, a color copy of it and data sets
of many classes made in memory (what jobs/gpu_check.py checks on a lent GPU machine).

The comparison logic (ulps, proven ties, the difference listing) is tested on real tensors from
classify_images and both distance layouts, and the reference fails on wrong predictions. The
`cuda` tests skip where no CUDA device is visible, under CI too (tests/conftest.py):

    python3 -m pytest tests/test_gpu_agreement.py tests/test_classify.py
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist37 import classify as classify_module
from mnist37.classify import classify_images
from mnist37.distances import PIXEL_VALUES
from mnist37.config import load
from mnist37.locate import locate
from tests import decoded_sets as sets
from tests import gpu_agreement as check
from tests.conftest import PROJECT_ROOT

needs_cuda = pytest.mark.cuda  # skipped where no CUDA device is visible (tests/conftest.py), CI included


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
    split = sets.EvalSplit(images, labels, ["valid/a/0.png", "valid/c/1.png", "valid/a/2.png"])
    return images, labels, protos, split, exact


def outcome(images, labels, protos) -> sets.Outcome:
    done = classify_images(images, labels, protos, ["l1", "l2"], "cpu")
    return sets.Outcome("cpu", done.confusions, {m: t.numpy() for m, t in done.predicted.items()},
                         {m: t.numpy() for m, t in done.distances.items()}, 0.0)


def copied(o: sets.Outcome) -> sets.Outcome:
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


def tie_training_set() -> sets.EvalSplit:
    """Training images whose class means are tie_problem's prototypes exactly: class 0 has one
    image with pixel (0, 0) white and one black (mean 0.5 there), class 1 likewise at (0, 1),
    class 2 one white image."""
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    images[0, 0, 0] = images[2, 0, 1] = 255
    images[4] = 255
    return sets.EvalSplit(images, np.array([0, 0, 1, 1, 2]), [""] * 5)


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
        check.reference(sets.EvalSplit(images[:2], np.array([0, 1]), ["", ""]), split, 3, ["l1"])
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
    data = sets.decode_set("mnist_sample", cfg, workers=1)
    split, train = sets.eval_split(data), sets.read_split(data.train_chunks)
    references = check.reference(train, split, 2, ["l1"])
    assert all(a.ok for a in check.agree(sets.classify_set(data, "cpu"), references, split))
    swapped = sets.classify_split(split, data.prototypes[::-1].copy(), ["l1"], "cpu")  # 3s' mean as 7s' and back
    [a] = check.agree(swapped, references, split)
    assert not a.ok and len(a.wrong) > 1900 and round(a.reference_accuracy, 4) == 0.9511


# Class counts the distance check runs on data made in memory (sets.synthetic_problem), on
# the CPU and, where there is one, CUDA. Issue 33 (classify's distance kernels) adds 1000 here
# once its kernels take that many classes; jobs/gpu_check.py --synthetic-classes 1000 runs it on a lent GPU.
DISTANCE_CASES = [2, 10, 37]


@pytest.mark.parametrize("num_classes", DISTANCE_CASES)
def test_many_classes_agree_with_the_reference(num_classes):
    train, split, prototypes = sets.synthetic_problem(num_classes)
    assert split.images.shape == (4 * num_classes, 28, 28) and len(train.images) == 8 * num_classes
    references = check.reference(train, split, num_classes, ["l1", "l2"])
    exact = {m: check.exact_distances(split.images, prototypes, m) for m in ("l1", "l2")}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        done = sets.classify_split(split, prototypes, ["l1", "l2"], device, chunk_images=50)
        assert all(a.ok for a in check.agree(done, references, split)), device
        assert all(e.ok for e in check.exactness(done, exact, 784)), device
        assert round(check.mean_class_accuracy(references["l2"].confusion), 4) == 1.0  # well separated classes


def test_reference_blocks_keep_a_thousand_classes_in_bounds():
    assert check.block_images(10, 784) == 534 and check.block_images(1000, 784) == 5
    assert check.block_images(10 ** 7, 784) == 1


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
        outcomes[device] = sets.Outcome(device, done.confusions,
                                         {m: t.cpu().numpy() for m, t in done.predicted.items()},
                                         {m: t.cpu().numpy() for m, t in done.distances.items()}, 0.0)
    exact = {m: check.exact_distances(images, protos, m) for m in ("l1", "l2")}
    for o in outcomes.values():
        pixels_per_image = int(np.prod(shape))
        assert all(e.ok for e in check.exactness(o, exact, pixels_per_image)), check.exactness(o, exact, pixels_per_image)
    comparison = check.compare(outcomes["cpu"], outcomes["cuda"], sets.EvalSplit(images, labels, list(range(5000))),
                               exact)
    assert comparison.ok, [check.format_difference(d, list("0123456789")) for d in comparison.differences]


def test_verify_lists_every_failure_and_passes_ties():
    images, labels, protos, split, _ = tie_problem()
    cpu = outcome(images, labels, protos)
    tied = copied(cpu)
    tied.device = "cuda"
    tied.predicted["l1"][0] = 1  # image 0 lies exactly between classes a and b
    verdict = check.verify("tiny", ["a", "b", "c"], ["l1", "l2"], protos, tie_training_set(), split,
                           {"cpu": cpu, "cuda": tied})
    assert verdict.ok and verdict.near["l1"].tolist() == [True, False, True]
    assert "cpu vs cuda, l1: 1 predictions differ on 3 images; distances at most 0 ulps apart" in verdict.findings
    assert any(line.startswith("  l1 valid/a/0.png (true a): cpu says a, gpu says b; ") and line.endswith(
        "a proven tie") for line in verdict.findings)
    wrong = copied(tied)
    wrong.predicted["l2"][1] = 0  # image 1 is prototype c itself
    wrong.distances["l2"][2, 1] *= np.float32(1.001)
    verdict = check.verify("tiny", ["a", "b", "c"], ["l1", "l2"], protos, tie_training_set(), split,
                           {"cpu": cpu, "cuda": wrong})
    assert verdict.failures == [
        "tiny cuda l2: 1 predictions differ from the NumPy float64 reference beyond a tie",
        "tiny cuda l2 distances off by " + f"{check.exactness(wrong, {'l2': check.exact_distances(images, protos, 'l2')}, 16)[0].worst:.2f}"
        + " times float32's error bound",
        "tiny: 1 predictions differ between cpu and cuda beyond a proven float32 tie"]


def real_data_set(name: str, request, cache_dir, tmp_path) -> sets.DecodedSet:
    """mnist_sample, its color copy ([N, 3, 28, 28]) or full MNIST, decoded afresh in this process."""
    sample = load(None, data=str(request.getfixturevalue("mnist_sample_tgz")), cache_dir=str(cache_dir),
                  chunk_dir=str(tmp_path / "sample"), reuse_chunks=False)
    if name == "mnist":
        cfg = load(PROJECT_ROOT / "configs" / "mnist.toml", data=str(request.getfixturevalue("mnist_png_tgz")),
                   cache_dir=str(cache_dir), chunk_dir=str(tmp_path / "mnist"), reuse_chunks=False)
    elif name == "color":
        color = sets.color_copy(Path(locate(sample).root), tmp_path / "color-data")
        cfg = load(None, data=str(color), channels="rgb", chunk_dir=str(tmp_path / "color"), reuse_chunks=False)
    else:
        cfg = sample
    return sets.decode_set(name, cfg, workers=1)  # in this process: CUDA may be in use here already


@needs_cuda
@pytest.mark.parametrize("name", ["mnist_sample", "color", "mnist"])
def test_cuda_classifies_real_mnist_as_the_cpu_and_the_reference_do(name, request, cache_dir, tmp_path):
    """The GPU's correctness half of jobs/gpu_check.py: every image's prediction on CUDA equal
    to the CPU's and the NumPy float64 reference's but at a proven float32 tie, every distance
    within float32's error bound of the exact one."""
    data = real_data_set(name, request, cache_dir, tmp_path)
    split = sets.eval_split(data)
    outcomes = {device: sets.classify_set(data, device) for device in ("cpu", "cuda")}
    assert outcomes["cuda"].device.startswith("cuda") and len(split.images) == data.counts[data.cfg.eval_split]
    verdict = check.verify(name, data.classes, data.cfg.metrics, data.prototypes, sets.read_split(data.train_chunks),
                           split, outcomes)
    assert verdict.ok, verdict.failures + verdict.findings
    if name == "mnist_sample":  # fastbook's figure, found by the reference and by CUDA
        assert "cuda l1 vs the NumPy float64 reference: mean class accuracy 0.9511, reference 0.9511; " \
               "2,038 predictions the same" in verdict.findings
