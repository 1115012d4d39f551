"""Prototypes: per-class integer pixel sums, reduced exactly, divided once into mean images.

Shards return sums and counts, never means: int64 sums add up exactly in any order, so the
prototypes are bit-identical for any shard size and any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mnist37.folder import DatasetError


# 257 uint8 images add up to at most 255 * 257 = 65535: exact in uint16, which numpy sums
# ~3x faster than into int64; blocks of them are then added in int64.
_UINT16_BLOCK = 257


def pixel_sums(images: np.ndarray, class_indices: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums of `uint8 [N, H, W]` images: (`int64 [C, H, W]`, counts `int64 [C]`)."""
    class_indices = np.asarray(class_indices)
    sums = np.zeros((num_classes, *images.shape[1:]), dtype=np.int64)
    counts = np.bincount(class_indices, minlength=num_classes).astype(np.int64)
    for c in np.flatnonzero(counts):
        members = images if counts[c] == len(images) else images[class_indices == c]
        for start in range(0, len(members), _UINT16_BLOCK):
            sums[c] += members[start:start + _UINT16_BLOCK].sum(axis=0, dtype=np.uint16)
    return sums, counts


def merge_sums(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Add per-shard (sums, counts) pairs; order does not matter."""
    total_sums = total_counts = None
    for sums, counts in parts:
        if total_sums is None:
            total_sums, total_counts = sums.astype(np.int64, copy=True), counts.astype(np.int64, copy=True)
        else:
            total_sums += sums
            total_counts += counts
    if total_sums is None:
        raise ValueError("merge_sums: no shards to merge")
    return total_sums, total_counts


def prototypes(sums: np.ndarray, counts: np.ndarray, classes: Sequence[str], split: str) -> np.ndarray:
    """Mean images in [0, 1]: `float32 [C, H, W]` = sums / counts / 255, divided in float64."""
    for name, count in zip(classes, counts):
        if count == 0:
            raise DatasetError(f"Class {name!r} has no images under {split}/")
    means = sums / counts.reshape(-1, *([1] * (sums.ndim - 1))) / 255.0
    return means.astype(np.float32)
