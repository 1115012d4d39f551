"""Arrow tensor chunks: one IPC file per shard with its decoded images.

Columns: `image` (pyarrow's canonical `arrow.fixed_shape_tensor`, uint8, shape [H, W]),
`class_index` (int32, index into the class list), `path` (relative to the data root).
Schema metadata: `mnist37.classes` (JSON list of class names), `mnist37.image_shape`
(JSON [H, W]), `mnist37.split`, `mnist37.num_images`, and what lets a later run reuse the
chunk without decoding again: `mnist37.files_key` (paths, sizes, modification times, decode
settings), `mnist37.digest` (content), `mnist37.counts` (JSON, per class) and
`mnist37.pixel_sums` (int64 [C, H, W], little-endian bytes), `mnist37.rejected` (JSON
[path, reason] of the shard's files left out) and, for container shards, `mnist37.records`
(JSON: `found` and `rejected_per_class` per class plus one for records of unreadable class,
`ignored`). The metadata is in the file's
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
import pyarrow.fs as pafs

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
    `paths` may be a pyarrow string array (built without a Python string per image).
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
        if reuse.get("records") is not None:  # container shards: what the task found per class
            metadata["mnist37.records"] = json.dumps(reuse["records"])
    schema = pa.schema([("image", tensor_type), ("class_index", pa.int32()), ("path", pa.string())],
                       metadata=metadata)
    return pa.Table.from_arrays(
        [pa.ExtensionArray.from_storage(tensor_type, storage),
         pa.array(np.asarray(class_indices, dtype=np.int32)),
         paths if isinstance(paths, pa.Array) else pa.array(list(paths), pa.string())],
        schema=schema,
    )


# A chunk is found by a location: a local path, or a pyarrow filesystem URI (file://, s3://,
# gs://, hdfs://) for chunk stores shared by the nodes of a cluster; or it arrives as the
# bytes of the file (a pyarrow Buffer) through Ray's object store.
Source = str | Path | pa.Buffer


def join(chunk_dir: str | Path, *parts: str) -> str:
    """A location under `chunk_dir`, which may be a path or a URI."""
    return "/".join([str(chunk_dir).rstrip("/"), *parts])


def _filesystem(location: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for a URI; (None, path) for a local path, which is memory-mapped."""
    location = str(location)
    if "://" not in location:
        return None, location
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise ChunkError(f"chunk store {location!r}: not a filesystem pyarrow can open ({e})") from None
    return (None, path) if isinstance(fs, pafs.LocalFileSystem) else (fs, path)


def exists(location: str | Path) -> bool:
    fs, path = _filesystem(location)
    if fs is None:
        return os.path.exists(path)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_chunk(location: str | Path, table: pa.Table) -> int:
    """Write `table` as an Arrow IPC file at `location`, atomically; return its size in bytes.

    The file is written beside its final name and renamed into place, so a reader never sees
    a partly written chunk, and a killed writer leaves only a temporary file. (On object
    stores such as S3 the final object appears whole when its upload completes.)
    """
    fs, path = _filesystem(location)
    parent, _, name = path.rpartition("/")
    partial = f"{parent}/.{name}.{os.getpid()}.partial"
    if fs is None:
        os.makedirs(parent, exist_ok=True)
        try:
            with pa.OSFile(partial, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return os.stat(path).st_size
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(partial) as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    fs.move(partial, path)
    return fs.get_file_info(path).size


def chunk_bytes(location: str | Path) -> pa.Buffer:
    """The whole chunk file as one buffer (a view of the mapped file where it is local)."""
    fs, path = _filesystem(location)
    if fs is None:
        return pa.memory_map(path, "r").read_buffer()  # the buffer keeps the mapping alive
    with fs.open_input_file(path) as f:
        return f.read_buffer()


def _describe(source: Source) -> str:
    return f"chunk of {source.size} bytes" if isinstance(source, pa.Buffer) else str(source)


def _open(source: Source) -> pa.ipc.RecordBatchFileReader:
    try:
        if isinstance(source, pa.Buffer):
            reader = pa.ipc.open_file(pa.BufferReader(source))
        else:
            fs, path = _filesystem(source)
            reader = pa.ipc.open_file(pa.memory_map(path, "r") if fs is None else fs.open_input_file(path))
    except FileNotFoundError:
        raise ChunkError(f"{_describe(source)}: chunk file not found") from None
    except pa.ArrowInvalid as e:
        raise ChunkError(f"{_describe(source)}: not an Arrow IPC file ({e})") from None
    meta = reader.schema.metadata or {}
    if meta.get(b"mnist37.schema_version") != SCHEMA_VERSION.encode():
        raise ChunkError(f"{_describe(source)}: not an mnist37 chunk (schema version "
                         f"{meta.get(b'mnist37.schema_version')!r}, expected {SCHEMA_VERSION!r})")
    return reader


def _size(location: str | Path) -> int:
    fs, path = _filesystem(location)
    return os.stat(path).st_size if fs is None else fs.get_file_info(path).size


def read_chunk_metadata(path: str | Path) -> dict:
    """A chunk's reuse record from its footer, without reading the images."""
    meta = _open(path).schema.metadata
    if b"mnist37.files_key" not in meta:
        raise ChunkError(f"{path}: chunk has no reuse record")
    counts = np.array(json.loads(meta[b"mnist37.counts"]), dtype=np.int64)
    h, w = json.loads(meta[b"mnist37.image_shape"])
    return {
        "num_images": int(meta[b"mnist37.num_images"]),
        "num_bytes": _size(path),
        "files_key": meta[b"mnist37.files_key"].decode(),
        "digest": meta[b"mnist37.digest"].decode(),
        "counts": counts,
        "pixel_sums": np.frombuffer(meta[b"mnist37.pixel_sums"], dtype="<i8").astype(np.int64)
                        .reshape(len(counts), h, w),
        "rejected": [tuple(r) for r in json.loads(meta.get(b"mnist37.rejected", b"[]"))],
        "records": json.loads(meta[b"mnist37.records"]) if b"mnist37.records" in meta else None,
    }


def read_chunk(source: Source) -> Chunk:
    """Read a chunk; images come back as a zero-copy `uint8 [N, H, W]` view of the memory-mapped
    file (local path) or of the buffer (object store); a remote file is read into memory."""
    table = _open(source).read_all()
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
