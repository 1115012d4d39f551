"""Folders mnist37 writes to (the chunk store, the cache, the output folder) and the one way a
write to them fails: a full, read-only or forbidden folder is one line naming the folder, what
was being written and the errno, never a traceback.

    chunk store /x/chunks: no space left on device (ENOSPC) while writing valid/valid-8192-000003.arrow
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from mnist37 import Mnist37Error


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
def writing(folder_kind: str, folder: str | Path, what: str) -> Iterator[None]:
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


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(file)` on `<path>.partial` and rename it to `path`: a reader sees the old file
    or the whole new one, and a failed write (a full disk) leaves no partial file behind."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            write(f)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(OSError):  # gone (renamed), or never made (read-only folder)
            partial.unlink()
