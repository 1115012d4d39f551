"""What listing a folder data set's class folders gives: the records the planner and the decode
tasks share (mnist37.sources.folder lists the folders and cuts the shards).

A class folder's files are one fixed-width bytes array (`ClassFiles`), kept in blocks; the
driver keeps a few numbers and the first names of each (`ClassListing`), and a split is its
class folders' listings laid end to end (`Listing`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mnist37.storage.locations import sample_path


@dataclass(eq=False)
class ClassFiles:
    """One class folder's images, sorted: the names (one fixed-width bytes array, not a
    Python object per file) and, for objects in a store, what the listing said of each. In a
    job these stay in Ray's object store, where the listing task left them: decode tasks read
    their shard's slice, the driver never holds them."""

    names: np.ndarray  # bytes 'S' [N]: file names within the class folder, bytewise sorted
    # int64 [N, 2]: (size, modification time in ns) of each object as the store listed it; only
    # for data in an object store, where it stands in for the stat a decode task would make.
    stamps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def concatenate(parts: Sequence[ClassFiles]) -> ClassFiles:
        if len(parts) == 1:
            return parts[0]
        return ClassFiles(np.concatenate([p.names for p in parts]),
                          None if parts[0].stamps is None else np.concatenate([p.stamps for p in parts]))

    def blocks(self, size: int) -> list[ClassFiles]:
        """These files in consecutive pieces of `size` (the last may be shorter)."""
        return [ClassFiles(self.names[a:a + size], None if self.stamps is None else self.stamps[a:a + size])
                for a in range(0, len(self), size)]


@dataclass(eq=False)
class ClassListing:
    """What the driver keeps of one class folder's listing: a few numbers, the first names
    (to find the image shape) and its files in blocks of `block_size`: in a job, refs to
    blocks in Ray's object store, so a decode task fetches the one or two its shard needs."""

    split: str
    class_name: str
    count: int  # image files listed
    ignored: int  # entries that are not image files (labels.csv, .DS_Store, folders)
    reused: bool  # the listing an earlier run kept, unchanged since
    head: np.ndarray  # bytes 'S' [<= HEAD_NAMES]: the first names
    blocks: list = field(default_factory=list)  # ClassFiles, or Ray's ObjectRefs to them
    block_size: int = 0  # files per block (the last block may hold fewer)
    # Why the listing could not be kept for the next run; logged by the driver, not the task
    # (a worker's lines reach the driver's stderr from Ray's log thread, at any moment).
    not_kept: str = ""

    def files(self) -> ClassFiles:
        """All the folder's files; in-process only (the blocks are here, not refs)."""
        return ClassFiles.concatenate(self.blocks)


# First names of each class folder the driver keeps, to find the image shape from.
HEAD_NAMES = 100


@dataclass(eq=False)
class Listing:
    """The sorted images of one split: its class folders' listings, in class order. Sample i
    of the split is sample i of the class folders laid end to end."""

    split: str
    classes: tuple[str, ...]
    folders: list[ClassListing]  # one per class, in class order

    def __len__(self) -> int:
        return sum(f.count for f in self.folders)

    @property
    def ignored(self) -> list[int]:
        return [f.ignored for f in self.folders]

    @property
    def reused(self) -> int:
        """Class folders whose listing an earlier run kept, unchanged since."""
        return sum(f.reused for f in self.folders)

    def counts(self) -> np.ndarray:
        """int64 [C]: image files listed per class."""
        return np.array([f.count for f in self.folders], dtype=np.int64)

    def head_paths(self, limit: int) -> list[str]:
        """'/'-separated paths of up to `limit` first images, in listing order."""
        paths = [sample_path(self.split, f.class_name, os.fsdecode(n)) for f in self.folders for n in f.head.tolist()]
        return paths[:limit]

    def spread_paths(self, limit: int) -> list[str]:
        """'/'-separated paths of up to `limit` images spread over the class folders: the
        first image of up to `limit` evenly spaced folders, then their second, and so on
        (from the first names the driver keeps: nothing is listed or fetched)."""
        folders = [f for f in self.folders if len(f.head)]
        picked = [folders[i] for i in sorted(set(np.linspace(0, len(folders) - 1, min(limit, len(folders)))
                                                 .round().astype(int).tolist()))] if folders else []
        paths = []
        for depth in range(max((len(f.head) for f in picked), default=0)):
            for f in picked:
                if depth < len(f.head) and len(paths) < limit:
                    paths.append(sample_path(self.split, f.class_name, os.fsdecode(f.head[depth])))
        return paths

    # In-process only (the files are here, not refs): the whole split as arrays.
    @property
    def class_indices(self) -> np.ndarray:
        """int32 [N]: the class of each image."""
        return np.repeat(np.arange(len(self.folders), dtype=np.int32), [f.count for f in self.folders])

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        """'/'-separated paths relative to the data root: "train/3/10.png"."""
        names = np.concatenate([f.files().names for f in self.folders])
        return relative_paths(self.split, self.classes, self.class_indices[start:stop], names[start:stop])


def relative_paths(split: str, classes: Sequence[str], class_indices: np.ndarray, names: np.ndarray) -> list[str]:
    """'/'-separated paths, relative to the data root, of listed images."""
    return [sample_path(split, classes[c], os.fsdecode(n)) for c, n in zip(class_indices.tolist(), names.tolist())]
