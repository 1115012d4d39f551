"""The sources layer: every way data reaches the job, found through one table.

`FORMATS` maps a format name to the module that reads (and, for the converter, writes) it and
to its file-name layout. Config (`format`'s choices), detection (`detect`), the planner, the
decode tasks, the converter and the benchmark all read this table; nothing else tells formats
apart. Adding a format is a new module in this package plus one entry here
(docs/architecture.md: Adding a format).

A container format's module has:

- `NAME`, and `containers(root, listed)`: split -> its container files (what detection looks for);
- `plan(root, splits, train_split, classes, shard_size, shape, image_column, label_column)`:
  a `base.ContainerPlan` of `base.ContainerShard`s, reading only footers and headers (the
  planner then looks at the first training records for their size and color, unless the
  headers said: IDX);
- `read_shard(shard, root, decoding)`: the shard decoded, every record counted
  (`base.ShardRead`); Parquet and WebDataset read their records in bulk (`read_records`:
  `base.Records`) and decode them with `base.decode_records`; IDX decodes nothing;
- `converter_records(shard, root, shape)`: the records as the converter copies them;
- `output_name(split, index, total)`, `ShardWriter(temp, out, classes, shape, index)` with
  `add(path, class_index, data)` and `close()`, and optionally `finish(dest, written,
  classes, splits, shape)`: what the converter writes.

The folder layout (`folder`) is listed rather than planned from headers; archives
(`archive`) and named data sets (`named`) are ways to reach a folder (mnist37.locate).
Modules are imported when a format is used, so `import mnist37.sources` stays cheap.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Format:
    name: str  # the `format` config key's value
    module: str  # what reads and writes it
    layout: str  # its file names, as --help and the docs say them
    short: str  # the benchmark's variant prefix (tar-cold, parquet-cold, ...)
    convertible: bool = True  # the converter writes it


FORMATS = {f.name: f for f in (
    Format("folder", "mnist37.sources.folder", "<split>/<class>/<name>.png", "folder", convertible=False),
    Format("parquet", "mnist37.sources.parquet", "<split>-NNNNN-of-NNNNN.parquet, data/<split>-*.parquet or "
           "<split>/*.parquet", "parquet"),
    Format("webdataset", "mnist37.sources.webdataset", "<split>-*.tar or <split>/*.tar of <key>.png + <key>.cls",
           "tar"),
    Format("idx", "mnist37.sources.idx", "<split>-images-idx3-ubyte + <split>-labels-idx1-ubyte (.gz too)", "idx"),
)}
# Container formats in the order detection tries them; a root that holds none is a folder.
DETECTED = ("idx", "parquet", "webdataset")
# What the converter writes.
TARGETS = tuple(name for name, f in FORMATS.items() if f.convertible)


def format_module(name: str) -> ModuleType:
    """The module of format `name` (imported on first use)."""
    return importlib.import_module(FORMATS[name].module)


def containers(root, fmt: str, listed=None) -> dict[str, list[str]]:
    """split -> the container files of format `fmt` under `root` (sorted, relative to it).
    `listed` lists a folder (files.entries, or a memo of it)."""
    from mnist37.storage.files import entries

    return format_module(fmt).containers(root, listed or entries)


def detect(root, fmt: str = "auto") -> str:
    """The format of the data root: `fmt` unless it is "auto"; else the first container format
    whose files it holds (DETECTED's order), else "folder". Each folder is listed once (in an
    object store: a request or a page per folder, not per format tried)."""
    if fmt != "auto":
        return fmt
    from mnist37.storage.files import entries

    listed = functools.cache(entries)
    return next((name for name in DETECTED if containers(root, name, listed)), "folder")


def container_root(path):
    """A data root wrapped in one top folder (mnist/...) resolves to that folder (a folder per
    split needs two, and Hugging Face's `data/` folder belongs to the root above it)."""
    from mnist37.storage.locations import under
    from mnist37.storage.files import entries

    files, inner = entries(path)
    if not files and len(inner) == 1 and inner[0] != "data" and detect(under(path, inner[0])) != "folder":
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


def plan_containers(root, fmt: str, train_split: str, eval_split: str, classes: list[str], shard_size: int,
                    shape: tuple[int, int] | None, image_column: str = "image", label_column: str = "label",
                    wanted: int = 1):
    """Splits, classes and shards of a container data set (base.ContainerPlan), by its format's
    module; and, unless its headers say (IDX), what the first `wanted` training images that
    decode say of size and color (none looked at when `wanted` is 0)."""
    from mnist37.sources.base import first_images

    splits = check_splits(root, fmt, (train_split, eval_split))
    planned = format_module(fmt).plan(root, splits, train_split, classes, shard_size, shape, image_column,
                                      label_column)
    if planned.first is None and wanted:
        planned.first = first_images(root, [s for s in planned.shards if s.split == train_split], wanted)
    return planned
