"""Shards: the sample list cut into fixed-size pieces, each decoded into one Arrow chunk.

`decode_shard` is the whole per-shard decode step as a plain function (read PNGs, write the
chunk, sum pixels); `mnist37.distributed` runs it as a Ray task.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist37.chunks import chunk_table, write_chunk
from mnist37.decode import decode_files
from mnist37.folder import Sample
from mnist37.prototypes import pixel_sums


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    paths: tuple[str, ...]
    class_indices: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class DecodedShard:
    """What a decode task sends back: small numbers, never the images."""

    split: str
    index: int
    chunk_path: str
    num_images: int
    num_bytes: int
    digest: str  # content digest of the files read (decode.file_digest, combined)
    counts: np.ndarray  # int64 [C]
    pixel_sums: np.ndarray | None  # int64 [C, H, W]; None unless asked for (training shards)
    elapsed_s: float
    node_id: str = ""


def make_shards(samples: Sequence[Sample], split: str, shard_size: int) -> list[Shard]:
    """Consecutive runs of `shard_size` samples (the last may be shorter), in sample order."""
    return [
        Shard(split, i // shard_size,
              tuple(s.path for s in samples[i:i + shard_size]),
              tuple(s.class_index for s in samples[i:i + shard_size]))
        for i in range(0, len(samples), shard_size)
    ]


def chunk_path(chunk_dir: str | Path, shard: Shard) -> Path:
    return Path(chunk_dir) / shard.split / f"{shard.name}.arrow"


def decode_shard(shard: Shard, root: str | Path, classes: Sequence[str], shape: tuple[int, int],
                 chunk_dir: str | Path, with_sums: bool) -> DecodedShard:
    """Decode a shard's PNGs, write its Arrow chunk, count images per class and, when
    `with_sums`, sum their pixels per class."""
    start = time.perf_counter()
    images, digest = decode_files(Path(root), shard.paths, shape)
    labels = np.asarray(shard.class_indices, dtype=np.int32)
    path = chunk_path(chunk_dir, shard)
    num_bytes = write_chunk(path, chunk_table(images, labels, shard.paths, classes, shard.split))
    if with_sums:
        sums, counts = pixel_sums(images, labels, len(classes))
    else:
        sums, counts = None, np.bincount(labels, minlength=len(classes)).astype(np.int64)
    return DecodedShard(
        split=shard.split, index=shard.index, chunk_path=str(path), num_images=len(shard),
        num_bytes=num_bytes, digest=digest, counts=counts, pixel_sums=sums,
        elapsed_s=time.perf_counter() - start,
    )
