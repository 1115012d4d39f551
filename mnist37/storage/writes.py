"""Writes: the one way mnist37 publishes a file (`publish`, local paths and URIs alike) or a
folder (`publish_folder`) atomically, through a temporary beside it, and the one way a write to
the folders it writes to (the chunk store, the cache, the output folder) fails: a full, read-only or forbidden folder is one line naming the folder, what
was being written and the errno, never a traceback.

    chunk store /x/chunks: no space left on device (ENOSPC) while writing valid/valid-8192-000003.arrow
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from mnist37 import Mnist37Error
from mnist37.storage.partials import claimed, partial_name


class StorageError(Mnist37Error, OSError):
    """A folder mnist37 writes to refused a write (full, read-only, not permitted, ...).

    Built from one message only, so it pickles as itself through a Ray task's error."""


def describe(error: OSError) -> str:
    """`no space left on device (ENOSPC)`: the errno in words, then by name."""
    if error.errno is None:
        return str(error)
    words = os.strerror(error.errno)
    return f"{words[:1].lower()}{words[1:]} ({errno.errorcode.get(error.errno, error.errno)})"


@contextlib.contextmanager
def writing(folder_kind: str, folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn an OSError raised inside into a StorageError: `<folder_kind> <folder>: <errno in
    words> (<ERRNO>) while <what>`. Errors without an errno (not a system call's) pass through."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        if e.errno is None:
            raise
        raise StorageError(f"{folder_kind} {folder}: {describe(e)} while {what}") from None


def publish(location: str | os.PathLike, write: Callable[[IO[bytes]], object], durable: bool = True) -> int:
    """Write a file at `location` (a local path, or a URI of an object store) with `write(file)`,
    atomically: a reader finds the old file, the whole new one, or none, and so does a later
    run after a crash or a power cut. Return its size in bytes. The one way mnist37 publishes a
    file it writes (chunks, outputs, kept listings, downloads, converted data sets).

    Local: written to a temporary beside it (`partials.partial_name`), under a lock while it is
    written (so `partials.clean` leaves it alone), flushed to disk (`os.fsync`), renamed into
    place, and the folder flushed too, so the rename itself survives a crash; a failed write (a
    full disk, or an exception raised by `write`) leaves no temporary behind, and the error goes
    to the caller (see `writing`).

    `durable=False` (local): not flushed to disk, neither the file nor its folder, for a cache
    whose reader checks what it reads and treats a damaged file as absent (kept listings: a
    zip whose CRCs fail is listed again). Readers still find the old file or the whole new
    one; after a power cut the file may be missing or damaged. 2,000 kept listings took
    2.3-2.4 s by 8 threads with the flushes, 0.6-1.0 s without, on this machine's disk.

    URI: uploaded whole, the object appearing only when its upload completes, each try through
    `retries.retrying` (`write` is called again for each): a store that keeps refusing is an
    ObjectStoreError naming `location`."""
    from mnist37.storage.locations import open_location

    fs, path = open_location(location)
    if fs is not None:
        from mnist37.storage.objects import write_object

        return write_object(os.fspath(location), write)
    with _staged(path, folder=False, durable=durable) as partial, open(partial, "wb") as f:
        write(f)
        f.flush()
        if durable:
            os.fsync(f.fileno())
        return f.tell()


@contextlib.contextmanager
def publish_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new, empty folder to fill, published at `path` (local) when the block ends without an
    error: a reader finds no folder or the whole one, and so does a later run after a crash
    (extracted archives, converted data sets). Everything in it is flushed to disk before the
    rename, the parent folder after it. An error in the block removes it; a killed writer's is
    removed by `partials.clean` (its lock is free). Raises FileExistsError naming `path` when a
    folder is already there (another writer published it first), leaving that one as it is."""
    with _staged(os.fspath(path), folder=True) as staging:
        yield Path(staging)
        _flush_tree(staging)


@contextlib.contextmanager
def _staged(path: str, folder: bool, durable: bool = True) -> Iterator[str]:
    """The one temporary of every local write: a file (or folder) named by
    `partials.partial_name`, beside `path`, held under a lock while the block runs, renamed to
    `path` when it ends without an error (the parent folder flushed after, unless not
    `durable`), removed otherwise."""
    parent, name = os.path.split(path)
    parent = parent or "."
    partial = os.path.join(parent, partial_name(name))
    try:
        os.makedirs(parent, exist_ok=True)
        if folder:
            os.mkdir(partial)
        with claimed(partial):
            yield partial
            if not folder:
                os.replace(partial, path)
            elif not _renamed(partial, path):
                raise FileExistsError(errno.EEXIST, "already published by another writer", path)
        if durable:
            _flush_folder(parent)
    finally:
        with contextlib.suppress(OSError):  # gone (renamed), or never made (read-only folder)
            shutil.rmtree(partial) if folder else os.unlink(partial)


def _renamed(folder: str, path: str) -> bool:
    """Rename `folder` to `path` unless a folder is there already (False)."""
    try:
        os.rename(folder, path)  # replaces an empty folder only
        return True
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(path):
            return False
        raise


def _flush_tree(folder: str) -> None:
    """Flush a folder's files and folders to disk: one `os.sync` (sync(2) returns once the
    data is written), not an fsync per file, which made extracting mnist_sample three times as
    slow again (benchmarks/chunk_writes/README.md, "Flushing an extracted archive")."""
    os.sync()


def _flush_folder(folder: str) -> None:
    """fsync a folder: its entries (a rename into it) reach the disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PROBE_NAME = ".mnist37-write-check"


def check_writable(folder_kind: str, location: str | os.PathLike) -> None:
    """Raise StorageError (or LocationError, for a location no filesystem opens) unless a file
    can be written under `location` and removed again: before the work starts, so an output
    folder or chunk store that cannot take the results stops the job in one line at once, not
    after the evaluation. A store: a small probe object put and deleted, each request
    through `retries.retrying`. Local: a probe file written and removed in the folder; a folder not there yet is left
    uncreated (the job creates it when it writes): a probe folder is made and removed in its
    nearest existing parent instead.

        output folder s3://images/runs/x: bucket not found (...) while checking it can be written
        output folder /data/runs/x: read-only file system (EROFS) while creating it
    """
    from mnist37.storage.locations import open_location

    fs, path = open_location(location)
    if fs is None:
        folder = Path(path).absolute()
        if folder.exists():
            with writing(folder_kind, location, "checking it can be written"):
                probe = folder / partial_name(PROBE_NAME)
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                probe.unlink()
            return
        parent = next(p for p in folder.parents if p.exists())
        with writing(folder_kind, location, "creating it"):
            probe = parent / partial_name(PROBE_NAME)
            probe.mkdir()
            probe.rmdir()
        return
    from mnist37.storage.retries import ObjectStoreError, retrying
    from mnist37.storage.objects import write_object

    probe = f"{os.fspath(location).rstrip('/')}/{PROBE_NAME}"
    try:
        write_object(probe, lambda f: f.write(b"mnist37 checks it can write here\n"))
        retrying(probe, lambda: fs.delete_file(f"{path.rstrip('/')}/{PROBE_NAME}"))
    except FileNotFoundError:
        pass  # deleted already: the write went through
    except ObjectStoreError as e:
        reason = str(e).removeprefix(f"{probe}: ")
        raise StorageError(f"{folder_kind} {os.fspath(location)}: {reason} while checking it can be written") from None
    except OSError as e:  # a store's request that failed outside retrying's kinds (a malformed name)
        raise StorageError(f"{folder_kind} {os.fspath(location)}: {_first_line(e)} "
                           "while checking it can be written") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
