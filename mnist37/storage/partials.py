"""Temporary files of writers: written beside their final name, renamed into place when whole.

A writer killed part way leaves its temporary behind. While it writes, a writer holds an
exclusive `flock` on its temporary (`claimed`), so `clean` can tell a temporary whose writer
is gone (its lock is free) from one a running writer still owns (left alone). Locks are
released by the kernel when a process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".partial"


def partial_name(name: str) -> str:
    """A new temporary name to write `name` through: `.name.<pid>-<8 hex digits>.partial`,
    unique also between threads of one process writing the same name."""
    return f".{name}.{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"


def partials_of(name: str) -> str:
    """The pattern (for `clean`) of the temporaries written for `name`, and of nothing else."""
    return f".{glob.escape(name)}.[0-9]*-????????{SUFFIX}"


@contextlib.contextmanager
def claimed(path: str | os.PathLike) -> Iterator[None]:
    """Create `path` (a file; or an existing folder) and hold an exclusive lock on it for as
    long as the context lasts: `clean` never removes it meanwhile."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY) if os.path.isdir(path) else os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _abandoned(path: str) -> bool:
    """True when nobody holds `path`'s lock (its writer is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # gone already, or not ours to open
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def clean(folder: str | os.PathLike, pattern: str = f".*{SUFFIX}") -> int:
    """Remove the temporaries matching `pattern` in `folder` whose writers are gone; return
    how many. A missing folder has none; one that cannot be cleaned is logged and kept."""
    removed = 0
    try:
        candidates = sorted(Path(folder).glob(pattern))
    except OSError:
        return 0
    for path in candidates:
        if not _abandoned(str(path)):
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
        except OSError as e:
            log.warning("%s: left by a killed writer, but could not be removed: %s", path, e)
    if removed:
        log.info("%s: removed %d temporary file(s) left by killed writers", folder, removed)
    return removed
