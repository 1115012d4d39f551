"""Container formats: Hugging Face Parquet, WebDataset tar shards and MNIST's IDX files.

One home for what a data set in one of these formats holds and how its records are read:

- `detect(root, format)`: which format a data root is in ("folder", "parquet", "webdataset",
  "idx"), from the files it holds, unless the `format` config key says.
- `plan_containers(...)`: its splits, class names, image shape and shards, reading only
  Parquet footers, IDX headers (and the small IDX labels file) and, for the image shape,
  the first image of the training split; never a whole container.
- `read_shard(shard, root, shape, convert)`: one task's records, front to back, decoded as
  the folder path decodes (decode.decode_pngs, by decode_png's rules), with every record
  counted: used, rejected (with its class when known and a reason) or ignored (a class not
  selected). A shard's records are read, counted and checked as arrays (`Records`), not one
  Python object each: per record, little but the PNG decode is left.

Layouts:

- Parquet (Hugging Face datasets): `<split>-NNNNN-of-NNNNN.parquet` (also under `data/`) or
  `<split>/*.parquet`; an `image` column (struct of `bytes`, `path`, or plain binary) and an
  integer `label` column (`image_column`, `label_column` name others); class names from the
  `huggingface` schema metadata (the label's ClassLabel `names`). A shard is a run of row
  groups.
- WebDataset: `<split>-*.tar` or `<split>/*.tar`; members `<key>.png` and `<key>.cls` (the
  class index as text); class names from `classes.txt` beside the shards (one a line, index
  order), else the indices as text. A shard is one tar file, read as a stream.
- IDX: `<split>-images-idx3-ubyte` and `<split>-labels-idx1-ubyte`, plain or `.gz`; class
  names are the label values as text ("0".."9"); pixels are read as they are (no decoding).
  A shard is a range of records.

The data root is a local folder or a URI of a prefix in an object store (`s3://bucket/prefix`,
any location `pyarrow.fs` opens: `paths.open_location`). Its files are listed (`_entries`),
stat'ed (`_stat`) and opened (`open_input`) here and nowhere else; everything else sees only
relative paths and readable binary files. An object is read by ranged requests, each retried
as `objects.retrying` retries (throttling, 5xx, dropped connections), by whichever node runs
the task that reads it.

A record is named `<container path>:<key>`: the tar member key, the Parquet row, the IDX
record index (`train-00000-of-00001.parquet:17`, `train-000000.tar:000042`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import io
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash

from mnist37 import Mnist37Error
from mnist37.chunks import arrow_array, arrow_text, numbers, valid
from mnist37.decode import Blobs, DecodeError, decode_png, decode_pngs, decode_settings
from mnist37.objects import ObjectStoreError, retrying
from mnist37.paths import is_uri, open_location, under

# A data root: a local folder, or the URI of a prefix in an object store (s3://bucket/prefix).
Root = Path | str

CLASSES_FILE = "classes.txt"  # WebDataset class names, one a line, in index order

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801
_IDX_IMAGES = re.compile(r"^(?P<split>.+)-images[-.]idx3-ubyte(?P<gz>\.gz)?$")
_IDX_LABELS = "{split}-labels-idx1-ubyte"
_PARQUET_SPLIT = re.compile(r"^(?P<split>.+?)(-\d+-of-\d+)?\.parquet$")
_TAR_SPLIT = re.compile(r"^(?P<split>.+?)-[^-]*\.tar$")
_TAR_BLOCK = 512


class FormatError(Mnist37Error, ValueError):
    """A container file that is not what its format says (one line: the file and what is wrong)."""


def open_input(root: Root, path: str):
    """A readable binary file for `path` ('/'-separated, relative to `root`): the one place a
    container is opened. A local file is opened as it is; an object as an `ObjectInput`
    (ranged, retried reads). FileNotFoundError when there is no such file or object;
    ObjectStoreError when the store refuses for good."""
    if not is_uri(root):
        return open(os.path.join(root, path), "rb")
    fs, base = open_location(root)
    uri = under(root, path)
    return ObjectInput(uri, retrying(uri, lambda: fs.open_input_file(under(base, path))))


class ObjectInput(io.RawIOBase):
    """An object opened for reading (a pyarrow RandomAccessFile) as a Python binary file: each
    read is one ranged request at the file's position (what pyarrow's S3 input does for a
    stream too), retried as `objects.retrying` retries. A ranged request names its range, so a
    read that failed is simply asked again: a tar read front to back survives a 503 or a
    dropped connection between or within its reads."""

    def __init__(self, uri: str, file):
        super().__init__()
        self.uri, self._file, self._pos, self._size = uri, file, 0, file.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        size = self._size - self._pos if size is None or size < 0 else min(size, self._size - self._pos)
        if size <= 0:
            return b""
        data = retrying(self.uri, lambda: self._file.read_at(size, self._pos))
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def _stat(root: Root, path: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file, or of an object as pyarrow's FileInfo gives
    them (one HEAD request). FileNotFoundError when there is none."""
    if not is_uri(root):
        stat = os.stat(os.path.join(root, path))
        return stat.st_size, stat.st_mtime_ns
    import pyarrow.fs as pafs

    fs, base = open_location(root)
    uri = under(root, path)
    info = retrying(uri, lambda: fs.get_file_info(under(base, path)))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(errno.ENOENT, "no such object", uri)
    return info.size, info.mtime_ns or 0


def record_path(source: str, key: str | int) -> str:
    """How a record is named in rejections, chunks and reports: `<container>:<key>`."""
    return f"{source}:{key}"


# ---------------------------------------------------------------------------------------------
# Detection and listing of containers


def _entries(folder: Root) -> tuple[list[str], list[str]]:
    """(file names, subfolder names) right in `folder`, each sorted; both empty when it does
    not exist. In an object store one listing request (a page per 1,000 keys), with the
    "folders" its common prefixes."""
    if not is_uri(folder):
        try:
            with os.scandir(folder) as entries:
                entries = list(entries)
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        return (sorted(e.name for e in entries if e.is_file()), sorted(e.name for e in entries if e.is_dir()))
    import pyarrow.fs as pafs

    fs, path = open_location(folder)
    try:
        infos = retrying(folder, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    except FileNotFoundError:
        return [], []
    return (sorted(i.base_name for i in infos if i.type == pafs.FileType.File),
            sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory))


def containers(root: Root, fmt: str, entries=None) -> dict[str, list[str]]:
    """split -> its container files of format `fmt` (sorted, relative to root); for IDX the
    images file of each split. `entries` lists a folder (`_entries`, or a memo of it)."""
    entries = entries or _entries
    found: dict[str, list[str]] = {}
    if fmt == "idx":
        for name in entries(root)[0]:
            if m := _IDX_IMAGES.match(name):
                found.setdefault(m["split"], []).append(name)
        return found
    ext, pattern = (".parquet", _PARQUET_SPLIT) if fmt == "parquet" else (".tar", _TAR_SPLIT)
    for prefix in ("", "data") if fmt == "parquet" else ("",):
        for name in entries(under(root, prefix))[0]:
            if name.endswith(ext) and (m := pattern.match(name)):
                found.setdefault(m["split"], []).append(f"{prefix}/{name}" if prefix else name)
        if found:
            return found
    for split in entries(root)[1]:  # a folder per split
        names = [f"{split}/{n}" for n in entries(under(root, split))[0] if n.endswith(ext)]
        if names:
            found[split] = names
    return found


def detect(root: Root, fmt: str = "auto") -> str:
    """The format of the data root: `fmt` unless it is "auto"; else the first container format
    whose files it holds (IDX, then Parquet, then WebDataset), else "folder". Each folder is
    listed once (in an object store: a request or a page per folder, not per format tried)."""
    if fmt != "auto":
        return fmt
    listed = functools.cache(_entries)
    for candidate in ("idx", "parquet", "webdataset"):
        if containers(root, candidate, listed):
            return candidate
    return "folder"


def container_root(path: Root) -> Root:
    """A data root wrapped in one top folder (mnist/...) resolves to that folder (a folder per
    split needs two, and Hugging Face's `data/` folder belongs to the root above it)."""
    files, inner = _entries(path)
    if not files and len(inner) == 1 and inner[0] != "data" and detect(under(path, inner[0])) != "folder":
        return under(path, inner[0])
    return path


@dataclass(eq=False)
class ContainerShard:
    """A piece of one container file, decoded by one task into one chunk."""

    split: str
    index: int
    shard_size: int  # as configured (container shards are cut near it, at row-group or file ends)
    classes: tuple[str, ...]  # selected classes, in index order
    format: str  # "parquet" | "webdataset" | "idx"
    source: str  # the container file, relative to the root
    start: int  # first row group (Parquet) or record (IDX); 0 for a tar
    stop: int  # one past the last; -1 for a tar (read to its end)
    class_map: np.ndarray  # int32 [L]: label value -> selected class index, -1 = not selected
    declared: int  # labels the format declares (values 0..declared-1); 0 = names not declared
    labels_source: str = ""  # IDX: the labels file
    image_column: str = "image"
    label_column: str = "label"
    num_records: int = 0  # when known before reading (Parquet, IDX); 0 for a tar

    @property
    def name(self) -> str:
        return f"{self.split}-{self.format}-{self.shard_size}-{self.index:06d}"

    def __len__(self) -> int:
        return self.num_records

    def key(self, root: Root, shape: tuple[int, int], convert: bool) -> str:
        """What the chunk was made from: the container files' (path, size, mtime), the range,
        the columns, the class selection, the decode settings and how the digest is made
        (a chunk recording another kind of digest is decoded again, so that a fingerprint
        never mixes the two). Raises OSError when a container cannot be stat'ed."""
        h = hashlib.blake2b(f"{decode_settings(convert)}/digest-{DIGEST}".encode(), digest_size=16)
        for path in filter(None, (self.source, self.labels_source)):
            h.update(json.dumps([path, *_stat(root, path)]).encode())
        h.update(json.dumps([self.format, self.start, self.stop, self.image_column, self.label_column,
                             self.declared, list(shape)]).encode())
        h.update(np.ascontiguousarray(self.class_map, dtype="<i4").tobytes())
        return h.hexdigest()


@dataclass(eq=False)
class ContainerPlan:
    format: str
    classes: list[str]  # selected, in index order
    shape: tuple[int, int]
    shards: list[ContainerShard]
    splits: dict[str, list[str]]  # split -> container files


def _class_map(declared_names: list[str] | None, classes: list[str], where: str,
               size: int | None = None) -> np.ndarray:
    """int32 [L]: for each label value, its index in `classes`, or -1."""
    if declared_names is not None:
        index = {name: i for i, name in enumerate(declared_names)}
        missing = [c for c in classes if c not in index]
        if missing:
            raise FormatError(f"{where}: class {missing[0]!r} is not among its class names {declared_names}")
        mapping = np.full(size or len(declared_names), -1, dtype=np.int32)
        for i, c in enumerate(classes):
            mapping[index[c]] = i
        return mapping
    values = []
    for c in classes:
        if not c.isdigit():
            raise FormatError(f"{where}: declares no class names, so classes are label values; got {c!r}")
        values.append(int(c))
    mapping = np.full(max(values) + 1, -1, dtype=np.int32)
    mapping[values] = np.arange(len(values), dtype=np.int32)
    return mapping


def check_splits(root: Root, fmt: str, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """The container files of each split; FormatError naming the splits found when one is missing."""
    found = containers(root, fmt)
    for split in splits:
        if split not in found:
            raise FormatError(f"{root}: no {fmt} files for split {split!r}; found splits: "
                              f"{', '.join(sorted(found)) or 'none'}")
    return {split: found[split] for split in splits}


def plan_containers(root: Root, fmt: str, train_split: str, eval_split: str, classes: list[str],
                    shard_size: int, shape: tuple[int, int] | None, convert: bool,
                    image_column: str = "image", label_column: str = "label") -> ContainerPlan:
    """Splits, classes, image shape and shards of a container data set (see the module doc)."""
    splits = check_splits(root, fmt, (train_split, eval_split))
    if fmt == "idx":
        return _plan_idx(root, splits, train_split, classes, shard_size, shape)
    if fmt == "parquet":
        names, declared = _parquet_names(root, splits[train_split][0], label_column)
    else:
        names, declared = _webdataset_names(root)
    where = f"{root}/{splits[train_split][0]}" if fmt == "parquet" else str(root)
    if classes == ["all"]:
        if names is None:
            raise FormatError(f"{where}: classes = all, but it declares no class names "
                              f"({'no ClassLabel names' if fmt == 'parquet' else 'no ' + CLASSES_FILE}); "
                              "give the classes (label values) with --classes")
        classes = list(names)
    class_map = _class_map(names, classes, where)
    shards = []
    for split, files in splits.items():
        index = 0
        for source in files:
            if fmt == "webdataset":
                shards.append(ContainerShard(split, index, shard_size, tuple(classes), fmt, source, 0, -1,
                                             class_map, declared))
                index += 1
                continue
            rows = _row_groups(root, source, image_column, label_column)
            start = taken = 0
            for group, n in enumerate(rows):
                taken += n
                if taken >= shard_size or group == len(rows) - 1:
                    shards.append(ContainerShard(split, index, shard_size, tuple(classes), fmt, source, start,
                                                 group + 1, class_map, declared, image_column=image_column,
                                                 label_column=label_column, num_records=taken))
                    index, start, taken = index + 1, group + 1, 0
    if shape is None:
        shape = _first_shape(root, [s for s in shards if s.split == train_split], convert)
    return ContainerPlan(fmt, list(classes), tuple(shape), shards, splits)


def _first_shape(root: Root, shards: list[ContainerShard], convert: bool, probes: int = 100) -> tuple[int, int]:
    """(H, W) of the first training record that decodes, reading records until one does."""
    first_error, seen = None, 0
    for shard in shards:
        for record in read_records(shard, root, limit=probes):
            if record.data is None:
                continue
            try:
                return decode_png(record.data, record.path, convert=convert).shape
            except DecodeError as e:
                first_error = first_error or e
            seen += 1
            if seen >= probes:
                break
        if seen >= probes:
            break
    if first_error is None:
        raise FormatError(f"{root}: no training images found to take the image shape from")
    raise DecodeError(first_error.path, f"{first_error.reason}; and none of the first {seen} records "
                                        "decodes, so the image shape is unknown (set image_shape)")


# ---------------------------------------------------------------------------------------------
# Parquet


def _parquet_footer(root: Root, source: str):
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


def _parquet_names(root: Root, source: str, label_column: str) -> tuple[list[str] | None, int]:
    """ClassLabel names of `label_column` from the file's `huggingface` schema metadata."""
    meta = (_parquet_footer(root, source).metadata or {}).get(b"huggingface")
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
    meta = _parquet_footer(root, source)
    names = set(meta.schema.to_arrow_schema().names)
    for column, key in ((image_column, "image_column"), (label_column, "label_column")):
        if column not in names:
            raise FormatError(f"{source}: no column {column!r} ({key}); columns: {', '.join(sorted(names))}")
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _image_bytes(column: pa.ChunkedArray | pa.Array, source: str) -> Blobs:
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


def _parquet_records(shard: ContainerShard, root: Root, limit: int | None = None) -> Records:
    import pyarrow.parquet as pq  # only Parquet data sets pay for its import

    with open_input(root, shard.source) as f:
        parquet = pq.ParquetFile(f)
        first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(shard.start))
        stop, rows = shard.start, 0
        while stop < shard.stop and (limit is None or rows < limit):  # row groups up to `limit` rows
            rows, stop = rows + parquet.metadata.row_group(stop).num_rows, stop + 1
        # One thread: a decode task holds one CPU, and Arrow's pool on the others measured
        # 0.54 ms of CPU a 1024-row group against 0.42 ms read alone.
        table = parquet.read_row_groups(range(shard.start, stop), columns=[shard.image_column, shard.label_column],
                                        use_threads=False)
    data = _image_bytes(table.column(shard.image_column), shard.source)
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


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards


def _webdataset_names(root: Root) -> tuple[list[str] | None, int]:
    try:
        with open_input(root, CLASSES_FILE) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        return None, 0
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names, len(names)


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # base-256, for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


class TarCutShort(FormatError):
    """A tar stream that ends inside a member (`member` is its name) or inside a header (None)."""

    def __init__(self, source: str, reason: str, member: bytes | None):
        super().__init__(f"{source}: {reason}")
        self.reason, self.member = reason, member


def _text(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _member_key(name: bytes) -> tuple[bytes, bytes] | None:
    """WebDataset's split of a member name into (key, extension): at the first dot of the base name."""
    dot = name.find(b".", name.rfind(b"/") + 1)
    return (name[:dot], name[dot + 1:].lower()) if dot >= 0 else None


# Reads of 1 MiB: the headers are scanned and the members sliced while the read is in the
# core's L2 cache (tar_members of an 8192-record MNIST shard: 1.33 µs a record; 4 MiB reads 1.45-2.0, 16 MiB 2.4).
_READ_BLOCK = 1 << 20
_WINDOW = _READ_BLOCK // _TAR_BLOCK  # blocks a run is looked for in at most
_ZERO_BLOCK = bytes(_TAR_BLOCK)
_USTAR = np.frombuffer(b"ustar", dtype=np.uint8)
_OCTAL = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # weights of a size field's 11 octal digits
_REGULAR = (48, 0, 55)  # typeflags "0", NUL, "7": regular files


@dataclass
class TarMembers:
    """The regular files of a tar stream, in order, and what ended it early (if anything)."""

    names: np.ndarray  # bytes 'S' [M]: member names
    data: list[bytes]  # [M]: member contents
    error: FormatError | None  # TarCutShort when the stream ends inside a member or header; a damaged header


def _plain_members(buf: bytes, pos: int, window: int) -> tuple[int, np.ndarray, list[bytes]]:
    """The run of plain members at `pos` of `buf` (within `window` blocks), parsed with numpy
    rather than one at a time: (position after the last one taken, the names 'S' [K] and
    contents of its regular files). Plain: a ustar header whose name fits the name field (no
    prefix, no GNU long name, no pax path record), size as 11 octal digits, contents wholly
    inside `buf`. Pax headers without a path (webdataset's writer puts one before every
    member, for its mtime) and other kinds of member are passed over, as `_tar_members` does.
    The run stops before the first member that is not plain, which is then read on its own."""
    count = min((len(buf) - pos) // _TAR_BLOCK, window)
    blocks = np.frombuffer(buf, dtype=np.uint8, count=count * _TAR_BLOCK, offset=pos).reshape(count, _TAR_BLOCK)
    headers = np.flatnonzero(blocks[:, 257] == 117)  # "u" of "ustar": the rest is checked on these alone
    head = blocks[headers, :157]  # name, mode, ids, size, mtime, checksum, typeflag
    digits = head[:, 124:135]
    plain = ((blocks[headers, 258:262] == _USTAR[1:]).all(axis=1) & (blocks[headers, 345] == 0)
             & (head[:, 156] != 76) & ((digits >= 48) & (digits <= 55)).all(axis=1)
             & ((head[:, 135] == 0) | (head[:, 135] == 32)))
    headers, head, digits = headers[plain], head[plain], digits[plain]
    if not len(headers) or headers[0] != 0:
        return pos, np.empty(0, dtype="S1"), []
    sizes = (digits.astype(np.int64) - 48) @ _OCTAL
    after = headers + 1 + (sizes + _TAR_BLOCK - 1) // _TAR_BLOCK  # block after each member
    # Follow the chain of headers from the first: a header that is not plain, or a block
    # inside a member's contents that looks like one, ends the run there.
    breaks = np.flatnonzero(after[:-1] != headers[1:])
    taken = int(breaks[0]) + 1 if len(breaks) else len(headers)
    taken = int(np.searchsorted(after[:taken], count, side="right"))  # whole within buf
    kinds = head[:taken, 156]
    starts = pos + (headers[:taken] + 1) * _TAR_BLOCK
    for i in np.flatnonzero(kinds == 120).tolist():  # "x": a pax header that names the next member ends the run
        if b" path=" in buf[starts[i]:starts[i] + sizes[i]]:
            taken = i
            break
    regular = np.flatnonzero(np.isin(kinds[:taken], _REGULAR))
    fields = head[regular, :100]
    names = np.ascontiguousarray(fields).view("S100").ravel()
    lengths = np.char.str_len(names)
    # A name with bytes after its first NUL is not plain (tar stops at the NUL; 'S' only strips trailing NULs).
    odd = np.flatnonzero(np.count_nonzero(fields, axis=1) != lengths)
    if len(odd):
        taken = int(regular[odd[0]])
        regular = regular[:odd[0]]
    names = names[:len(regular)].astype(f"S{max(int(lengths[:len(regular)].max(initial=1)), 1)}")
    data = [buf[s:s + n] for s, n in zip(starts[regular].tolist(), sizes[regular].tolist())]
    end = pos + int(after[taken - 1]) * _TAR_BLOCK if taken else pos
    return end, names, data


def _tar_members(f, source: str, limit: int | None = None) -> TarMembers:
    """Every regular file of a tar stream, in order; a stream that ends inside a member or a
    header (TarCutShort) or a header that does not parse (FormatError) ends the members there
    and is returned with those before it. With `limit`, reading stops once that many are found.

    A reader of its own rather than tarfile: tarfile's per-member work (~15 µs) is several
    times a 250-byte PNG's decode. This one reads 1 MiB at a time and parses runs of plain
    ustar headers with numpy (`_plain_members`, ~0.3 µs a member), every other header one at
    a time (~1 µs). It follows
    ustar, GNU long names and pax path records, and skips everything that is not a regular
    file. Header checksums are not verified: a damaged header shows up as a size that does not
    parse or a stream cut short."""
    names, data = [], []
    buf, pos, long_name, window, wait = b"", 0, None, _WINDOW, 0
    try:
        while True:
            if long_name is None and not wait and len(buf) - pos >= 2 * _TAR_BLOCK:
                start = pos
                pos, run_names, run_data = _plain_members(buf, pos, window)
                names.append(run_names)
                data += run_data
                # Scan about as far as runs reach, and after a member that is not plain read
                # the next few one at a time: a tar of such members (long names) costs each a
                # few blocks' scan, not the whole buffer's.
                window = min(max(64, 4 * (pos - start) // _TAR_BLOCK), _WINDOW)
                wait = 16 if pos == start else 0
            if limit is not None and len(data) >= limit:
                break
            if len(buf) - pos < _TAR_BLOCK:
                buf, pos = buf[pos:] + f.read(_READ_BLOCK), 0
                if len(buf) < _TAR_BLOCK:
                    if buf.strip(b"\0"):
                        raise TarCutShort(source, "truncated tar (header cut short)", None)
                    break  # end of the stream (with or without the end-of-archive blocks)
                continue
            if buf[pos] == 0 and buf[pos:pos + _TAR_BLOCK] == _ZERO_BLOCK:
                break  # end-of-archive marker
            name = long_name
            if name is None:
                end = buf.find(b"\0", pos, pos + 100)
                name = buf[pos:end if end >= 0 else pos + 100]
                if buf[pos + 345] != 0 and buf[pos + 257:pos + 262] == b"ustar":
                    name = buf[pos + 345:pos + 500].split(b"\0", 1)[0] + b"/" + name
            try:
                size = int(buf[pos + 124:pos + 135], 8) if buf[pos + 135] == 0 else _octal(buf[pos + 124:pos + 136])
            except ValueError:
                raise FormatError(f"{source}: corrupt tar header (member {_text(name)!r}: size "
                                  f"{buf[pos + 124:pos + 136]!r} is not a number)") from None
            kind = buf[pos + 156]
            start = pos + _TAR_BLOCK
            end = start + (size + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK
            if end > len(buf):
                buf = buf[pos:] + f.read(max(_READ_BLOCK, end - len(buf)))
                start, end, pos = start - pos, end - pos, 0
                if start + size > len(buf):
                    raise TarCutShort(source, f"truncated tar ({_text(name)} cut short: {max(len(buf) - start, 0)} of "
                                              f"{size} bytes)", name)
            member, pos, long_name, wait = buf[start:start + size], end, None, max(wait - 1, 0)
            if kind in _REGULAR:
                names.append(np.array([name], dtype="S"))
                data.append(member)
            elif kind == 76:  # "L": GNU long name of the next member
                long_name = member.split(b"\0", 1)[0]
            elif kind == 120:  # "x": pax extended header
                for match in re.finditer(rb"\d+ path=([^\n]*)\n", member):
                    long_name = match[1]
        error = None
    except FormatError as e:
        error = e
    return TarMembers(np.concatenate(names) if names else np.empty(0, dtype="S1"), data, error)


def _member_keys(names: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """WebDataset's split of member names ('S' [M]) at the first dot of the base name (as
    `_member_key`), for all at once: (keys 'S' [M], has a dot bool [M], extension is png, is
    cls: bool [M], ASCII case ignored)."""
    width = names.dtype.itemsize
    dot = np.strings.find(names, b".", np.strings.rfind(names, b"/") + 1)
    has_dot = dot >= 0
    chars = np.ascontiguousarray(names).view(np.uint8).reshape(len(names), width)
    keys = np.where(np.arange(width) < dot[:, None], chars, 0).astype(np.uint8).view(f"S{width}").ravel()
    three = has_dot & (np.strings.str_len(names) == dot + 4)  # an extension of 3 bytes
    padded = np.concatenate([chars, np.zeros((len(names), 4), dtype=np.uint8)], axis=1)
    lower = padded[np.arange(len(names))[:, None], (dot + 1)[:, None] + np.arange(3)] | 0x20  # ASCII lower case
    return (keys, has_dot, three & (lower == np.frombuffer(b"png", np.uint8)).all(axis=1),
            three & (lower == np.frombuffer(b"cls", np.uint8)).all(axis=1))


def _webdataset_records(shard: ContainerShard, root: Root, limit: int | None = None) -> Records:
    """One record per run of members sharing a key: its `.png` bytes and its `.cls` label
    (members of other kinds are not read; of two members of one kind, the last counts). A tar
    cut short rejects the record it cuts (and ends the shard); a damaged header rejects the
    record being read and is named. With `limit`, about that many records are read (the
    members of two each)."""
    with open_input(root, shard.source) as f:
        members = _tar_members(f, shard.source, None if limit is None else 2 * limit)
    keys, has_dot, is_png, is_cls = _member_keys(members.names)
    taken = np.flatnonzero(has_dot)  # members without an extension belong to no record
    keys, is_png, is_cls = keys[taken], is_png[taken], is_cls[taken]
    first = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=bool)
    starts, record_of = np.flatnonzero(first), np.cumsum(first) - 1  # record of each member
    png, cls = np.full(len(starts), -1), np.full(len(starts), -1)
    png[record_of[is_png]] = taken[is_png]  # in order, so the last member of a kind wins
    cls[record_of[is_cls]] = taken[is_cls]
    record_keys = keys[starts]
    texts = [members.data[i] if i >= 0 else None for i in cls.tolist()]
    data = [members.data[i] if i >= 0 else None for i in png.tolist()]
    problems: dict[int, str] = {}
    error = members.error
    if error is not None:
        reason = error.reason if isinstance(error, TarCutShort) else str(error).removeprefix(f"{shard.source}: ")
        # The record being read when the stream ended: the last one, unless the member cut
        # short starts another key (or no member was cut and the last record is whole).
        cut = _member_key(error.member) if isinstance(error, TarCutShort) and error.member else None
        last = len(record_keys) - 1
        whole = last >= 0 and data[last] is not None and texts[last] is not None
        if last < 0 or (cut[0] != record_keys[last] if cut else isinstance(error, TarCutShort) and whole):
            key = cut[0] if cut else b"<after the last whole record>" if isinstance(error, TarCutShort) else b"<start>"
            record_keys = np.concatenate([record_keys, np.array([key], dtype="S")])
            texts.append(None)
            data.append(None)
        problems[len(record_keys) - 1] = reason
    labels, has_label = _labels(texts, problems)
    for i in np.flatnonzero([d is None for d in data]).tolist():
        if i not in problems:
            problems[i] = "no .png member" if has_label[i] else "no .png or .cls member"
    for i in np.flatnonzero(~has_label).tolist():
        problems.setdefault(i, "no .cls member")
    for i in problems:
        data[i] = None
    return Records(shard.source, record_keys, labels, has_label, Blobs.of(data), problems)


def _labels(texts: list[bytes | None], problems: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """The `.cls` texts as class indices (int64 [N], valid where the bool [N] says); a text
    that is not an integer is a problem of its record (unless it already has one)."""
    try:
        return (np.array([int(t) if t is not None else 0 for t in texts], dtype=np.int64),
                np.array([t is not None for t in texts], dtype=bool))
    except (ValueError, OverflowError):
        pass
    labels, has_label = np.zeros(len(texts), dtype=np.int64), np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        if text is None:
            continue
        try:
            labels[i], has_label[i] = int(text), True
        except (ValueError, OverflowError):
            problems.setdefault(i, f"class {text[:20].decode('utf-8', 'replace')!r} is not an integer")
    return labels, has_label


# ---------------------------------------------------------------------------------------------
# IDX


# Bytes per request when an object is read front to back (an IDX .gz up to a task's records).
OBJECT_READ = 1 << 22


@contextlib.contextmanager
def _idx_open(root: Root, path: str, front_to_back: bool = False):
    """An IDX file, decompressed when it is a .gz, closed on leaving the block. An object's .gz
    is read through a buffer, so gzip's small reads become few requests: 64 KiB for a header,
    OBJECT_READ bytes at a time when `front_to_back` (up to a task's records)."""
    with open_input(root, path) as f:
        if not path.endswith(".gz"):
            yield f
            return
        buffered = io.BufferedReader(f, OBJECT_READ if front_to_back else 1 << 16) if is_uri(root) else f
        with gzip.GzipFile(fileobj=buffered, mode="rb") as gz:
            yield gz


def _idx_header(root: Root, path: str, magic: int, ndim: int) -> tuple[int, ...]:
    """The sizes an IDX header declares; checks the magic and, for a plain file, the length."""
    with _idx_open(root, path) as f:
        try:
            head = f.read(4 + 4 * ndim)
        except ObjectStoreError:
            raise
        except (OSError, EOFError) as e:
            raise FormatError(f"{path}: not a readable IDX file ({e})") from None
    if len(head) < 4 + 4 * ndim:
        raise FormatError(f"{path}: IDX header cut short ({len(head)} of {4 + 4 * ndim} bytes)")
    found, *sizes = struct.unpack(f">I{ndim}I", head)
    if found != magic:
        raise FormatError(f"{path}: expected IDX magic 0x{magic:08x}, found 0x{found:08x}")
    if not path.endswith(".gz"):
        expected = 4 + 4 * ndim + int(np.prod(sizes))
        actual = _stat(root, path)[0]
        if actual != expected:
            raise FormatError(f"{path}: header declares {' x '.join(map(str, sizes))} bytes of data "
                              f"({expected} bytes in all), but the file has {actual}")
    return tuple(sizes)


def _idx_labels_file(root: Root, images: str) -> str:
    match = _IDX_IMAGES.match(images.rpartition("/")[2])
    base = _IDX_LABELS.format(split=match["split"])
    # The labels file is named as its images file is: train-labels-idx1-ubyte or train-labels.idx1-ubyte.
    separator = images[len(match["split"]) + len("-images")]
    files = set(_entries(root)[0])
    for name in (base.replace("-idx1", separator + "idx1"), base.replace("-idx1", separator + "idx1") + ".gz"):
        if name in files:
            return name
    raise FormatError(f"{root}: {images} has no labels file ({base} or {base}.gz)")


def _idx_read(root: Root, path: str, offset: int, size: int) -> bytes | memoryview:
    """Up to `size` bytes at `offset` of an IDX file: a local plain file's are mapped, not
    copied (the chunk is written straight from the page cache); an object's are one ranged
    request; a .gz is decompressed from its start up to there."""
    if not is_uri(root) and not path.endswith(".gz"):
        with open(os.path.join(root, path), "rb") as f:
            length = os.fstat(f.fileno()).st_size
            if offset >= length or size <= 0:
                return b""
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(mapped)[offset:offset + size]
    with _idx_open(root, path, front_to_back=True) as f:
        f.seek(offset)
        return f.read(size)


def _plan_idx(root: Root, splits: dict[str, list[str]], train_split: str, classes: list[str],
              shard_size: int, shape: tuple[int, int] | None) -> ContainerPlan:
    pairs = {}
    for split, files in splits.items():
        images = files[0]
        labels = _idx_labels_file(root, images)
        n, rows, cols = _idx_header(root, images, IDX_IMAGES_MAGIC, 3)
        (m,) = _idx_header(root, labels, IDX_LABELS_MAGIC, 1)
        if n != m:
            raise FormatError(f"{images}: {n} images, but {labels} has {m} labels")
        if shape is not None and tuple(shape) != (rows, cols):
            raise FormatError(f"{images}: images are {rows}x{cols}, image_shape says {shape[0]}x{shape[1]}")
        pairs[split] = (images, labels, n, (rows, cols))
    shapes = {p[3] for p in pairs.values()}
    if len(shapes) > 1:
        raise FormatError(f"{root}: IDX splits differ in image shape: {sorted(shapes)}")
    if classes == ["all"]:
        images, labels, n, _ = pairs[train_split]
        values = _idx_read(root, labels, 8, n)
        classes = [str(v) for v in np.unique(np.frombuffer(values, dtype=np.uint8))]
    class_map = _class_map(None, classes, f"{root}/{pairs[train_split][1]}")
    class_map = np.concatenate([class_map, np.full(256 - len(class_map), -1, dtype=np.int32)])
    shards = []
    for split, (images, labels, n, _) in pairs.items():
        for index, start in enumerate(range(0, n, shard_size)):
            stop = min(start + shard_size, n)
            shards.append(ContainerShard(split, index, shard_size, tuple(classes), "idx", images, start, stop,
                                         class_map, 256, labels_source=labels, num_records=stop - start))
    return ContainerPlan("idx", list(classes), shapes.pop(), shards, splits)


def read_idx(shard: ContainerShard, root: Root, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 [N, H, W] pixels, uint8 [N] labels, content digest) of the shard's records."""
    n, size = shard.stop - shard.start, shape[0] * shape[1]
    pixels = _idx_read(root, shard.source, 16 + shard.start * size, n * size)
    labels = _idx_read(root, shard.labels_source, 8 + shard.start, n)
    for path, data, expected in ((shard.source, pixels, n * size), (shard.labels_source, labels, n)):
        if len(data) != expected:  # a .gz whose header promises more than it holds
            raise FormatError(f"{path}: header declares more records than the file holds "
                              f"(records {shard.start}..{shard.stop - 1} cut short)")
    return (np.frombuffer(pixels, dtype=np.uint8).reshape(n, *shape), np.frombuffer(labels, dtype=np.uint8),
            _digest(shard, labels, pixels))


# ---------------------------------------------------------------------------------------------
# Reading a shard


@dataclass
class Records:
    """A Parquet or tar shard's records, in order, undecoded: one entry each, as columns, so
    that a shard is read, checked and counted in bulk rather than a record at a time."""

    source: str  # the container file, relative to the root
    keys: np.ndarray  # int64 [N] Parquet rows, or 'S' [N] tar keys: record_path(source, key)
    labels: np.ndarray  # int64 [N]: the label value as stored; meaningless where not has_label
    has_label: np.ndarray  # bool [N]: False where the label is missing or cannot be read
    data: Blobs  # [N] encoded images; missing where the record has none (or a problem)
    problems: dict[int, str]  # record index -> why it cannot be used before decoding

    def __len__(self) -> int:
        return len(self.data)

    def path(self, i: int) -> str:
        key = self.keys[i]
        return record_path(self.source, _text(key) if isinstance(key, bytes) else int(key))

    def paths(self, index: np.ndarray) -> pa.StringArray:
        """record_path of the records at `index` (int [K]), built by Arrow, not one string at a time."""
        import pyarrow.compute as pc  # here: ~0.1 s of every decode worker's start, for containers alone

        try:
            keys = pc.cast(arrow_array(self.keys[index]), pa.string())
        except pa.ArrowInvalid:  # a tar key that is not UTF-8: named with replacement characters
            keys = pa.array([k.decode("utf-8", "replace") for k in self.keys[index].tolist()], pa.string())
        return pc.binary_join_element_wise(arrow_text(record_path(self.source, "")), keys, arrow_text(""))

    def key_bytes(self, index: np.ndarray) -> bytes:
        """The keys at `index` as bytes (fixed width), for the shard's digest."""
        return np.ascontiguousarray(self.keys[index]).tobytes()


class Record(NamedTuple):
    path: str  # record_path(container, key)
    label: int | None  # the label value as stored; None when it cannot be read
    data: bytes | None  # encoded image; None when the record has none
    problem: str | None  # why the record cannot be used before decoding, if it cannot


def read_record_columns(shard: ContainerShard, root: Root, limit: int | None = None) -> Records:
    """The shard's records (with `limit`, about its first `limit`: for a look at the data)."""
    return (_parquet_records if shard.format == "parquet" else _webdataset_records)(shard, root, limit)


def read_records(shard: ContainerShard, root: Root, limit: int | None = None):
    """The records of a Parquet or tar shard, in order, undecoded, one Record each (with
    `limit`, about the first `limit`: the planner's look at the first images)."""
    records = read_record_columns(shard, root, limit)
    labels = records.labels.tolist()
    for i, (data, has_label) in enumerate(zip(records.data, records.has_label.tolist())):
        yield Record(records.path(i), labels[i] if has_label else None, data, records.problems.get(i))


@dataclass
class ContainerDecoded:
    images: np.ndarray  # uint8 [K, H, W]: the records used, in order
    class_indices: np.ndarray  # int32 [K], into the selected classes
    paths: list[str] | pa.StringArray  # [K]
    rejected: list[tuple[str, str]]  # (record path, reason)
    found: np.ndarray  # int64 [C + 1]: records per selected class read; the last: class unknown
    rejected_per_class: np.ndarray  # int64 [C + 1], same layout
    ignored: int  # records of classes not selected
    # xxh3-128 of the shard's range, then of the keys, sizes and bytes of its records read
    # (those of a selected class or of none, with image bytes), in order; IDX: labels, pixels.
    # One hash over bulk bytes: per record, the hashing calls cost more than a tenth of a decode.
    digest: str


DIGEST = "xxh3-128/v1"  # how a container shard's digest is made (_digest); part of its chunk's key


def _digest(shard: ContainerShard, *parts: bytes) -> str:
    """xxh3-128 of the shard's range, then of each part preceded by its length."""
    digest = xxhash.xxh3_128(f"{shard.source}:{shard.start}:{shard.stop}".encode())
    for part in parts:
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)
    return digest.hexdigest()


def record_classes(labels: np.ndarray, has_label: np.ndarray, shard: ContainerShard) -> np.ndarray:
    """int64 [N]: each record's selected class index; -1 for a class not selected, C for a
    label that is missing or outside the declared range (see `label_problem`)."""
    classes, declared, mapping = len(shard.classes), shard.declared, shard.class_map
    known = has_label & ((labels >= 0) & (labels < declared) if declared else True)
    mapped = known & (labels >= 0) & (labels < len(mapping))
    selected = np.where(known, -1, classes)
    selected[mapped] = mapping[labels[mapped]]
    return selected


def read_shard(shard: ContainerShard, root: Root, shape: tuple[int, int], convert: bool) -> ContainerDecoded:
    """Every record of the shard, decoded and counted (see the module doc)."""
    classes = len(shard.classes)
    if shard.format == "idx":
        pixels, labels, digest = read_idx(shard, root, shape)
        selected = shard.class_map[labels]
        keep = selected >= 0
        idx = np.flatnonzero(keep)
        found = np.bincount(selected[keep], minlength=classes + 1).astype(np.int64)
        import pyarrow.compute as pc  # here: ~0.1 s of every decode worker's start, for IDX alone

        paths = pc.binary_join_element_wise(arrow_text(record_path(shard.source, "")),
                                            pc.cast(arrow_array(idx + shard.start), pa.string()), arrow_text(""))
        return ContainerDecoded(pixels[keep] if len(idx) < len(labels) else pixels, selected[keep].astype(np.int32),
                                paths, [],
                                found, np.zeros(classes + 1, dtype=np.int64), int(len(labels) - len(idx)), digest)
    records = read_record_columns(shard, root)
    selected = record_classes(records.labels, records.has_label, shard)
    counted = np.flatnonzero(selected >= 0)  # the others: classes not selected, ignored
    problems = {i: p for i, p in records.problems.items() if selected[i] >= 0}
    for i in np.flatnonzero(selected == classes).tolist():
        problems.setdefault(i, label_problem(int(records.labels[i]) if records.has_label[i] else None, shard.declared))
    todo = counted[~np.isin(counted, list(problems))] if problems else counted
    images, kept, reasons = decode_pngs(records.data.take(todo), lambda j: records.path(todo[j]), shape, convert)
    problems.update((int(todo[j]), reason) for j, reason in reasons.items())
    used, refused = todo[kept], np.array(sorted(problems), dtype=np.int64)
    hashed = counted[records.data.present[counted]]  # counted, with bytes
    data = records.data.take(hashed)
    return ContainerDecoded(
        images, selected[used].astype(np.int32), records.paths(used),
        [(records.path(i), problems[i]) for i in refused.tolist()],
        np.bincount(selected[counted], minlength=classes + 1).astype(np.int64),
        np.bincount(selected[refused], minlength=classes + 1).astype(np.int64), len(records) - len(counted),
        _digest(shard, records.key_bytes(hashed), data.lengths.astype("<i8").tobytes(), data.joined()))


def label_problem(label: int | None, declared: int) -> str:
    """Why a record's label gives no class."""
    return "no label" if label is None else f"label {label} out of range 0..{declared - 1}"
