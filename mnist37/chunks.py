"""Arrow tensor chunks: one IPC file per shard with its decoded images.

Columns: `image` (pyarrow's canonical `arrow.fixed_shape_tensor`, uint8, one image's shape:
[H, W] for gray, [3, H, W] for color, dimensions named C, H, W), `class_index` (int32, index
into the class list), `path` (relative to the data root).
Schema metadata: the data set's classes as `mnist37.num_classes` and `mnist37.classes_digest`
(classes_digest of the JSON list of class names) with `mnist37.held` (JSON [[class index, name,
images], ...] of the classes the chunk holds), so that a footer grows with the classes a shard
holds, not with the data set's (chunks written before held `mnist37.classes`, the JSON list of
every name, and `mnist37.counts`, a count per class: they are read as well), `mnist37.image_shape` (JSON,
one image's shape, as the tensor's: [H, W] or [3, H, W], so the channel count is in the schema
and a chunk of another channel count is never misread), `mnist37.split`, `mnist37.num_images`,
and what lets a later run reuse the chunk without decoding again: `mnist37.files_key` (paths,
sizes, modification times, decode settings), `mnist37.digest` (content) and `mnist37.pixel_sums` (int64 [k, *image shape], little-endian bytes:
one row per class with images, in class order, so its size grows with the classes the shard
holds, not with the data set's; chunks written before held a row for every class, zeros for
those without images, and are read as well), `mnist37.rejected` (JSON [path, reason] of the shard's files left out), where any,
`mnist37.conversions` (JSON {kind: images}) and `mnist37.notes` (JSON [path, note]: a file's
bytes of another format than its name) and, for container shards, `mnist37.records` (JSON:
`found` and `rejected_per_class` per class plus one for records of unreadable class,
`ignored`; per-class lists as {"length": n, "at": {index: value}} of their nonzero entries). The
metadata is in the file's footer, so it is read without touching the images.

`mnist37.checksum` covers everything a later run trusts: every other metadata entry (the reuse
record included), the pixels, the class indices and the paths. Reading a chunk verifies it, so
a chunk damaged after it was written (bit rot, a bad copy, another tool) is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import xxhash

from mnist37 import Mnist37Error
from mnist37.arrays import arrow_array, arrow_strings, numbers
from mnist37.prototypes import ClassSums
from mnist37.storage.retries import retrying
from mnist37.storage.locations import open_location
from mnist37.storage.writes import publish, writing

# 2: chunks carry mnist37.checksum; a chunk of version 1 is decoded again.
SCHEMA_VERSION = "2"
CHECKSUM_KEY = b"mnist37.checksum"
# xxh3-128: the fastest of the checksums measured on real chunks, several times blake3 and
# blake2b (`python benchmarks/chunk_checksums/hash_benchmark.py --data
# ../shared/data/mnist_sample.tgz`; benchmarks/chunk_checksums/README.md). It detects damage,
# not an adversary, which is all a chunk needs.
CHECKSUM_ALGORITHM = "xxh3_128"
COLUMNS = ["image", "class_index", "path"]


class ChunkError(Mnist37Error, ValueError):
    """A chunk file that is missing, damaged, or not what mnist37 writes."""


class ChunkNotFoundError(ChunkError):
    """No chunk at the location (yet)."""


class ChunkVersionError(ChunkError):
    """A chunk written by a version of mnist37 whose chunks this one does not read."""


@dataclass
class Chunk:
    images: np.ndarray  # uint8 [N, H, W] or [N, 3, H, W], read-only view of the memory-mapped file
    class_indices: np.ndarray  # int32 [N]
    paths: list[str]
    classes: dict[int, str]  # class index -> name, of the classes the chunk holds
    split: str

    def __len__(self) -> int:
        return len(self.class_indices)


def chunk_table(images: np.ndarray, class_indices: Sequence[int], paths: Sequence[str],
                classes: Sequence[str], split: str, reuse: dict | None = None) -> pa.Table:
    """Build the Arrow table of one chunk from `uint8 [N, H, W]` (or color `[N, 3, H, W]`)
    images, with its checksum. The tensor type's shape is one image's, channels included.

    `reuse` holds `files_key`, `digest`, `counts` (int64 [C]), `pixel_sums` (prototypes.ClassSums
    of the classes with images) and `rejected` ([(path, reason)]), and may hold `conversions` ({kind: images}) and `notes`
    ([(path, note)]), to store in the footer as the reuse record.
    `paths` may be a pyarrow string array (built without a Python string per image).
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[1] != 3):
        raise ValueError(f"images: expected uint8 [N, H, W] or [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    if not len(images) == len(class_indices) == len(paths):
        raise ValueError(f"images, class_indices and paths differ in length: "
                         f"{len(images)}, {len(class_indices)}, {len(paths)}")
    shape = list(images.shape[1:])
    tensor_type = (pa.fixed_shape_tensor(pa.uint8(), shape) if len(shape) == 2
                   else pa.fixed_shape_tensor(pa.uint8(), shape, dim_names=["C", "H", "W"]))
    storage = pa.FixedSizeListArray.from_arrays(arrow_array(images.reshape(-1)), int(np.prod(shape)))
    held, counts = np.unique(np.asarray(class_indices, dtype=np.int64), return_counts=True)
    if len(held) and not 0 <= held[0] <= held[-1] < len(classes):
        raise ValueError(f"class indices {held[0]}..{held[-1]} for {len(classes)} classes")
    metadata = {
        "mnist37.schema_version": SCHEMA_VERSION,
        "mnist37.num_classes": str(len(classes)),
        "mnist37.classes_digest": classes_digest(classes),
        "mnist37.held": json.dumps([[c, classes[c], n] for c, n in zip(held.tolist(), counts.tolist())]),
        "mnist37.image_shape": json.dumps(shape),
        "mnist37.split": split,
        "mnist37.num_images": str(len(images)),
    }
    if reuse is not None:
        metadata.update(_reuse_record(reuse, held, counts))
    # The metadata goes into the schema once, with its checksum, hashed from this dict: each
    # copy of a footer holding a shard's pixel sums is the size of those sums.
    schema = pa.schema([("image", tensor_type), ("class_index", pa.int32()), ("path", pa.string())])
    table = pa.Table.from_arrays(
        [pa.ExtensionArray.from_storage(tensor_type, storage),
         arrow_array(np.asarray(class_indices, dtype=np.int32)),
         paths if isinstance(paths, pa.Array) else arrow_strings(paths)],
        schema=schema,
    )
    return table.replace_schema_metadata({**metadata, CHECKSUM_KEY.decode(): checksum(table, metadata)})


def _reuse_record(reuse: dict, held: np.ndarray, counts: np.ndarray) -> dict:
    """The footer entries of a chunk's reuse record (`chunk_table`'s `reuse`), checked against
    the classes the chunk holds (`held`, with `counts` images each)."""
    sums = reuse["pixel_sums"]
    if sums.classes.tolist() != np.flatnonzero(reuse["counts"]).tolist():
        raise ValueError(f"pixel sums of classes {sums.classes.tolist()}, but images of classes "
                         f"{np.flatnonzero(reuse['counts']).tolist()}")
    if np.asarray(reuse["counts"])[held].tolist() != counts.tolist() or len(sums.classes) != len(held):
        raise ValueError(f"counts {np.asarray(reuse['counts']).tolist()} are not those of the class indices")
    record = {
        "mnist37.files_key": reuse["files_key"],
        "mnist37.digest": reuse["digest"],
        "mnist37.pixel_sums": np.ascontiguousarray(sums.sums, dtype=(dtype := sums_dtype(sums.sums))).tobytes(),
        "mnist37.pixel_sums_dtype": dtype,
        "mnist37.rejected": json.dumps([list(r) for r in reuse.get("rejected", [])]),
    }
    if reuse.get("records") is not None:  # container shards: what the task found per class
        record["mnist37.records"] = json.dumps(
            {k: _sparse(v) if k in _PER_CLASS_RECORDS else v for k, v in reuse["records"].items()})
    if reuse.get("conversions"):  # images converted to the run's channels, per kind
        record["mnist37.conversions"] = json.dumps(reuse["conversions"])
    if reuse.get("notes"):  # files whose bytes are another format than their names say
        record["mnist37.notes"] = json.dumps([list(n) for n in reuse["notes"]])
    return record


# A footer's pixel sums are kept in the narrowest of these that holds them all: uint16 while a
# class has at most 257 images in the chunk (an ImageNet-like shard's few of each: 4x fewer bytes
# than int64, and they are written twice, at the file's start and in its footer), uint32 up to
# 16,843,009. A footer without `mnist37.pixel_sums_dtype` (chunks written before) holds int64.
SUMS_DTYPES = ("<u2", "<u4", "<i8")


def sums_dtype(sums: np.ndarray) -> str:
    """The narrowest of SUMS_DTYPES that holds every value of `sums` (int64)."""
    if sums.size == 0:
        return SUMS_DTYPES[0]
    low, high = int(sums.min()), int(sums.max())
    return next(d for d in SUMS_DTYPES if np.iinfo(np.dtype(d)).min <= low and high <= np.iinfo(np.dtype(d)).max)


def classes_digest(classes: Sequence[str]) -> str:
    """What a footer records of the data set's class list (`mnist37.classes_digest`): 32 hex
    digits of blake2b over its JSON, so that a chunk of another class list is told apart
    without the footer holding every name."""
    return hashlib.blake2b(json.dumps(list(classes)).encode(), digest_size=16).hexdigest()


# `mnist37.records` entries that hold a value per class (and one for records of no class).
_PER_CLASS_RECORDS = ("found", "rejected_per_class")


def _sparse(values: Sequence[int]) -> dict:
    """A per-class list as its length and its nonzero entries: a footer does not grow with C."""
    return {"length": len(values), "at": {str(i): int(v) for i, v in enumerate(values) if v}}


def _dense(value: list | dict) -> list[int]:
    """`_sparse` undone; a list (chunks written before) as it is."""
    if isinstance(value, list):
        return value
    dense = [0] * int(value["length"])
    for i, v in value["at"].items():
        dense[int(i)] = int(v)
    return dense


def _classes(meta: dict) -> tuple[str, int, dict[int, str], np.ndarray]:
    """(classes_digest, number of classes, {index: name} of the classes held, int64 [C] images
    per class) from a footer of either layout: `mnist37.held` or, in chunks written before,
    `mnist37.classes` (every name) and `mnist37.counts` (a reuse record's, else from the class
    indices' names: the held classes are then the ones with a count)."""
    if b"mnist37.classes" in meta:  # the older layout
        classes = json.loads(meta[b"mnist37.classes"])
        counts = np.array(json.loads(meta.get(b"mnist37.counts", b"null")) or [0] * len(classes), dtype=np.int64)
        held = {c: classes[c] for c in (np.flatnonzero(counts).tolist() if counts.any() else range(len(classes)))}
        return classes_digest(classes), len(classes), held, counts
    held = json.loads(meta[b"mnist37.held"])
    counts = np.zeros(int(meta[b"mnist37.num_classes"]), dtype=np.int64)
    for c, _, n in held:
        counts[c] = n
    return meta[b"mnist37.classes_digest"].decode(), len(counts), {c: name for c, name, _ in held}, counts


def checksummed_bytes(table: pa.Table, metadata: dict | None = None) -> Iterator[memoryview | bytes]:
    """The bytes a chunk's checksum covers, in order: each schema metadata entry but the
    checksum (sorted by key), then the pixels, the class indices, the path lengths and the
    path bytes, each entry and section preceded by its length in bytes.

    Pixels and path bytes are views of the table's own buffers (of the mapped file, when the
    table was read from one), not copies; the bytes are the same however the table is cut
    into record batches. `metadata` stands for the table's schema metadata, when given."""
    entries = sorted((k if isinstance(k, bytes) else k.encode(), v if isinstance(v, bytes) else v.encode())
                     for k, v in ((table.schema.metadata if metadata is None else metadata) or {}).items())
    for key, value in entries:
        if key != CHECKSUM_KEY:  # in three pieces: a value (a footer's pixel sums) is not copied
            yield struct.pack("<QQ", len(key), len(value))
            yield key
            yield value
    images, labels, paths = (table.column(name).chunks for name in COLUMNS)
    pixel_views = []
    for tensors in images:
        storage = tensors.storage  # FixedSizeListArray of H*W uint8 values per image
        width = storage.type.list_size
        values = storage.values
        start = (values.offset + storage.offset * width)
        pixel_views.append(memoryview(values.buffers()[1])[start:start + len(storage) * width])
    yield struct.pack("<Q", sum(v.nbytes for v in pixel_views))
    yield from pixel_views
    yield struct.pack("<Q", 4 * table.num_rows)
    for array in labels:
        yield memoryview(array.buffers()[1])[4 * array.offset:4 * (array.offset + len(array))]
    offsets = [np.frombuffer(array.buffers()[1], dtype="<i4", count=len(array) + 1, offset=4 * array.offset)
               for array in paths]
    yield struct.pack("<Q", 4 * table.num_rows)
    for o in offsets:
        yield np.diff(o).astype("<i4").tobytes()
    yield struct.pack("<Q", sum(int(o[-1] - o[0]) for o in offsets))
    for array, o in zip(paths, offsets):
        yield memoryview(array.buffers()[2])[int(o[0]):int(o[-1])]


def checksum(table: pa.Table, metadata: dict | None = None) -> str:
    """`xxh3_128:<hex>` of `checksummed_bytes(table, metadata)`."""
    digest = xxhash.xxh3_128()
    for piece in checksummed_bytes(table, metadata):
        digest.update(piece)
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


# A chunk is found by a location: a local path, or a pyarrow filesystem URI (file://, s3://,
# gs://, hdfs://) for chunk stores shared by the nodes of a cluster; or it arrives as the
# bytes of the file (a pyarrow Buffer) through Ray's object store.
Source = str | Path | pa.Buffer


def join(chunk_dir: str | Path, *parts: str) -> str:
    """A location under `chunk_dir`, which may be a path or a URI."""
    return "/".join([str(chunk_dir).rstrip("/"), *parts])


def _filesystem(location: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for a URI; (None, path) for a local path, which is memory-mapped."""
    try:
        return open_location(location)
    except ValueError as e:
        raise ChunkError(f"chunk store {e}") from None


def write_chunk(location: str | Path, table: pa.Table, store: str | Path | None = None) -> int:
    """Write `table` as an Arrow IPC file at `location`, atomically; return its size in bytes.

    Published through `writes.publish`: locally a temporary beside the final name, flushed to
    disk and renamed into place, so a reader never sees a partly written chunk and a killed
    writer leaves only a temporary file; in an object store, one object uploaded whole, each
    try through the store's retries. A failed write (a full or read-only store) leaves no
    temporary, and raises StorageError naming `store` (the chunk store `location` is in; its
    folder by default) and the errno; a store that keeps refusing, ObjectStoreError naming it.
    """
    _filesystem(location)  # a location no filesystem opens: ChunkError
    store = str(store if store is not None else str(location).rpartition("/")[0]).rstrip("/")
    relative = str(location)[len(store) + 1:] if str(location).startswith(store + "/") else str(location)

    def write(sink) -> None:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    with writing("chunk store", store, f"writing {relative}"):
        return publish(location, write)


def chunk_bytes(location: str | Path) -> pa.Buffer:
    """The whole chunk file as one buffer (a view of the mapped file where it is local; read
    from a store through its retries)."""
    fs, path = _filesystem(location)
    if fs is None:
        return pa.memory_map(path, "r").read_buffer()  # the buffer keeps the mapping alive

    def read() -> pa.Buffer:
        with fs.open_input_file(path) as f:
            return f.read_buffer()
    return retrying(str(location), read)


def _describe(source: Source) -> str:
    return f"chunk of {source.size} bytes" if isinstance(source, pa.Buffer) else str(source)


def _open(source: Source, whole: bool = False) -> pa.ipc.RecordBatchFileReader:
    """A reader of the chunk, its schema checked. A chunk in an object store is read through
    the store's retries: its footer alone, or with `whole` the whole file at once, so that
    reading its batches makes no further request."""
    try:
        if isinstance(source, pa.Buffer):
            reader = pa.ipc.open_file(pa.BufferReader(source))
        else:
            fs, path = _filesystem(source)
            if fs is None:
                reader = pa.ipc.open_file(pa.memory_map(path, "r"))
            elif whole:
                reader = pa.ipc.open_file(pa.BufferReader(chunk_bytes(source)))
            else:
                reader = retrying(str(source), lambda: pa.ipc.open_file(fs.open_input_file(path)))
    except FileNotFoundError:
        raise ChunkNotFoundError(f"{_describe(source)}: chunk file not found") from None
    except pa.ArrowInvalid as e:
        raise ChunkError(f"{_describe(source)}: not an Arrow IPC file ({e})") from None
    meta = reader.schema.metadata or {}
    version = meta.get(b"mnist37.schema_version")
    if version is None:
        raise ChunkError(f"{_describe(source)}: not an mnist37 chunk (no mnist37.schema_version)")
    if version != SCHEMA_VERSION.encode():
        raise ChunkVersionError(f"{_describe(source)}: chunk schema version {version.decode(errors='replace')}, "
                                f"expected {SCHEMA_VERSION} (written by another mnist37 version)")
    return reader


def _size(location: str | Path) -> int:
    fs, path = _filesystem(location)
    return os.stat(path).st_size if fs is None else retrying(str(location), lambda: fs.get_file_info(path)).size


def read_chunk_metadata(path: str | Path) -> dict:
    """A chunk's reuse record from its footer, without reading the images.

    Only parsed, not verified: `verify_chunk(path, record["checksum"])` checks the chunk (this
    record included) before anything in it is trusted."""
    meta = _open(path).schema.metadata
    if b"mnist37.files_key" not in meta:
        raise ChunkError(f"{path}: chunk has no reuse record")
    try:
        digest, num_classes, held, counts = _classes(meta)
        shape = tuple(json.loads(meta[b"mnist37.image_shape"]))
        records = json.loads(meta[b"mnist37.records"]) if b"mnist37.records" in meta else None
        return {
            "num_images": int(meta[b"mnist37.num_images"]),
            "num_bytes": _size(path),
            "files_key": meta[b"mnist37.files_key"].decode(),
            "digest": meta[b"mnist37.digest"].decode(),
            "checksum": meta[CHECKSUM_KEY].decode(),
            "classes_digest": digest,  # of the data set's class list (classes_digest)
            "num_classes": num_classes,
            "held_classes": held,  # class index -> name, of the classes with images here
            "split": meta[b"mnist37.split"].decode(),
            "image_shape": shape,
            "counts": counts,
            "pixel_sums": _class_sums(meta[b"mnist37.pixel_sums"], counts, shape,
                                      meta.get(b"mnist37.pixel_sums_dtype", b"<i8").decode()),
            "rejected": [tuple(r) for r in json.loads(meta.get(b"mnist37.rejected", b"[]"))],
            "records": None if records is None else {k: _dense(v) if k in _PER_CLASS_RECORDS else v
                                                     for k, v in records.items()},
            "conversions": json.loads(meta.get(b"mnist37.conversions", b"{}")),
            "notes": [tuple(n) for n in json.loads(meta.get(b"mnist37.notes", b"[]"))],
        }
    except (KeyError, ValueError, TypeError) as e:
        raise ChunkError(f"{path}: the reuse record in its footer does not parse ({type(e).__name__}: {e})") from None


def _class_sums(raw: bytes, counts: np.ndarray, shape: tuple[int, ...], dtype: str = "<i8") -> ClassSums:
    """The footer's pixel sums (of `dtype`, one of SUMS_DTYPES) as int64 `ClassSums` of the
    classes with images: one row per such class, or (a chunk written before sums were kept per
    class held) one row per class of the data set, from which those rows are taken. The two
    agree when every class has images."""
    if dtype not in SUMS_DTYPES:
        raise ValueError(f"pixel sums of type {dtype!r}, expected one of {', '.join(SUMS_DTYPES)}")
    present = np.flatnonzero(counts)
    row_bytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
    rows, rest = divmod(len(raw), row_bytes)
    if rest or rows not in (len(present), len(counts)):
        rows_expected = (f"{len(present)}" if len(present) == len(counts)
                         else f"{len(present)} (a class with images each) or {len(counts)} (every class)")
        raise ValueError(f"pixel sums of {len(raw)} bytes, expected {rows_expected} rows of {row_bytes} bytes")
    sums = np.frombuffer(raw, dtype=dtype).reshape(rows, *shape)  # a view of the footer's bytes, read-only
    if rows != len(present):  # the older layout: keep the rows of classes with images
        sums = sums[present]
    return ClassSums(present.astype(np.int64), sums.astype(np.int64, copy=False), counts[present])


def _verified_table(source: Source, expected_checksum: str | None, verify: bool = True) -> pa.Table:
    """The chunk's table, after checking that it hashes to the checksum written with it and,
    when `expected_checksum` is given, that this is the chunk with that checksum. `verify`
    false skips the hashing (the checksum is still compared): for measuring its cost only."""
    reader = _open(source, whole=True)
    try:
        table = reader.read_all()
    except pa.ArrowException as e:
        raise ChunkError(f"{_describe(source)}: damaged Arrow data ({e})") from None
    if table.schema.names != COLUMNS:
        raise ChunkError(f"{_describe(source)}: columns {table.schema.names}, expected {COLUMNS}")
    stored = table.schema.metadata.get(CHECKSUM_KEY, b"").decode(errors="replace")
    if expected_checksum is not None and stored != expected_checksum:
        raise ChunkError(f"{_describe(source)}: not the chunk that was decoded (checksum {stored}, "
                         f"expected {expected_checksum}); was it replaced since?")
    computed = checksum(table) if verify else stored
    if computed != stored:
        raise ChunkError(f"{_describe(source)}: contents do not match the checksum written with them "
                         f"({stored} in its footer, {computed} computed): damaged since it was written")
    return table


def verify_chunk(source: Source, expected_checksum: str | None = None) -> None:
    """Raise ChunkError unless every byte the chunk's checksum covers is as written (and the
    checksum is `expected_checksum`, when given)."""
    _verified_table(source, expected_checksum)


def read_chunk(source: Source, expected_checksum: str | None = None, verify: bool = True) -> Chunk:
    """Read a chunk, verified (see `verify_chunk`); images come back as a zero-copy
    `uint8 [N, H, W]` view of the memory-mapped file (local path) or of the buffer (object
    store); a remote file is read into memory.

    `expected_checksum` (DecodedShard.checksum) makes sure this is the very chunk that decode
    reported, not one written or replaced since."""
    table = _verified_table(source, expected_checksum, verify)
    meta = table.schema.metadata
    shape = json.loads(meta[b"mnist37.image_shape"])
    column = table.column("image")
    # write_chunk writes one record batch, so the pixels are one view of the mapped file;
    # combine_chunks (a copy) only serves files written some other way.
    if column.num_chunks == 0 or len(column) == 0:  # combine_chunks of none would import pandas
        pixels = np.empty((0, *shape), dtype=np.uint8)
    else:
        images = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        pixels = images.to_numpy_ndarray().reshape(len(images), *shape)
    return Chunk(
        images=pixels,
        class_indices=numbers(table.column("class_index")),
        paths=table.column("path").to_pylist(),
        classes=_classes(meta)[2],
        split=meta[b"mnist37.split"].decode(),
    )
