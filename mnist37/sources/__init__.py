"""The sources layer: every way data reaches the job, found through one table.

`FORMATS` maps a format name to the module that reads it, the module that writes it (for the
converter), and its file-name layout. Config (`format`'s choices), detection (`detect`), the
planner, the decode tasks, the converter and the benchmark all read this table; nothing else
tells formats apart. Adding a format is a new module in this package (and one for its
writer) plus one entry here (docs/architecture.md: Adding a format).

Every reader module, the folder's included, implements one protocol (protocol.Source):

- `NAME`; `check(root, splits, classes)`: the splits and classes there, before Ray starts;
- `plan(request)`: a `protocol.PlanRequest` in, one `protocol.SourcePlan` out (classes, shards of
  both splits, what the first training images say, what a listing counted);

and its shards one protocol (protocol.Shard: `key`, `read`, `records`, `found`, `resolved`). A
container format (Parquet, WebDataset, IDX) also has `containers(root, listed)` (split -> its
container files: what detection looks for), and `read_shard` / `converter_records` that its
`base.ContainerShard`s dispatch to; Parquet and WebDataset read their records in bulk
(`read_records`: `base.Records`) and leave the rest to base.

A writer module (protocol.Sink) has `check_classes(classes)`, `output_name(split, index,
total)`, `ShardWriter(temp, out, classes, shape, index)` with `add(path, class_index, data)`
and `close()`, and `finish(dest, written, classes, splits, shape)`.

Archives (`archive`) and named data sets (`named`) are ways to reach a data root
(mnist37.locate). Modules are imported when a format is used, so `import mnist37.sources`
stays cheap.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Format:
    name: str  # the `format` config key's value
    module: str  # what reads it (protocol.Source)
    layout: str  # its file names, as --help and the docs say them
    short: str  # the benchmark's variant prefix (tar-cold, parquet-cold, ...)
    writer: str | None = None  # what writes it (protocol.Sink); None: the converter does not

    @property
    def convertible(self) -> bool:
        return self.writer is not None


FORMATS = {f.name: f for f in (
    Format("folder", "mnist37.sources.folder", "<split>/<class>/<name>.png", "folder"),
    Format("parquet", "mnist37.sources.parquet", "<split>-NNNNN-of-NNNNN.parquet, data/<split>-*.parquet or "
           "<split>/*.parquet", "parquet", "mnist37.sources.parquet_writer"),
    Format("webdataset", "mnist37.sources.webdataset", "<split>-*.tar or <split>/*.tar of <key>.png + <key>.cls",
           "tar", "mnist37.sources.webdataset_writer"),
    Format("idx", "mnist37.sources.idx", "<split>-images-idx3-ubyte + <split>-labels-idx1-ubyte (.gz too)", "idx",
           "mnist37.sources.idx_writer"),
)}
# Container formats in the order detection tries them (each has `containers`), and the format
# of a root that holds none of their files.
DETECTED = ("idx", "parquet", "webdataset")
FALLBACK = "folder"
# What the converter writes.
TARGETS = tuple(name for name, f in FORMATS.items() if f.convertible)


def format_module(name: str) -> ModuleType:
    """The module that reads format `name` (protocol.Source; imported on first use)."""
    return importlib.import_module(FORMATS[name].module)


def writer_module(name: str) -> ModuleType:
    """The module that writes format `name` (protocol.Sink; imported on first use)."""
    return importlib.import_module(FORMATS[name].writer)


def containers(root, fmt: str, listed=None) -> dict[str, list[str]]:
    """split -> the container files of format `fmt` under `root` (sorted, relative to it).
    `listed` lists a folder (files.entries, or a memo of it)."""
    from mnist37.storage.files import entries

    return format_module(fmt).containers(root, listed or entries)


def detect(root, fmt: str = "auto") -> str:
    """The format of the data root: `fmt` unless it is "auto"; else the first container format
    whose files it holds (DETECTED's order), else FALLBACK. Each folder is listed once (in an
    object store: a request or a page per folder, not per format tried)."""
    if fmt != "auto":
        return fmt
    from mnist37.storage.files import entries

    listed = functools.cache(entries)
    return next((name for name in DETECTED if containers(root, name, listed)), FALLBACK)


def container_root(path):
    """A data root wrapped in one top folder (mnist/...) resolves to that folder (a folder per
    split needs two, and Hugging Face's `data/` folder belongs to the root above it)."""
    from mnist37.storage.locations import under
    from mnist37.storage.files import entries

    files, inner = entries(path)
    if not files and len(inner) == 1 and inner[0] != "data" and detect(under(path, inner[0])) != FALLBACK:
        return under(path, inner[0])
    return path


def check_splits(root, fmt: str, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """The container files of each split; FormatError naming the splits found when one is missing."""
    from mnist37.sources.base import FormatError

    found = containers(root, fmt)
    for split in splits:
        if split not in found:
            raise FormatError(f"{root}: no {fmt} files for split {split!r}; found splits: "
                              f"{', '.join(sorted(found)) or 'none'}")
    return {split: found[split] for split in splits}
