import numpy as np
import pytest

from mnist37 import DatasetError
from mnist37.prototypes import ClassSums, PixelSums, pixel_sums, prototypes


def labelled_images(n=200, shape=(6, 7), num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n)


def direct_sums(images, labels, num_classes):
    """int64 [C, *image shape] and int64 [C], by a mask per class: what the sums must equal."""
    sums = np.stack([images[labels == c].astype(np.int64).sum(axis=0) for c in range(num_classes)])
    return sums, np.bincount(labels, minlength=num_classes).astype(np.int64)


def merged(parts, num_classes, shape):
    total = PixelSums.zeros(num_classes, shape)
    for part in parts:
        total.add(part)
    return total


@pytest.mark.parametrize("in_class_order", [False, True])
def test_pixel_sums_match_a_direct_sum(in_class_order):
    images, labels = labelled_images(n=700)  # over 257 images of a class: more than one uint16 block
    if in_class_order:  # a folder's shard (classes in runs) and a container's (interleaved)
        labels = np.sort(labels)
    sums = pixel_sums(images, labels)
    assert sums.sums.dtype == np.int64 and sums.sums.shape == (3, 6, 7) and sums.classes.tolist() == [0, 1, 2]
    expected, counts = direct_sums(images, labels, 3)
    np.testing.assert_array_equal(sums.sums, expected)
    assert sums.counts.tolist() == counts.tolist() == sums.per_class(3).tolist()


@pytest.mark.parametrize("in_class_order", [False, True])
def test_a_shard_of_3_of_1000_classes_keeps_3_rows_of_sums(in_class_order):
    images, _ = labelled_images(n=50, shape=(3, 4, 5))  # color: [N, 3, H, W]
    labels = np.random.default_rng(1).choice([5, 417, 998], 50)
    if in_class_order:
        labels = np.sort(labels)
    sums = pixel_sums(images, labels)
    assert sums.classes.tolist() == [5, 417, 998]
    assert sums.sums.shape == (3, 3, 4, 5) and sums.counts.shape == (3,)
    for row, c in enumerate([5, 417, 998]):
        np.testing.assert_array_equal(sums.sums[row], images[labels == c].astype(np.int64).sum(axis=0))
        assert sums.counts[row] == (labels == c).sum()
    per_class = sums.per_class(1000)
    assert per_class.shape == (1000,) and per_class.sum() == 50 and np.flatnonzero(per_class).tolist() == [5, 417, 998]


def test_an_empty_shard_keeps_no_sums():
    sums = pixel_sums(np.zeros((0, 6, 7), dtype=np.uint8), np.zeros(0, dtype=np.int64))
    assert sums.sums.shape == (0, 6, 7) and sums.classes.tolist() == [] and sums.per_class(4).tolist() == [0] * 4
    total = merged([sums], 4, (6, 7))
    assert not total.sums.any() and not total.counts.any()


@pytest.mark.parametrize("num_classes", [2, 10, 300])
@pytest.mark.parametrize("num_shards", [1, 7, 64])
def test_merged_shard_sums_equal_whole_set_sums(num_classes, num_shards):
    """Shard-count invariance: whatever the shards and the order they finish in, the merged
    sums, counts and prototypes are those of the whole set. Sorted labels give shards of a few
    classes each (a folder's shards); shuffled ones, shards of many."""
    images, labels = labelled_images(n=640, num_classes=num_classes, seed=num_classes)
    labels[:num_classes] = np.arange(num_classes)  # every class has an image
    whole, counts = direct_sums(images, labels, num_classes)
    expected = (whole / counts.reshape(-1, 1, 1) / 255.0).astype(np.float32)  # the direct mean
    bounds = np.linspace(0, len(images), num_shards + 1).astype(int)
    for order in (np.arange(len(labels)), np.argsort(labels, kind="stable")):
        imgs, labs = images[order], labels[order]
        parts = [pixel_sums(imgs[a:b], labs[a:b]) for a, b in zip(bounds, bounds[1:])]
        assert [p.classes.tolist() for p in parts] == [np.unique(labs[a:b]).tolist() for a, b in zip(bounds, bounds[1:])]
        for finished in (parts, parts[::-1], parts[1::2] + parts[::2]):
            total = merged(finished, num_classes, (6, 7))
            np.testing.assert_array_equal(total.sums, whole)
            np.testing.assert_array_equal(total.counts, counts)
            protos = total.prototypes([str(c) for c in range(num_classes)], "train")
            assert protos.tobytes() == expected.tobytes()


def test_prototypes_are_float32_means_in_unit_range():
    images, labels = labelled_images()
    protos = prototypes(*direct_sums(images, labels, 3), ["a", "b", "c"], "train")
    assert protos.dtype == np.float32 and protos.shape == (3, 6, 7)
    for c in range(3):
        expected = images[labels == c].astype(np.float64).mean(axis=0) / 255
        np.testing.assert_allclose(protos[c], expected, rtol=1e-6)
    assert 0 <= protos.min() and protos.max() <= 1


def test_prototypes_are_the_whole_array_division_bit_for_bit():
    """Class by class, the same float64 division and float32 rounding as one division of the
    whole array (what the prototypes were before, and what fixes results' prototypes_sha256)."""
    rng = np.random.default_rng(3)
    sums, counts = rng.integers(0, 255 * 6000, (10, 3, 5, 4)), rng.integers(1, 6000, 10)
    whole = (sums / counts.reshape(-1, 1, 1, 1) / 255.0).astype(np.float32)
    assert prototypes(sums, counts, list("abcdefghij"), "train").tobytes() == whole.tobytes()


def test_merging_leaves_the_parts_untouched():
    images, labels = labelled_images()
    first = pixel_sums(images[:100], labels[:100])
    before = first.sums.copy()
    merged([first, pixel_sums(images[100:], labels[100:])], 3, (6, 7))
    np.testing.assert_array_equal(first.sums, before)


def test_errors():
    images, _ = labelled_images(10)
    with pytest.raises(DatasetError, match=r"Class 'b' has no images under train/"):
        prototypes(*direct_sums(images, np.zeros(10, dtype=int), 2), ["a", "b"], "train")
    with pytest.raises(DatasetError, match=r"Class 'a' has no images under train/"):
        PixelSums.zeros(2, (6, 7)).prototypes(["a", "b"], "train")
    total = merged([ClassSums(np.array([1]), np.ones((1, 6, 7), dtype=np.int64), np.array([1]))], 3, (6, 7))
    with pytest.raises(DatasetError, match=r"Class 'a' has no images under train/"):
        total.prototypes(["a", "b", "c"], "train")
