"""Prototypes: per-class integer pixel sums, reduced exactly, divided once into mean images.

Shards return sums and counts, never means: int64 sums add up exactly in any order, so the
prototypes are bit-identical for any shard size and any number of workers.
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


def pixel_sums(images: np.ndarray, class_indices: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums of `uint8 [N, H, W]` images: (`int64 [C, H, W]`, counts `int64 [C]`)."""
    class_indices = np.asarray(class_indices)
    sums = np.zeros((num_classes, *images.shape[1:]), dtype=np.int64)
    counts = np.bincount(class_indices, minlength=num_classes).astype(np.int64)
    # In class order (a folder's shard), each class is one run of images. Otherwise (a
    # container's records) the images are visited in class order, a block at a time gathered
    # into one small buffer that stays in cache, rather than a mask and a copy per class or a
    # gather of the whole shard into fresh memory.
    order = None
    if len(class_indices) > 1 and (class_indices[1:] < class_indices[:-1]).any():
        order = np.argsort(class_indices, kind="stable")
        block = np.empty((min(_UINT16_BLOCK, len(images)), *images.shape[1:]), dtype=images.dtype)
    ends = np.cumsum(counts)
    for c in np.flatnonzero(counts):
        for start in range(ends[c] - counts[c], ends[c], _UINT16_BLOCK):
            stop = min(start + _UINT16_BLOCK, ends[c])
            run = images[start:stop] if order is None else np.take(images, order[start:stop], axis=0,
                                                                   out=block[:stop - start])
            sums[c] += run.sum(axis=0, dtype=np.uint16)
    return sums, counts


@dataclass
class PixelSums:
    """Per-class pixel sums and image counts, added up shard by shard in any order."""

    sums: np.ndarray  # int64 [C, H, W]
    counts: np.ndarray  # int64 [C]

    @classmethod
    def zeros(cls, num_classes: int, shape: tuple[int, int]) -> PixelSums:
        return cls(np.zeros((num_classes, *shape), dtype=np.int64), np.zeros(num_classes, dtype=np.int64))

    def add(self, sums: np.ndarray, counts: np.ndarray) -> None:
        """Add one shard's `pixel_sums` (int64 [C, H, W], counts int64 [C]); exact in any order."""
        self.sums += sums
        self.counts += counts

    def prototypes(self, classes: Sequence[str], split: str) -> np.ndarray:
        return prototypes(self.sums, self.counts, classes, split)


def prototypes(sums: np.ndarray, counts: np.ndarray, classes: Sequence[str], split: str) -> np.ndarray:
    """Mean images in [0, 1]: `float32 [C, H, W]` = sums / counts / PIXEL_MAX, divided in float64."""
    for name, count in zip(classes, counts):
        if count == 0:
            raise DatasetError(f"Class {name!r} has no images under {split}/")
    means = sums / counts.reshape(-1, *([1] * (sums.ndim - 1))) / PIXEL_MAX
    return means.astype(np.float32)
