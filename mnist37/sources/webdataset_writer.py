"""Writing WebDataset tar shards (the converter's `--to webdataset`): what mnist37.sources.webdataset reads.

`<split>-NNNNNN.tar` of members `<shard>_<n>.cls` (the class index as text) and the image as
it came, named by its bytes' format (`.png`, `.jpg`, `.webp`, ...: images.member_extension);
`finish` writes the class names to `classes.txt` beside the shards.
"""

from __future__ import annotations

from mnist37 import images
from mnist37.sources import tar
from mnist37.sources.webdataset import CLASSES_FILE


def output_name(split: str, index: int, total: int) -> str:
    """The converter's name for a split's index-th tar shard."""
    return f"{split}-{index:06d}.tar"


class ShardWriter:
    """One tar shard, written as a stream of plain ustar members (mnist37.sources.tar)."""

    def __init__(self, path, out, classes: list[str], shape: tuple[int, int], index: int):
        self.f, self.index, self.rows = open(path, "wb", buffering=1 << 20), index, 0

    def add(self, path: str, class_index: int, data: bytes) -> None:
        key = f"{self.index:06d}_{self.rows:07d}"
        tar.write_member(self.f, f"{key}.cls", str(class_index).encode())
        tar.write_member(self.f, f"{key}.{images.member_extension(data)}", data)
        self.rows += 1

    def close(self) -> None:
        self.f.write(tar.END)
        self.f.close()


def check_classes(classes: list[str]) -> str | None:
    """Any class names will do: they go to classes.txt."""
    return None


def finish(dest, written, classes: list[str], splits, shape) -> None:
    """The class names beside the shards, one a line, in index order."""
    (dest / CLASSES_FILE).write_text("".join(c + "\n" for c in classes))
