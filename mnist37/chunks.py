"""Arrow tensor chunks: one IPC file per shard with its decoded images.

Columns: `image` (pyarrow's canonical `arrow.fixed_shape_tensor`, uint8, shape [H, W]),
`class_index` (int32, index into the class list), `path` (relative to the data root).
Schema metadata: `mnist37.classes` (JSON list of class names), `mnist37.image_shape`
(JSON [H, W]), `mnist37.split`, `mnist37.num_images`, and what lets a later run reuse the
chunk without decoding again: `mnist37.files_key` (paths, sizes, modification times, decode
settings), `mnist37.digest` (content), `mnist37.counts` (JSON, per class) and
`mnist37.pixel_sums` (int64 [C, H, W], little-endian bytes), `mnist37.rejected` (JSON
[path, reason] of the shard's files left out). The metadata is in the file's
footer, so it is read without touching the images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from mnist37 import Mnist37Error

SCHEMA_VERSION = "1"


class ChunkError(Mnist37Error, ValueError):
    """A chunk file that is missing or not what mnist37 writes."""


@dataclass
class Chunk:
    images: np.ndarray  # uint8 [N, H, W], read-only view of the memory-mapped file
    class_indices: np.ndarray  # int32 [N]
    paths: list[str]
    classes: list[str]
    split: str

    def __len__(self) -> int:
        return len(self.class_indices)


def chunk_table(images: np.ndarray, class_indices: Sequence[int], paths: Sequence[str],
                classes: Sequence[str], split: str, reuse: dict | None = None) -> pa.Table:
    """Build the Arrow table of one chunk from `uint8 [N, H, W]` images.

    `reuse` holds `files_key`, `digest`, `counts` and `pixel_sums` to store in the metadata.
    """
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images: expected uint8 [N, H, W], got {images.dtype} {list(images.shape)}")
    if not len(images) == len(class_indices) == len(paths):
        raise ValueError(f"images, class_indices and paths differ in length: "
                         f"{len(images)}, {len(class_indices)}, {len(paths)}")
    h, w = images.shape[1:]
    tensor_type = pa.fixed_shape_tensor(pa.uint8(), [h, w])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint8()), h * w)
    metadata = {
        "mnist37.schema_version": SCHEMA_VERSION,
        "mnist37.classes": json.dumps(list(classes)),
        "mnist37.image_shape": json.dumps([h, w]),
        "mnist37.split": split,
        "mnist37.num_images": str(len(images)),
    }
    if reuse is not None:
        metadata.update({
            "mnist37.files_key": reuse["files_key"],
            "mnist37.digest": reuse["digest"],
            "mnist37.counts": json.dumps(np.asarray(reuse["counts"]).tolist()),
            "mnist37.pixel_sums": np.ascontiguousarray(reuse["pixel_sums"], dtype="<i8").tobytes(),
            "mnist37.rejected": json.dumps([list(r) for r in reuse.get("rejected", [])]),
        })
    schema = pa.schema([("image", tensor_type), ("class_index", pa.int32()), ("path", pa.string())],
                       metadata=metadata)
    return pa.Table.from_arrays(
        [pa.ExtensionArray.from_storage(tensor_type, storage),
         pa.array(np.asarray(class_indices, dtype=np.int32)),
         pa.array(list(paths), pa.string())],
        schema=schema,
    )


def write_chunk(path: str | Path, table: pa.Table) -> int:
    """Write `table` as an Arrow IPC file at `path`, atomically; return its size in bytes.

    The file is written beside its final name and renamed into place, so a reader never sees
    a partly written chunk, and a killed writer leaves only a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path.stat().st_size


def _open(path: Path) -> pa.ipc.RecordBatchFileReader:
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except FileNotFoundError:
        raise ChunkError(f"{path}: chunk file not found") from None
    except pa.ArrowInvalid as e:
        raise ChunkError(f"{path}: not an Arrow IPC file ({e})") from None
    meta = reader.schema.metadata or {}
    if meta.get(b"mnist37.schema_version") != SCHEMA_VERSION.encode():
        raise ChunkError(f"{path}: not an mnist37 chunk (schema version "
                         f"{meta.get(b'mnist37.schema_version')!r}, expected {SCHEMA_VERSION!r})")
    return reader


def read_chunk_metadata(path: str | Path) -> dict:
    """A chunk's reuse record from its footer, without reading the images."""
    path = Path(path)
    meta = _open(path).schema.metadata
    if b"mnist37.files_key" not in meta:
        raise ChunkError(f"{path}: chunk has no reuse record")
    counts = np.array(json.loads(meta[b"mnist37.counts"]), dtype=np.int64)
    h, w = json.loads(meta[b"mnist37.image_shape"])
    return {
        "num_images": int(meta[b"mnist37.num_images"]),
        "num_bytes": path.stat().st_size,
        "files_key": meta[b"mnist37.files_key"].decode(),
        "digest": meta[b"mnist37.digest"].decode(),
        "counts": counts,
        "pixel_sums": np.frombuffer(meta[b"mnist37.pixel_sums"], dtype="<i8").astype(np.int64)
                        .reshape(len(counts), h, w),
        "rejected": [tuple(r) for r in json.loads(meta.get(b"mnist37.rejected", b"[]"))],
    }


def read_chunk(path: str | Path) -> Chunk:
    """Memory-map a chunk file; images come back as a zero-copy `uint8 [N, H, W]` view."""
    path = Path(path)
    table = _open(path).read_all()
    meta = table.schema.metadata
    h, w = json.loads(meta[b"mnist37.image_shape"])
    column = table.column("image")
    # write_chunk writes one record batch, so the pixels are one view of the mapped file;
    # combine_chunks (a copy) only serves files written some other way.
    images = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    pixels = images.to_numpy_ndarray().reshape(len(images), h, w)
    return Chunk(
        images=pixels,
        class_indices=table.column("class_index").to_numpy(),
        paths=table.column("path").to_pylist(),
        classes=json.loads(meta[b"mnist37.classes"]),
        split=meta[b"mnist37.split"].decode(),
    )
