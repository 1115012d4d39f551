"""Top-k: whether each image's true class is among its k nearest prototypes, against the
float64 computation straight from the definition and, at constructed near-ties and exact ties,
against exact (Fraction) sums; ties go to the earlier class as in `nearest`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnist37.classify import classify_images
from mnist37.distances import in_top_k, nearest
from tests.test_classify import exact_reference, near_ties, problem


def ranks(sums: np.ndarray, true: np.ndarray) -> np.ndarray:
    """int64 [N]: the classes before the true one (sum less, or equal and earlier), from `sums`
    [N, C] of any exact-comparable type (float64, Fractions)."""
    out = []
    for row, t in zip(sums, true):
        out.append(sum(1 for c, s in enumerate(row) if s < row[t] or (s == row[t] and c < t)))
    return np.array(out)


def float64_sums(images, protos, metric):
    x = images.reshape(len(images), -1).astype(np.float64)[:, None] / 255 - \
        protos.reshape(len(protos), -1).astype(np.float64)[None]
    return (np.abs(x) if metric == "l1" else x ** 2).sum(-1)


@pytest.mark.parametrize("num_classes,shape", [(2, (6, 6)), (10, (28, 28)), (1000, (4, 4, 3))])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_is_the_float64_ranks(num_classes, shape, k):
    images, _, protos = problem(n=400, num_classes=num_classes, shape=shape, seed=num_classes + k)
    rng = np.random.default_rng(k)
    for metric in ("l1", "l2"):
        sums = float64_sums(images, protos, metric)
        # each image's true class at a random rank up to 2k, so that about half are in the top k
        order = np.argsort(sums, axis=1, kind="stable")
        labels = order[np.arange(len(images)), rng.integers(0, min(2 * k, num_classes), len(images))]
        done = classify_images(images, labels, protos, [metric], "cpu", top_k=k)
        expected = ranks(sums, labels) < k
        np.testing.assert_array_equal(done.top_k[metric].numpy(), expected)
        if k == 1:  # top-1 is the prediction
            np.testing.assert_array_equal(expected, done.predicted[metric].numpy() == labels)
        if num_classes > k:
            assert 0 < expected.sum() < len(images)


def crowded(rng, shape, n=10, ulps=12):
    """Images each with a crowd of prototypes as near to it as float32 allows: A near the image,
    then copies of A with one pixel moved one ulp toward or away from the image (exactly nearer
    or farther by far less than a float32 ulp of the sum), exact copies of A (equal prototypes)
    and A with two pixels swapped where the image is 0 (an exact tie with A), all in a shuffled
    class order; plus random far prototypes. Returns images and prototypes."""
    images, protos = [], []
    size = int(np.prod(shape))
    for _ in range(n):
        image = rng.integers(0, 256, size, dtype=np.uint8)
        image[:2] = 0
        a = np.clip(image / 255 + rng.uniform(-0.05, 0.05, size), 0, 1).astype(np.float32)
        crowd = [a, a.copy(), a.copy()]
        crowd[2][[0, 1]] = a[[1, 0]]
        for _ in range(ulps):
            b = a.copy()
            i = 2 + int(rng.integers(0, size - 2))
            b[i] = np.nextafter(a[i], np.float32(image[i] / 255) if rng.random() < 0.5 else np.float32(2 * a[i] + 1))
            crowd.append(b)
        images.append(image)
        protos.extend(crowd)
    protos.extend(rng.random((5, size), dtype=np.float32))
    order = rng.permutation(len(protos))
    return np.stack(images).reshape(n, *shape), np.stack(protos)[order].reshape(len(protos), *shape)


@pytest.mark.parametrize("shape", [(6, 6), (4, 4, 3)])
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_near_ties_at_the_k_th_place_go_where_the_exact_sums_say(shape, metric):
    rng = np.random.default_rng(7)
    images, protos = crowded(rng, shape)
    exact = exact_reference(images, protos, metric)
    float32 = float64_sums(images, protos, metric).astype(np.float32)
    flat, flat_protos = torch.from_numpy(images.reshape(len(images), -1)), torch.from_numpy(protos.reshape(len(protos), -1))
    _, sums = nearest(flat, flat_protos, metric)
    for true_rank in (0, 1, 3, 8, 14):
        # the true class of each image: the one at that exact rank, so the k-th place is a near-tie
        order = [sorted(range(len(row)), key=lambda c: (row[c], c)) for row in exact]
        true = np.array([o[true_rank] for o in order])
        assert (ranks(exact, true) == true_rank).all()
        assert (ranks(float32, true) != true_rank).any()  # float32 sums cannot tell
        for k in (true_rank, true_rank + 1):
            expected = ranks(exact, true) < k
            got = in_top_k(flat, flat_protos, torch.from_numpy(true), sums, metric, k) if k else None
            if k:
                np.testing.assert_array_equal(got.numpy(), expected)
            done = classify_images(images, true, protos, [metric], "cpu", top_k=k)
            if k:
                np.testing.assert_array_equal(done.top_k[metric].numpy(), expected)
            else:
                assert done.top_k == {}


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_near_ties_of_nearest_and_top_1_agree(metric):
    """near_ties' pairs, the true class the pair's loser: out of the top 1, in the top 2."""
    images, protos, winners = near_ties(np.random.default_rng(3), (6, 6), 8)
    exact = exact_reference(images, protos, metric)
    losers = np.array([min((c for c in range(len(row)) if c != w), key=lambda c: (row[c], c))
                       for row, w in zip(exact, winners)])
    assert (ranks(exact, losers) == 1).all()
    for k, expected in ((1, False), (2, True)):
        done = classify_images(images, losers, protos, [metric], "cpu", top_k=k)
        assert (done.top_k[metric].numpy() == expected).all()


def test_equal_prototypes_rank_by_class_order():
    images, labels, protos = problem(n=200, num_classes=4, shape=(6, 6), seed=5)
    protos = np.concatenate([protos, protos[[1]]])  # class 4 equals class 1: always just after it
    for true in (np.full(len(images), 1), np.full(len(images), 4)):
        done = classify_images(images, true, protos, ["l1"], "cpu", top_k=2)
        expected = ranks(float64_sums(images, protos, "l1"), true) < 2
        np.testing.assert_array_equal(done.top_k["l1"].numpy(), expected)
    assert not done.top_k["l1"].numpy()[ranks(float64_sums(images, protos, "l1"), np.full(len(images), 1)) == 1].any()


@pytest.mark.cuda  # skipped where no CUDA device is visible (tests/conftest.py)
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_cuda_top_k_is_the_cpu_one(metric):
    images, _, protos = problem(n=2048, num_classes=1000, shape=(16, 16, 3), seed=1)
    labels = np.argsort(float64_sums(images, protos, metric), axis=1, kind="stable")[np.arange(len(images)),
                                                                                    np.arange(len(images)) % 10]
    crowd_images, crowd_protos = crowded(np.random.default_rng(4), (16, 16, 3))
    crowd_labels = np.zeros(len(crowd_images), dtype=np.int64)
    for imgs, ps, true in ((images, protos, labels), (crowd_images, crowd_protos, crowd_labels)):
        cpu = classify_images(imgs, true, ps, [metric], "cpu", top_k=5)
        cuda = classify_images(imgs, true, ps, [metric], "cuda", top_k=5)
        np.testing.assert_array_equal(cuda.top_k[metric].cpu().numpy(), cpu.top_k[metric].numpy())
