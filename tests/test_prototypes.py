import numpy as np
import pytest

from mnist37 import DatasetError
from mnist37.prototypes import PixelSums, pixel_sums, prototypes


def labelled_images(n=200, shape=(6, 7), num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n)


@pytest.mark.parametrize("in_class_order", [False, True])
def test_pixel_sums_match_a_direct_sum(in_class_order):
    images, labels = labelled_images(n=700)  # over 257 images of a class: more than one uint16 block
    if in_class_order:  # a folder's shard (classes in runs) and a container's (interleaved)
        labels = np.sort(labels)
    sums, counts = pixel_sums(images, labels, 3)
    assert sums.dtype == np.int64 and sums.shape == (3, 6, 7)
    for c in range(3):
        assert counts[c] == (labels == c).sum()
        np.testing.assert_array_equal(sums[c], images[labels == c].astype(np.int64).sum(axis=0))


def test_a_class_absent_from_a_shard_sums_to_zero():
    images, _ = labelled_images(10)
    sums, counts = pixel_sums(images, np.zeros(10, dtype=int), 3)
    assert counts.tolist() == [10, 0, 0] and not sums[1:].any()


@pytest.mark.parametrize("shard_size", [1, 3, 7, 64, 199, 200, 1000])
def test_merged_shard_sums_equal_whole_set_sums(shard_size):
    images, labels = labelled_images()
    whole = pixel_sums(images, labels, 3)
    parts = [pixel_sums(images[i:i + shard_size], labels[i:i + shard_size], 3)
             for i in range(0, len(images), shard_size)]
    for order in (parts, parts[::-1], parts[1::2] + parts[::2]):
        merged = PixelSums.zeros(3, (6, 7))
        for sums, counts in order:
            merged.add(sums, counts)
        np.testing.assert_array_equal(merged.sums, whole[0])
        np.testing.assert_array_equal(merged.counts, whole[1])
        assert merged.prototypes("abc", "train").tobytes() == prototypes(*whole, "abc", "train").tobytes()


def test_prototypes_are_float32_means_in_unit_range():
    images, labels = labelled_images()
    protos = prototypes(*pixel_sums(images, labels, 3), ["a", "b", "c"], "train")
    assert protos.dtype == np.float32 and protos.shape == (3, 6, 7)
    for c in range(3):
        expected = images[labels == c].astype(np.float64).mean(axis=0) / 255
        np.testing.assert_allclose(protos[c], expected, rtol=1e-6)
    assert 0 <= protos.min() and protos.max() <= 1


def test_merging_leaves_the_parts_untouched():
    images, labels = labelled_images()
    first = pixel_sums(images[:100], labels[:100], 3)
    before = first[0].copy()
    merged = PixelSums.zeros(3, (6, 7))
    merged.add(*first)
    merged.add(*pixel_sums(images[100:], labels[100:], 3))
    np.testing.assert_array_equal(first[0], before)


def test_errors():
    images, _ = labelled_images(10)
    with pytest.raises(DatasetError, match=r"Class 'b' has no images under train/"):
        prototypes(*pixel_sums(images, np.zeros(10, dtype=int), 2), ["a", "b"], "train")
    with pytest.raises(DatasetError, match=r"Class 'a' has no images under train/"):
        PixelSums.zeros(2, (6, 7)).prototypes(["a", "b"], "train")
