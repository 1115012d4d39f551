"""Reading a data set's files: local files and objects in a store, through one set of functions.

A data root is a local folder or the URI of a prefix in an object store (`s3://bucket/prefix`,
any location `pyarrow.fs` opens: `locations.open_location`). Its files are listed (`entries`),
stat'ed (`stat`), opened (`open_input`) and read in bulk (`read_files`) here and nowhere
else; the sources see only relative paths, bytes and readable binary files. An object is read
by ranged requests, each retried as `retries.retrying` retries (throttling, 5xx, dropped
connections), by whichever node runs the task that reads it.

Local files are read with `os.open`/`os.read` relative to an open folder descriptor, the
cheapest way to read many small files; objects many at once (`objects.read_objects`).
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import numpy as np

from mnist37.storage.retries import retrying
from mnist37.storage.locations import is_uri, open_location, under
from mnist37.png import DecodeError

# A data root: a local folder, or the URI of a prefix in an object store (s3://bucket/prefix).
Root = Path | str

_READ_BYTES = 1 << 16

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
    stream too), retried as `retries.retrying` retries. A ranged request names its range, so a
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


def stat(root: Root, path: str) -> tuple[int, int]:
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


def entries(folder: Root) -> tuple[list[str], list[str]]:
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


def subfolders(folder: Root) -> list[str]:
    """The subfolders of a folder (or the "folders" of a prefix in a store), sorted."""
    if isinstance(folder, str):
        from mnist37.storage.objects import subfolders
        return subfolders(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def is_folder(folder: Root) -> bool:
    """Whether a folder (or a prefix in a store, holding any object) exists."""
    if isinstance(folder, str):
        from mnist37.storage.objects import check_folder
        return check_folder(folder)
    return folder.is_dir()


def read_reason(error: OSError) -> str:
    """Why a listed file could not be read, in words."""
    if isinstance(error, FileNotFoundError):
        return "file disappeared after listing"
    return f"cannot read file ({error.strerror or error})"


def _read(name: bytes | str, dir_fd: int) -> tuple[bytes, os.stat_result]:
    # O_NONBLOCK: a FIFO named *.png must not hang the task; it is refused below.
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        stat = os.fstat(fd)
        if not S_ISREG(stat.st_mode):
            raise OSError(errno.EINVAL, "Is a directory" if S_ISDIR(stat.st_mode) else "not a regular file")
        data = os.read(fd, _READ_BYTES)
        if len(data) == _READ_BYTES:  # a large file: read the rest
            parts = [data]
            while part := os.read(fd, _READ_BYTES):
                parts.append(part)
            data = b"".join(parts)
        return data, stat
    finally:
        os.close(fd)


# A run of files in one folder: (folder relative to the root, '/'-separated; file names).
Group = tuple[str, Sequence[bytes]]


def _open_folder(root: str, folder: str) -> int:
    try:
        return os.open(os.path.join(root, folder), os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise DecodeError(folder + "/", f"cannot open folder ({e.strerror})") from None


def read_file(root: str | os.PathLike, path: str) -> bytes:
    """One file's bytes; an unreadable file raises DecodeError with the reason. A root in an
    object store (a URI) is read from there (a store that refuses raises ObjectStoreError)."""
    if "://" in os.fspath(root):
        from mnist37.storage.objects import read_objects
        data = read_objects(os.fspath(root), [path])[0]
        if isinstance(data, OSError):
            raise DecodeError(path, read_reason(data))
        return data
    folder, _, name = path.rpartition("/")
    dir_fd = _open_folder(os.fspath(root), folder)
    try:
        return _read(os.fsencode(name), dir_fd)[0]
    except OSError as e:
        raise DecodeError(path, read_reason(e)) from None
    finally:
        os.close(dir_fd)


@dataclass
class FilesRead:
    """What `read_files` read of N listed files, in order."""

    data: list[bytes]  # [K] the bytes of the files that could be read
    paths: list[str]  # [K] their '/'-separated paths relative to the root
    read: np.ndarray  # bool [N]: which of the N files those are
    rejected: list[tuple[str, str]]  # (path, reason) of the files that could not be read, in order
    stats: list[tuple[int, int]]  # [N] (size, mtime ns); (-1, -1) where unread; for objects as listed


def read_files(root: Root, groups: Sequence[Group], stamps: np.ndarray | None = None) -> FilesRead:
    """The bytes of every file of `groups`, in order: the one read loop for local files and for
    objects in a store (`root` a URI; `stamps`, int64 [N, 2], the (size, mtime) the listing
    found, stand in for a stat). A file that cannot be read (gone since listing, not a regular
    file) is not an exception: it is listed in `rejected` with its reason. A store that refuses
    raises ObjectStoreError, which stops the job."""
    total = sum(len(names) for _, names in groups)
    read = np.zeros(total, dtype=bool)
    data, paths, rejected, stats = [], [], [], []
    for i, (path, content, stat) in enumerate(_contents(root, groups, stamps)):
        if isinstance(content, OSError):
            rejected.append((path, read_reason(content)))
            stats.append((-1, -1))
            continue
        read[i] = True
        stats.append(stat)
        paths.append(path)
        data.append(content)
    if stamps is not None:  # what the listing found, read or not
        stats = np.asarray(stamps, dtype=np.int64).reshape(-1, 2).tolist()
    return FilesRead(data, paths, read, rejected, stats)


def _contents(root: Root, groups: Sequence[Group], stamps: np.ndarray | None):
    """(path, bytes or the OSError that stopped the read, (size, mtime ns)) of each file."""
    if is_uri(root):
        from mnist37.storage.objects import read_objects

        paths = [f"{folder}/{os.fsdecode(name)}" if folder else os.fsdecode(name)
                 for folder, names in groups for name in names]
        for path, content in zip(paths, read_objects(str(root), paths)):
            yield path, content, None
        return
    root = os.fspath(root)
    for folder, names in groups:
        prefix = os.fsencode(folder) + b"/" if folder else b""
        dir_fd = _open_folder(root, folder)
        try:
            for name in names:
                path = os.fsdecode(prefix + name)
                try:
                    content, stat = _read(name, dir_fd)
                except OSError as e:
                    yield path, e, None
                    continue
                yield path, content, (stat.st_size, stat.st_mtime_ns)
        finally:
            os.close(dir_fd)


def file_stats(root: Root, groups: Sequence[Group]) -> list[tuple[int, int]]:
    """(size, mtime ns) of every local file of `groups`, in order, from `stat` alone. Raises an
    OSError when a folder or file cannot be stat'ed."""
    root, stats = os.fspath(root), []
    for folder, names in groups:
        dir_fd = os.open(os.path.join(root, folder), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in names:
                stat = os.stat(name, dir_fd=dir_fd)
                stats.append((stat.st_size, stat.st_mtime_ns))
        finally:
            os.close(dir_fd)
    return stats
