"""Safe, cached extraction of .tgz / .tar.gz data sets.

An archive is extracted once into `<cache>/extracted/<name>-<sha256 prefix>/`: first into a
temporary folder beside it, flushed to disk, then renamed into place (`writes.publish_folder`),
so an interrupted extraction never leaves a folder that a later run trusts. Members that are links, devices, absolute paths or paths
with `..` are refused before anything is written.

An archive in an object store (`s3://bucket/mnist_sample.tgz`, an `ArchiveObject`) is copied
into `<cache>/downloads/objects/` and extracted there on every node that reads it, the first
time a task there needs it: nodes share no disk, and the extraction folder, named by the
archive's content, is the same path on each.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mnist37 import Mnist37Error
from mnist37.storage import partials
from mnist37.storage.locations import cache_home
from mnist37.storage.writes import StorageError, publish, publish_folder, writing

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


def _write_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], staging: Path) -> None:
    """Write `members` (every one passed `check_member`: plain files and folders inside the
    target) under `staging`: folders, and each file's bytes with the archive's modification
    time, which a folder's chunk keys hold (every node that extracts the archive gets the same
    keys). Owners and modes are not copied (0644 files, 0755 folders as made). Half the CPU of
    `tarfile.extractall`, whose per-file owner, mode and filter work this skips
    (docs/fixed-costs.md: the first run)."""
    made = {str(staging)}
    for member in members:
        path = os.path.join(staging, member.name)
        if member.isdir():
            os.makedirs(path, exist_ok=True)
            made.add(path.rstrip("/"))
            continue
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        with tar.extractfile(member) as source, open(path, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        with contextlib.suppress(OverflowError, ValueError):  # an mtime past the system's range: the file keeps its own
            os.utime(path, (member.mtime, member.mtime))


def _extract_into(archive: Path, staging: Path, cache: Path, where: str) -> None:
    """Every member of `archive`, checked first, written under `staging`."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(archive, member)
            # A failed write into the cache (full, read-only) has an errno; a damaged
            # archive raises TarError, EOFError, zlib.error or an OSError without one.
            with writing("cache", cache, where):
                _write_members(tar, members, staging)
    except StorageError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ArchiveError(f"{archive}: not a readable .tgz/.tar archive ({e})") from None


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
        partials.clean(target.parent, partials.partials_of(target.name))  # extractions killed part way
        try:
            with publish_folder(target) as staging:
                _extract_into(archive, staging, cache, where)
        except FileExistsError:  # another run finished the same extraction first: use theirs
            pass
    log.info("extracted %s to %s", archive.name, target)
    return target


@dataclass(frozen=True)
class ArchiveObject:
    """An archive in an object store, and the cache its local copy and extraction go to."""

    uri: str
    cache_dir: str | None = None

    def here(self) -> Path:
        """The archive extracted on this node (fetched and extracted the first time): the
        folder `extract` gives for its local copy. Once per process and archive."""
        return _extracted_object(self.uri, self.cache_dir)


def object_source(data: str | Path, cache_dir: str | Path | None = None) -> ArchiveObject | None:
    """`data` as an ArchiveObject when it is an archive in an object store, else None."""
    from mnist37.storage.locations import is_uri, open_location

    if not is_uri(data) or not is_archive(data) or open_location(data)[0] is None:
        return None
    return ArchiveObject(str(data), str(cache_dir) if cache_dir else None)


def on_node(source: ArchiveObject, function, *arguments):
    """`function(*arguments)` where `source` is extracted first: a task that reads the
    extracted files may run on a node that has not fetched the archive yet."""
    source.here()
    return function(*arguments)


@functools.lru_cache(maxsize=8)
def _extracted_object(uri: str, cache_dir: str | None) -> Path:
    return extract(fetch(uri, cache_dir), cache_dir)


def fetch(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local copy of the archive object at `uri`, in `<cache>/downloads/objects/`, named by
    its URI, size and modification time, so a changed object is fetched again. Published
    (`writes.publish`: a temporary flushed to disk, then renamed); a store that refuses is
    ObjectStoreError naming the object."""
    import pyarrow.fs as pafs

    from mnist37.storage.retries import ObjectStoreError, retrying
    from mnist37.storage.locations import open_location

    fs, path = open_location(uri)
    info = retrying(uri, lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        raise ArchiveError(f"{uri}: archive not found (no such object)")
    cache = cache_home(cache_dir)
    tag = hashlib.blake2b(f"{uri}|{info.size}|{info.mtime_ns}".encode(), digest_size=8).hexdigest()
    name = PurePosixPath(path).name
    stem = _archive_stem(Path(name))
    local = cache / "downloads" / "objects" / f"{stem}-{tag}{name[len(stem):]}"
    if local.is_file() and local.stat().st_size == info.size:
        return local
    where = f"fetching {uri} into {local.relative_to(cache)}"

    def copy(out) -> None:
        with fs.open_input_stream(path) as source:
            while block := source.read(1 << 22):
                out.write(block)
        if out.tell() != info.size:
            raise ObjectStoreError(f"{uri}: read {out.tell()} bytes, the store lists {info.size}")

    def fetch_once() -> int:
        with writing("cache", cache, where):
            return publish(local, copy)
    with writing("cache", cache, where):
        local.parent.mkdir(parents=True, exist_ok=True)
        partials.clean(local.parent)  # copies killed part way
    retrying(uri, fetch_once)
    log.info("fetched %s (%d bytes) to %s", uri, info.size, local)
    return local
