"""Prototypes: per-class integer pixel sums, reduced exactly, divided once into mean images.

Shards return sums and counts, never means: int64 sums add up exactly in any order, so the
prototypes are bit-identical for any shard size and any number of workers.

A shard's sums cover only the classes it holds (`ClassSums`: k rows for k classes), so a shard
of 3 of 1,000 classes at 224x224x3 carries 3.6 MB of sums, not 1.2 GB; the driver adds them
into one `int64 [C, *image shape]` (`PixelSums`) and divides class by class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mnist37 import DatasetError

# uint8 pixels are 0..PIXEL_MAX; prototypes and distances work on pixels / PIXEL_MAX, in [0, 1].
PIXEL_MAX = 255.0


# 257 uint8 images add up to at most 255 * 257 = 65535: exact in uint16, which numpy sums
# ~3x faster than into int64; blocks of them are then added in int64.
_UINT16_BLOCK = 257


@dataclass
class ClassSums:
    """One shard's pixel sums, for the classes it holds and no other."""

    classes: np.ndarray  # int64 [k], ascending indices into the class list, each with images
    sums: np.ndarray  # int64 [k, *image shape]: row j sums the images of class classes[j]
    counts: np.ndarray  # int64 [k], images per class, each > 0

    def per_class(self, num_classes: int) -> np.ndarray:
        """The counts as `int64 [num_classes]`, 0 for classes the shard does not hold."""
        counts = np.zeros(num_classes, dtype=np.int64)
        counts[self.classes] = self.counts
        return counts


def pixel_sums(images: np.ndarray, class_indices: np.ndarray) -> ClassSums:
    """Per-class sums of `uint8 [N, H, W]` (or `[N, 3, H, W]`) images, for the classes present
    in `class_indices` (`int [N]`) only."""
    class_indices = np.asarray(class_indices)
    per_class = np.bincount(class_indices).astype(np.int64) if len(class_indices) else np.zeros(0, np.int64)
    present = np.flatnonzero(per_class)
    sums = np.zeros((len(present), *images.shape[1:]), dtype=np.int64)
    # In class order (a folder's shard), each class is one run of images. Otherwise (a
    # container's records) the images are visited in class order, a block at a time gathered
    # into one small buffer that stays in cache, rather than a mask and a copy per class or a
    # gather of the whole shard into fresh memory.
    order = None
    if len(class_indices) > 1 and (class_indices[1:] < class_indices[:-1]).any():
        order = np.argsort(class_indices, kind="stable")
        block = np.empty((min(_UINT16_BLOCK, len(images)), *images.shape[1:]), dtype=images.dtype)
    ends = np.cumsum(per_class)
    for row, c in enumerate(present):
        for start in range(ends[c] - per_class[c], ends[c], _UINT16_BLOCK):
            stop = min(start + _UINT16_BLOCK, ends[c])
            run = images[start:stop] if order is None else np.take(images, order[start:stop], axis=0,
                                                                   out=block[:stop - start])
            sums[row] += run.sum(axis=0, dtype=np.uint16)
    return ClassSums(present.astype(np.int64), sums, per_class[present])


@dataclass
class PixelSums:
    """Per-class pixel sums and image counts of a whole split, added up shard by shard in any
    order. `zeros` allocates untouched (calloc'd) memory: a class's rows become resident once
    a shard holding it is added."""

    sums: np.ndarray  # int64 [C, *image shape]
    counts: np.ndarray  # int64 [C]

    @classmethod
    def zeros(cls, num_classes: int, shape: tuple[int, ...]) -> PixelSums:
        return cls(np.zeros((num_classes, *shape), dtype=np.int64), np.zeros(num_classes, dtype=np.int64))

    def add(self, shard: ClassSums) -> None:
        """Add one shard's `ClassSums`, row by row into its classes (no [k, ...] temporary);
        exact in any order."""
        for row, c in enumerate(shard.classes):
            self.sums[c] += shard.sums[row]
        self.counts[shard.classes] += shard.counts

    def prototypes(self, classes: Sequence[str], split: str) -> np.ndarray:
        return prototypes(self.sums, self.counts, classes, split)


def prototypes(sums: np.ndarray, counts: np.ndarray, classes: Sequence[str], split: str) -> np.ndarray:
    """Mean images in [0, 1]: `float32 [C, H, W]` = sums / counts / PIXEL_MAX, divided in float64.

    One class at a time, so the float64 quotients never exist for all classes at once (2.4 GB
    at 1,000 classes x 224x224x3); each value is the same float64 division and rounding to
    float32 as a division of the whole array."""
    for name, count in zip(classes, counts):
        if count == 0:
            raise DatasetError(f"Class {name!r} has no images under {split}/")
    means = np.empty(sums.shape, dtype=np.float32)
    for c in range(len(sums)):
        means[c] = sums[c] / counts[c] / PIXEL_MAX
    return means
