"""The one protocol every source implements, the folder's as much as the container formats'.

Every format is a module with the same three members (`Source`): its `NAME`, `check` (the
splits and classes there, before any listing: a data problem is one line before Ray starts)
and `plan` (a `PlanRequest` in, one `SourcePlan` out: the classes, the shards, what the first
training images say and what a listing counted before any decode). Every shard, whatever its
format, answers the same few questions (`Shard`): what its chunk would be made from now
(`key`), its images decoded with every file or record accounted for (`read`: a `ShardRead`),
its records for the converter (`records`). The planner, the decode step, the Ray tasks, the
accounting and the converter see only these. A format the converter writes has a writer module
(`Sink`). What container formats share beyond this is mnist37.sources.base.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from mnist37.images import Decoding, FirstImages
from mnist37.storage.files import Root

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class ShardRead:
    """A shard's images, decoded, with every file or record accounted for: what its chunk holds
    and records. Folder and container shards alike."""

    images: np.ndarray  # uint8 [K, H, W]: the images used, in order
    class_indices: np.ndarray  # int32 [K], into the selected classes
    paths: list[str] | pa.StringArray  # [K]
    rejected: list[tuple[str, str]]  # (path, reason) of every file or record left out, in order
    digest: str  # content digest (mnist37.sources.keys)
    files_key: str  # what the chunk is made from (mnist37.sources.keys)
    # Containers only (a folder's listing on the driver knows its counts): "found" and
    # "rejected_per_class" (int [C + 1], the last slot a class that could not be read) and
    # "ignored" (records of classes not selected).
    records: dict | None = None
    conversions: dict[str, int] = field(default_factory=dict)  # "CMYK to RGB" -> images converted so
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, "JPEG data named .png")


class Shard(Protocol):
    """A piece of a data set decoded by one task into one chunk, whatever its format: a run of
    listed files (folder.FolderShard) or a piece of one container file (`ContainerShard`)."""

    split: str
    index: int
    classes: tuple[str, ...]  # selected classes, in index order
    changed: str  # why a chunk with another key is decoded again (for the log)

    @property
    def name(self) -> str:
        """Unique per split, shard size and position: the chunk's file name."""

    def found(self) -> np.ndarray | None:
        """int64 [C + 1]: files per class the plan knows before reading (a listing's), the last
        slot records of no class; None when only reading the shard tells (its chunk records them)."""

    def resolved(self, get: Callable) -> Shard:
        """The shard with what it left in Ray's object store fetched by `get` (ray.get), in one call."""

    def key(self, root: Root, decoding: Decoding) -> str:
        """What its chunk would be made from now (mnist37.sources.keys). OSError when a file
        cannot be stat'ed."""

    def read(self, root: Root, decoding: Decoding) -> ShardRead:
        """Its images decoded, every file or record accounted for."""

    def records(self, root: Root, shape: tuple[int, int]):
        """(path, class index or None, encoded bytes or None, reason) of each file or record,
        for the converter: None as class index is a class not selected (ignored), -1 a record
        without a usable class."""


# Maps a function over argument tuples and returns each call's result, in order, `threads`
# calls at once where they run (`called_in_threads`): how a format runs its listing tasks (the
# job: runs of calls as Ray tasks, on_ray.tasks.map_listings; without one, the format calls
# them here). Called as map(function, arguments, threads).
TaskMap = Callable[[Callable, Sequence[tuple], int], Sequence]

# Calls at once of a listing that waits on the network (a prefix of an object store listed by
# requests). A local folder's listing is bound by the CPU and is listed one call at a time:
# 2,000 local class folders, listed and kept, took 1.4-1.7 s one after another and 3.0-3.2 s by
# 8 threads (GIL contention; 2026-12-06, once kept listings were no longer flushed to disk).
# Local listings also read kept listings with np.load, whose header parse (ast.literal_eval)
# is not safe from several threads in CPython 3.11 ("SystemError: AST constructor recursion
# depth mismatch"): another reason they run one at a time.
LISTING_THREADS = 8


def called_in_threads(function: Callable, arguments: Sequence[tuple], threads: int) -> Iterator:
    """`function(*a)` for each argument tuple, `threads` calls at once, yielded in order: how
    listing calls run, in this process (a TaskMap) and inside a Ray listing task alike."""
    if threads <= 1:
        yield from (function(*a) for a in arguments)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="mnist37-list") as pool:
        yield from pool.map(lambda a: function(*a), arguments)


class ListedFolder(Protocol):
    """What a listing call returns first for each folder it lists (the folder format's
    ClassListing): the driver keeps it, its files in `blocks` of `block_size` (refs on Ray)."""

    blocks: list
    block_size: int


@dataclass(frozen=True)
class PlanRequest:
    """What a format's `plan` is asked, the same record for every format."""

    root: Root
    splits: tuple[str, str]  # (training, evaluation)
    classes: tuple[str, ...]  # as `check` resolved them (containers: maybe ("all",), resolved by `plan`)
    shard_size: int  # images per shard (container shards are cut near it)
    shape: tuple[int, int] | None = None  # (H, W) the config fixes (image_shape), else None
    image_column: str = "image"
    label_column: str = "label"
    wanted: int = 1  # first training images that decode to look at (size, color); 0: none
    sizes_unknown: bool = False  # no image size in the config: look for a data set of several sizes
    keep_dir: Path | None = None  # where listings are kept for the next run (None: not kept)
    map_tasks: TaskMap | None = None  # how listing tasks run; None: here

    @property
    def train_split(self) -> str:
        return self.splits[0]


@dataclass(frozen=True)
class Listed:
    """What listing a split found before any decode (formats that list their files: the folder)."""

    found: np.ndarray  # int64 [C]: image files per class
    ignored: np.ndarray  # int64 [C]: entries of each class that are not image files


@dataclass(eq=False)
class SourcePlan:
    """What a format's `plan` returns, every format alike: the one plan record."""

    format: str
    classes: list[str]  # selected, in index order
    shards: list[Shard]  # both splits, the training split's first
    summary: str  # what was planned, for the log: "train 2 files, valid 1 files"
    # What the first training images say (size, gray or color): None when none were looked at.
    first: FirstImages | None = None
    listed: dict[str, Listed] = field(default_factory=dict)  # per split, when a listing counted the files
    listings_reused: int = 0  # listings an earlier run kept, unchanged since
    # A format whose pixels are read as they are (IDX): why decode settings (channels, a
    # resize) cannot apply; "" for formats of encoded images.
    as_stored: str = ""


class Source(Protocol):
    """What every format's module has (mnist37.sources.FORMATS names them): the folder's and
    the container formats' alike. Adding a format is a module with these and a table entry."""

    NAME: str

    @staticmethod
    def check(root: Root, splits: Sequence[str], classes: Sequence[str]) -> list[str]:
        """The classes in index order ("all" resolved where the layout names them), once every
        split is there; DatasetError or FormatError naming what is there instead. Fast: no
        listing of files, no decode."""

    @staticmethod
    def plan(request: PlanRequest) -> SourcePlan:
        """The classes, the shards of both splits and what the first training images say."""


class Sink(Protocol):
    """What every writer module has (mnist37.sources.FORMATS' `writer`): how the converter
    writes a format, one output file per shard, each through a temporary name."""

    ShardWriter: type  # ShardWriter(path, out, classes, shape, index): add(path, class_index, data), close()

    @staticmethod
    def check_classes(classes: list[str]) -> str | None:
        """Why the format cannot hold these classes, or None."""

    @staticmethod
    def output_name(split: str, index: int, total: int) -> str:
        """The file a split's index-th of `total` shards is written to, relative to the destination."""

    @staticmethod
    def finish(dest: Path, written: list, classes: list[str], splits: Sequence[str], shape: tuple[int, int]) -> None:
        """Whatever the data set needs once every shard is written (class names, headers)."""
