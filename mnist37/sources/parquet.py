"""Hugging Face Parquet: `<split>-NNNNN-of-NNNNN.parquet` (also under `data/`) or `<split>/*.parquet`.

An `image` column (struct of `bytes`, `path`, or plain binary) and an integer `label` column
(`image_column`, `label_column` name others); class names from the `huggingface` schema
metadata (the label's ClassLabel `names`). A shard is a run of row groups, planned from the
files' footers alone; its image bytes are the column's own Arrow buffers (no object per row).
The converter writes this layout (mnist37.sources.parquet_writer).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa

from mnist37.arrays import numbers, valid
from mnist37.storage.retries import ObjectStoreError
from mnist37.png import Blobs
from mnist37.sources import base
from mnist37.sources.base import (ContainerShard, FormatError, Records, check_splits, class_map, container_plan,
                                  files_by_split, selected_classes)
from mnist37.storage.files import Root, open_input
from mnist37.sources.protocol import PlanRequest, SourcePlan

NAME = "parquet"
EXTENSION = ".parquet"
SPLIT_FILE = re.compile(r"^(?P<split>.+?)(-\d+-of-\d+)?\.parquet$")


def containers(root: Root, listed) -> dict[str, list[str]]:
    """split -> its Parquet files: in the root, under `data/` (Hugging Face's layout), or in a folder per split."""
    return files_by_split(root, listed, EXTENSION, SPLIT_FILE, ("", "data"))


def check(root: Root, splits, classes) -> list[str]:
    """Every split has its Parquet files (base.check_containers)."""
    return base.check_containers(root, NAME, splits, classes)


def plan(request: PlanRequest) -> SourcePlan:
    """Classes from the first training file's ClassLabel names, shards of whole row groups
    near `shard_size` rows."""
    root, splits = request.root, check_splits(request.root, NAME, request.splits)
    first_file, columns = splits[request.train_split][0], (request.image_column, request.label_column)
    names, declared = _names(root, first_file, request.label_column)
    where = f"{root}/{first_file}"
    classes = selected_classes(names, list(request.classes), where, "no ClassLabel names")
    mapping = class_map(names, classes, where)
    shards = []
    for split, files in splits.items():
        index = 0
        for source in files:
            rows = _row_groups(root, source, *columns)
            start = taken = 0
            for group, n in enumerate(rows):
                taken += n
                if taken >= request.shard_size or group == len(rows) - 1:
                    shards.append(ContainerShard(split, index, request.shard_size, tuple(classes), NAME, source, start,
                                                 group + 1, mapping, declared, image_column=columns[0],
                                                 label_column=columns[1], num_records=taken))
                    index, start, taken = index + 1, group + 1, 0
    return container_plan(request, NAME, classes, shards, splits)


def _footer(root: Root, source: str):
    """The file's footer (pyarrow.parquet.FileMetaData): its row groups, schema and key-value
    metadata, read from the end of the file (an object: a ranged request or two)."""
    import pyarrow.parquet as pq  # only Parquet data sets pay for its import

    try:
        with open_input(root, source) as f:
            return pq.ParquetFile(f).metadata
    except ObjectStoreError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"{source}: not a Parquet file ({e})") from None


def _names(root: Root, source: str, label_column: str) -> tuple[list[str] | None, int]:
    """ClassLabel names of `label_column` from the file's `huggingface` schema metadata."""
    meta = (_footer(root, source).metadata or {}).get(b"huggingface")
    if meta is None:
        return None, 0
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
    except (ValueError, KeyError, TypeError):
        return None, 0
    names = feature.get("names") if isinstance(feature, dict) else None
    return (list(map(str, names)), len(names)) if names else (None, 0)


def _row_groups(root: Root, source: str, image_column: str, label_column: str) -> list[int]:
    """Rows per row group, from the footer; the columns must be there."""
    meta = _footer(root, source)
    names = set(meta.schema.to_arrow_schema().names)
    for column, key in ((image_column, "image_column"), (label_column, "label_column")):
        if column not in names:
            raise FormatError(f"{source}: no column {column!r} ({key}); columns: {', '.join(sorted(names))}")
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def image_bytes(column: pa.ChunkedArray | pa.Array, source: str) -> Blobs:
    """Encoded image bytes per row, a struct's `bytes` field or the binary column itself, as
    the column's own buffers (missing where the row or its bytes are null)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    present = valid(column)
    if pa.types.is_struct(column.type):
        index = column.type.get_field_index("bytes")
        if index < 0:
            raise FormatError(f"{source}: image column is a struct without a 'bytes' field ({column.type})")
        column = column.field(index)  # the child as the struct's rows see it (its offset applied)
        present &= valid(column)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise FormatError(f"{source}: image column holds {column.type}, expected encoded image bytes")
    width = 8 if pa.types.is_large_binary(column.type) else 4
    _, offsets, data = column.buffers()
    bounds = (np.frombuffer(offsets, dtype=f"<i{width}", count=len(column) + 1, offset=width * column.offset)
              .astype(np.int64) if len(column) else np.zeros(1, dtype=np.int64))
    lengths = np.where(present, np.diff(bounds), -1)
    return Blobs(data if data is not None else b"", bounds[:-1], lengths)


def read_records(shard: ContainerShard, root: Root, limit: int | None = None) -> Records:
    """The shard's rows as records (with `limit`, the row groups holding about its first `limit`)."""
    import pyarrow.parquet as pq  # only Parquet data sets pay for its import

    with open_input(root, shard.source) as f:
        parquet = pq.ParquetFile(f)
        first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(shard.start))
        stop, rows = shard.start, 0
        while stop < shard.stop and (limit is None or rows < limit):  # row groups up to `limit` rows
            rows, stop = rows + parquet.metadata.row_group(stop).num_rows, stop + 1
        # One thread: a decode task holds one CPU, and Arrow's pool costs more CPU than it
        # saves here (docs/figures.md).
        table = parquet.read_row_groups(range(shard.start, stop), columns=[shard.image_column, shard.label_column],
                                        use_threads=False)
    data = image_bytes(table.column(shard.image_column), shard.source)
    labels, has_label = _label_values(table.column(shard.label_column))
    empty = np.flatnonzero(data.lengths <= 0).tolist()  # null, or no bytes
    problems = dict.fromkeys(empty, "row without image bytes")
    if empty:
        data = data.without(empty)
    return Records(shard.source, np.arange(first_row, first_row + len(data), dtype=np.int64), labels, has_label, data,
                   problems)


def _label_values(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [N] label values, bool [N] present): an integer (or boolean) column's non-null
    values; a column of any other type holds no labels."""
    if not (pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):
        return np.zeros(len(column), dtype=np.int64), np.zeros(len(column), dtype=bool)
    return numbers(column).astype(np.int64), valid(column)


# The shard decoded, and its records as the converter copies them: from `read_records`.
read_shard, converter_records = base.read_shard, base.converter_records
