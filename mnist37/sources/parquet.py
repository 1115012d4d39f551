"""Hugging Face Parquet: `<split>-NNNNN-of-NNNNN.parquet` (also under `data/`) or `<split>/*.parquet`.

An `image` column (struct of `bytes`, `path`, or plain binary) and an integer `label` column
(`image_column`, `label_column` name others); class names from the `huggingface` schema
metadata (the label's ClassLabel `names`). A shard is a run of row groups, planned from the
files' footers alone; its image bytes are the column's own Arrow buffers (no object per row).
The converter writes this layout (`ShardWriter`), row groups of ROW_GROUP_ROWS rows.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa

from mnist37.chunks import numbers, valid
from mnist37.storage.retries import ObjectStoreError
from mnist37.png import Blobs
from mnist37.images import Decoding
from mnist37.sources import base
from mnist37.sources.base import (ContainerPlan, ContainerShard, ShardRead, FormatError, Records, class_map, files_by_split,
                                  selected_classes)
from mnist37.storage.files import Root, open_input

NAME = "parquet"
EXTENSION = ".parquet"
SPLIT_FILE = re.compile(r"^(?P<split>.+?)(-\d+-of-\d+)?\.parquet$")
ROW_GROUP_ROWS = 1024  # rows per row group the converter writes


def containers(root: Root, listed) -> dict[str, list[str]]:
    """split -> its Parquet files: in the root, under `data/` (Hugging Face's layout), or in a folder per split."""
    return files_by_split(root, listed, EXTENSION, SPLIT_FILE, ("", "data"))


def plan(root: Root, splits: dict[str, list[str]], train_split: str, classes: list[str], shard_size: int,
         shape: tuple[int, int] | None, image_column: str, label_column: str) -> ContainerPlan:
    """Classes from the first training file's ClassLabel names, shards of whole row groups
    near `shard_size` rows."""
    names, declared = _names(root, splits[train_split][0], label_column)
    where = f"{root}/{splits[train_split][0]}"
    classes = selected_classes(names, classes, where, "no ClassLabel names")
    mapping = class_map(names, classes, where)
    shards = []
    for split, files in splits.items():
        index = 0
        for source in files:
            rows = _row_groups(root, source, image_column, label_column)
            start = taken = 0
            for group, n in enumerate(rows):
                taken += n
                if taken >= shard_size or group == len(rows) - 1:
                    shards.append(ContainerShard(split, index, shard_size, tuple(classes), NAME, source, start,
                                                 group + 1, mapping, declared, image_column=image_column,
                                                 label_column=label_column, num_records=taken))
                    index, start, taken = index + 1, group + 1, 0
    return ContainerPlan(NAME, list(classes), shards, splits)


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


def read_shard(shard: ContainerShard, root: Root, decoding: Decoding) -> ShardRead:
    """The shard's records, decoded and counted (base.decode_records)."""
    return base.decode_records(read_records(shard, root), shard, decoding)


def converter_records(shard: ContainerShard, root: Root, shape: tuple[int, int]):
    """The converter's records (ContainerShard.records): the encoded bytes as they are."""
    return base.converter_records(read_records(shard, root), shard)


def output_name(split: str, index: int, total: int) -> str:
    """The converter's name for a split's index-th of `total` files (Hugging Face's layout)."""
    return f"data/{split}-{index:05d}-of-{total:05d}.parquet"


class ShardWriter:
    """One Parquet file of encoded images and labels, written a row group at a time: an `image`
    column (struct of `bytes`, `path`), an int64 `label`, the class names as the label's
    ClassLabel `names` in the `huggingface` schema metadata, as `datasets` writes them."""

    def __init__(self, path, out, classes: list[str], shape: tuple[int, int], index: int):
        import pyarrow.parquet as pq

        features = {"image": {"_type": "Image"}, "label": {"names": list(classes), "_type": "ClassLabel"}}
        self.schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                                 ("label", pa.int64())],
                                metadata={"huggingface": json.dumps({"info": {"features": features}})})
        self.writer, self.batch, self.rows = pq.ParquetWriter(path, self.schema), [], 0

    def add(self, path: str, class_index: int, data: bytes) -> None:
        self.batch.append((path, class_index, data))
        self.rows += 1
        if len(self.batch) == ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        batch = self.batch
        self.writer.write_table(pa.table({
            "image": pa.StructArray.from_arrays([pa.array([b for _, _, b in batch], pa.binary()),
                                                 pa.array([p for p, _, _ in batch], pa.string())],
                                                names=["bytes", "path"]),
            "label": pa.array([c for _, c, _ in batch], pa.int64())}, schema=self.schema),
            row_group_size=ROW_GROUP_ROWS)
        self.batch = []

    def close(self) -> None:
        if self.batch or not self.rows:
            self._flush()
        self.writer.close()
