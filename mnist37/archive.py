"""Safe, cached extraction of .tgz / .tar.gz data sets.

An archive is extracted once into `<cache>/extracted/<name>-<sha256 prefix>/`: first into a
temporary folder beside it, then renamed into place, so an interrupted extraction never leaves
a folder that a later run trusts. Members that are links, devices, absolute paths or paths
with `..` are refused before anything is written.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from mnist37 import Mnist37Error, partials
from mnist37.paths import cache_home
from mnist37.storage import StorageError, writing

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")


class ArchiveError(Mnist37Error, ValueError):
    """An archive that cannot be read, or holds a member that must not be extracted."""


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse a member that is not a plain file or folder, or would land outside the target."""
    parts = PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or (parts and ":" in parts[0]):
        raise ArchiveError(f"{archive.name}: member {member.name!r} has an absolute path; refusing to extract")
    if ".." in parts:
        raise ArchiveError(f"{archive.name}: member {member.name!r} would land outside the extraction folder")
    if member.issym() or member.islnk():
        raise ArchiveError(f"{archive.name}: member {member.name!r} is a link to {member.linkname!r}; "
                           "refusing to extract links")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"{archive.name}: member {member.name!r} is not a regular file or folder")


def extract(archive: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Extract `archive` into the cache (once) and return the extraction folder."""
    archive = Path(archive)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    cache = cache_home(cache_dir)
    target = cache / "extracted" / f"{_archive_stem(archive)}-{file_sha256(archive)[:16]}"
    if target.is_dir():
        log.info("reusing %s extracted at %s", archive.name, target)
        return target
    where = f"extracting {archive.name} into {target.relative_to(cache)}"
    with writing("cache", cache, where):
        target.parent.mkdir(parents=True, exist_ok=True)
        partials.clean(target.parent, f".{target.name}-*")  # extractions killed part way
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with partials.claimed(staging):
            try:
                with tarfile.open(archive, mode="r:*") as tar:
                    members = tar.getmembers()
                    for member in members:
                        check_member(archive, member)
                    # A failed write into the cache (full, read-only) has an errno; a damaged
                    # archive raises TarError, EOFError, zlib.error or an OSError without one.
                    with writing("cache", cache, where):
                        tar.extractall(staging, members=members, filter="data")
            except StorageError:
                raise
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                raise ArchiveError(f"{archive}: not a readable .tgz/.tar archive ({e})") from None
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # another run finished the same extraction first: use theirs
                    with writing("cache", cache, where):
                        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("extracted %s to %s", archive.name, target)
    return target
