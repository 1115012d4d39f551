"""Writing MNIST's IDX files (the converter's `--to idx`): what mnist37.sources.idx reads.

Decoded pixels behind big-endian headers: `ShardWriter` writes each shard's part (pixels,
and its label values beside them), `finish` joins a split's parts into
`<split>-images-idx3-ubyte` and `<split>-labels-idx1-ubyte`.
"""

from __future__ import annotations

import functools
import shutil
import struct

from mnist37.images import Decoding, decode_image
from mnist37.sources.idx import IMAGES_MAGIC, LABELS_MAGIC
from mnist37.storage.writes import publish


def output_name(split: str, index: int, total: int) -> str:
    """The converter's name for a split's index-th part (`finish` joins a split's parts)."""
    return f"parts/{split}-{index:06d}.images"


class ShardWriter:
    """One shard's part of a split: its decoded pixels, and its label values beside them
    (`.labels`). Class names must be label values 0..255."""

    def __init__(self, path, out, classes: list[str], shape: tuple[int, int], index: int):
        self.values, self.shape = [int(c) for c in classes], shape
        self.f = open(path, "wb", buffering=1 << 20)
        self.labels = open(out.with_suffix(".labels"), "wb")  # beside the part, joined by finish

    def add(self, path: str, class_index: int, data: bytes) -> None:
        """Raises DecodeError for an image that does not decode to `shape` (left out)."""
        self.f.write(decode_image(data, path, Decoding(self.shape))[0].tobytes())
        self.labels.write(bytes([self.values[class_index]]))

    def close(self) -> None:
        self.f.close()
        self.labels.close()


def check_classes(classes: list[str]) -> str | None:
    """Why these classes cannot be IDX labels, or None."""
    if not all(c.isdigit() and int(c) < 256 for c in classes):
        return f"IDX labels are the class names as values 0..255, got classes {classes}"
    return None


def _join(header: bytes, parts: list, out) -> None:
    out.write(header)
    for part in parts:
        with open(part, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 22)


def finish(dest, written, classes: list[str], splits, shape: tuple[int, int]) -> None:
    """Each split's IDX pair from its parts, in order: big-endian sizes after the magic."""
    for split in splits:
        parts = [dest / w.path for w in written if w.split == split]
        n = sum(w.num_records for w in written if w.split == split)
        for name, magic, sizes, suffix in ((f"{split}-images-idx3-ubyte", IMAGES_MAGIC, (n, *shape), ".images"),
                                           (f"{split}-labels-idx1-ubyte", LABELS_MAGIC, (n,), ".labels")):
            publish(dest / name, functools.partial(_join, struct.pack(f">I{len(sizes)}I", magic, *sizes),
                                                   [part.with_suffix(suffix) for part in parts]))
    shutil.rmtree(dest / "parts")
