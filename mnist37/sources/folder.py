"""ImageFolder data sets: `<root>/<split>/<class>/<name>.png`, listed and read file by file.

The folder format's module (protocol.Source: `check`, `plan`). The label of a sample is its class
folder; class indices follow the order of `classes` in the config. Each class folder is listed
once (sorted, bytewise), by a task of its own in the job; a local folder's listing is kept for
the next run while the folder is unchanged (its records: mnist37.sources.folder_listing). A
split's listing is cut into `FolderShard`s of `shard_size` files; a shard's files are read in
one loop (files.read_files, local or objects alike) and decoded together (images.decode_images).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist37 import DatasetError
from mnist37.storage.writes import publish
from mnist37.storage.locations import class_folder, is_uri, under
from mnist37 import images
from mnist37.images import Decoding, FirstImages, decode_images
from mnist37.png import DecodeError
from mnist37.sources.base import check_sizes
from mnist37.storage.files import Group, Root, file_stats, is_folder, read_file, read_files, subfolders
from mnist37.sources.folder_listing import HEAD_NAMES, ClassFiles, ClassListing, Listing, relative_paths
from mnist37.sources.keys import file_digest, files_key, listing_name
from mnist37.sources.protocol import LISTING_THREADS, Listed, PlanRequest, ShardRead, SourcePlan, called_in_threads

log = logging.getLogger(__name__)

NAME = "folder"
IMAGE_EXTENSIONS = tuple(ext.encode() for ext in images.EXTENSIONS)  # any case
# Training files tried, in order, for the image shape when the config does not give it.
SHAPE_PROBES = 100
# Files of each split whose headers are read, spread over its class folders, when no
# image_size is given: images of several sizes are then said to be so before any is decoded.
SIZE_PROBES = 12

_BATCH = 65536
# What a kept listing took for images: one that took others (older versions: .png alone) is not reused.
_EXTENSIONS_KEPT = b" ".join(IMAGE_EXTENSIONS)


# A folder's listing is kept for the next run only when the folder last changed at least this
# long before it was listed: a change within one timestamp tick of the listing (1-2 s on some
# filesystems) could leave the folder's mtime and ctime as they were, and go unseen.
SETTLED_S = 2.0


def _image_names(folder: bytes, reuse_dir: Path | None = None) -> tuple[np.ndarray, int, bool, str]:
    """Sorted names of the image files in `folder` as a fixed-width bytes array, how many
    other entries (files of other types, subfolders) were ignored, whether the listing was
    reused, and why it could not be kept for the next run ("" when it was, or need not be).

    With `reuse_dir`, a listing kept there by an earlier run is reused while the folder's
    device, inode, mtime and ctime are unchanged: adding, removing or renaming an entry moves
    its folder's mtime and ctime (ctime cannot be set back, as `tar` and `rsync -t` set mtime).
    Changes to a file's contents are not the listing's business; shards stat every file. A
    listing kept while other extensions made an image (older runs: .png alone) is listed again."""
    if reuse_dir is None:
        return (*_scan_images(folder), False, "")
    stamp = os.stat(folder)
    stamp = np.array([stamp.st_dev, stamp.st_ino, stamp.st_mtime_ns, stamp.st_ctime_ns], dtype=np.int64)
    kept = reuse_dir / listing_name(folder)
    try:
        with np.load(kept, allow_pickle=False) as saved:
            if (np.array_equal(saved["stamp"], stamp) and saved["folder"].item() == folder
                    and saved["extensions"].item() == _EXTENSIONS_KEPT):
                return saved["names"], int(saved["ignored"]), True, ""
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent, torn or from another version: list the folder
    listed_ns = time.time_ns()
    names, ignored = _scan_images(folder)
    not_kept = ""
    if listed_ns - max(stamp[2], stamp[3]) >= SETTLED_S * 1e9:
        try:
            # Not flushed to disk: a listing torn by a power cut fails its zip CRCs above and
            # is listed again (a cache, not a result).
            publish(kept, lambda f: np.savez(f, folder=np.array(folder), stamp=stamp, names=names,
                                             ignored=np.int64(ignored), extensions=np.array(_EXTENSIONS_KEPT)),
                    durable=False)
        except OSError as e:  # a listing not kept only costs the next run a scan
            not_kept = f"{os.fsdecode(folder)}: listing not kept for the next run: {e}"
    return names, ignored, False, not_kept


def _scan_images(folder: bytes) -> tuple[np.ndarray, int]:
    """`_image_names` from the folder itself.

    Names are gathered in batches of 64k, so a 600,000-file folder never exists as 600,000
    Python objects at once; bytes sort in code-point order. Whether
    an entry is a folder comes from the directory listing itself (no stat per file)."""
    parts, batch, folders = [], [], 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders += 1
                continue
            batch.append(entry.name)
            if len(batch) == _BATCH:
                parts.append(_keep_images(batch))
                batch = []
        parts.append(_keep_images(batch))
    names = np.sort(np.concatenate([kept for kept, _ in parts]))
    return names, folders + sum(others for _, others in parts)


def _keep_images(names: list[bytes]) -> tuple[np.ndarray, int]:
    """The image names of a batch (by extension), and how many others it had."""
    names = np.array(names, dtype=bytes)
    keep = _image_mask(names)
    return names[keep], int(len(names) - keep.sum())


def _image_mask(names: np.ndarray) -> np.ndarray:
    """bool [N]: which of bytes 'S' [N] names have an image extension."""
    lower = np.strings.lower(names)
    return np.logical_or.reduce([np.strings.endswith(lower, ext) for ext in IMAGE_EXTENSIONS])


def class_folders(root: Root, split: str) -> list[str]:
    """Every class folder of `split`, sorted: what `classes = ["all"]` means."""
    if not is_folder(under(root, split)):
        found = ", ".join(subfolders(root)) or "no folders"
        raise DatasetError(f"Split folder {split!r} not found under {root}; found: {found}")
    names = subfolders(under(root, split))
    if len(names) < 2:
        raise DatasetError(f"classes = all: expected at least two class folders under {split}/, found {names}")
    return names


def check_split(root: Root, split: str, classes: Sequence[str]) -> None:
    """Raise DatasetError, naming what is there instead, unless `root/split/<class>/` exists
    for every class: two stats (or store requests) per class, so a wrong layout is reported
    before any listing."""
    split_dir = under(root, split)
    if not is_folder(split_dir):
        found = ", ".join(subfolders(root)) or "no folders"
        raise DatasetError(f"Split folder {split!r} not found under {root}; found: {found}")
    for name in classes:
        if not is_folder(under(split_dir, name)):
            found = ", ".join(subfolders(split_dir)) or "no folders"
            raise DatasetError(f"Class {name!r} has no folder under {split}/; found: {found}")


def list_class_folder(root: Root, split: str, class_name: str,
                      reuse_dir: Path | None = None) -> tuple[ClassListing, ClassFiles]:
    """One class folder's images, sorted, and what the driver keeps of them; runs where it is
    called (the job: one Ray task per class folder, so the names stay in Ray's object store).

    A local folder is scanned, or its listing kept in `reuse_dir` by an earlier run is reused
    while the folder is unchanged (`_image_names`); a prefix of an object store is listed, with
    each object's (size, mtime), every run: listing it is what finds out whether it changed.
    DatasetError, naming what is there instead, when the split or class folder is missing."""
    check_split(root, split, [class_name])
    if isinstance(root, str):
        from mnist37.storage.objects import list_objects

        listed, stamps, folders = list_objects(under(root, split, class_name))
        names = np.array(listed, dtype=bytes) if listed else np.array([], dtype="S1")
        keep = _image_mask(names)
        names, stamps, ignored = names[keep], stamps[keep], folders + int((~keep).sum())
        order = np.argsort(names, kind="stable")
        names, stamps, reused, not_kept = names[order], stamps[order], False, ""
    else:
        (names, ignored, reused, not_kept), stamps = _image_names(os.fsencode(root / split / class_name), reuse_dir), None
    if not len(names):
        where = under(root, split) if isinstance(root, str) else split
        raise DatasetError(f"Class {class_name!r} has no images under {where}/")
    return (ClassListing(split, class_name, len(names), ignored, reused, names[:HEAD_NAMES].copy(), not_kept=not_kept),
            ClassFiles(names, stamps))


# Maps `list_class_folder` over argument tuples, returning each call's ClassListing with its
# blocks, in order: in this process by default (one block per folder); in the job one Ray task
# per class folder, its blocks left in Ray's object store (mnist37.on_ray.tasks.map_listings).
FolderMap = Callable[[Callable, Sequence[tuple], int], Sequence[ClassListing]]


def _here(function: Callable, arguments: Sequence[tuple], threads: int) -> list[ClassListing]:
    listed = []
    for summary, files in called_in_threads(function, arguments, threads):
        summary.blocks, summary.block_size = [files], max(1, len(files))
        listed.append(summary)
    return listed


def list_splits(root: Root, splits: Sequence[str], classes: Sequence[str], reuse_dir: Path | None = None,
                map_folders: FolderMap | None = None) -> dict[str, Listing]:
    """All images of each split for `classes`, sorted by class order, then file name (bytewise,
    which for UTF-8 names is code-point order): every class folder of every split listed by
    one `map_folders` call, so a job lists them all at once. With `reuse_dir`, local class
    folders unchanged since an earlier run kept their listing there are not listed again."""
    # A store's prefixes are listed by requests, several at once; local folders one at a time.
    threads = LISTING_THREADS if isinstance(root, str) else 1
    listed = iter((map_folders or _here)(list_class_folder,
                                         [(root, split, name, reuse_dir) for split in splits for name in classes],
                                         threads))
    listings = {}
    for split in splits:
        folders = []
        for name in classes:
            folders.append(summary := next(listed))
            if summary.ignored:
                log.info("%s/%s/: ignored %d entries that are not image files", split, name, summary.ignored)
            if summary.not_kept:
                log.warning("%s", summary.not_kept)
        listings[split] = listing = Listing(split, tuple(classes), folders)
        log.info("%s: %d images in %d classes%s%s", split, len(listing), len(classes),
                 f" ({listing.reused} folder listings reused)" if listing.reused else "",
                 f" (listed from {root})" if isinstance(root, str) else "")
    return listings


def list_split(root: Root, split: str, classes: Sequence[str], reuse_dir: Path | None = None) -> Listing:
    """`list_splits` for one split, in this process."""
    return list_splits(root, [split], classes, reuse_dir)[split]


def check(root: Root, splits: Sequence[str], classes: Sequence[str]) -> list[str]:
    """Every split has a folder for every class (`check_split`); classes = all is every class
    folder of the training split, the first of `splits` (`class_folders`)."""
    classes = class_folders(root, splits[0]) if list(classes) == ["all"] else list(classes)
    for split in splits:
        check_split(root, split, classes)
    return classes


def plan(request: PlanRequest) -> SourcePlan:
    """Both splits listed (`list_splits`: every class folder by one `request.map_tasks` call),
    the first training images looked at and, without an image size, the headers of a few files
    of each split (a data set of several sizes is refused before any decode); shards of
    `shard_size` files, in listing order."""
    root, classes = request.root, list(request.classes)
    listings = list_splits(root, request.splits, classes, request.keep_dir, request.map_tasks)
    wanted, train = request.wanted, listings[request.train_split]
    first = first_images(root, train.head_paths(SHAPE_PROBES), wanted) if wanted else None
    if request.sizes_unknown:
        for listing in listings.values():
            check_sizes(root, listing.split, header_sizes(root, listing.spread_paths(SIZE_PROBES)), first.shape)
    shards = [shard for listing in listings.values() for shard in make_shards(listing, request.shard_size)]
    summary = ", ".join(f"{split} {len(listing)} images" for split, listing in listings.items())
    listed = {split: Listed(listing.counts(), np.array(listing.ignored, dtype=np.int64))
              for split, listing in listings.items()}
    return SourcePlan(NAME, classes, shards, f"{summary}, shards of up to {request.shard_size} images", first,
                      listed, sum(listing.reused for listing in listings.values()))


@dataclass(eq=False)
class Run:
    """Files [start, stop) of the listing blocks `files` of one class folder, laid end to end:
    a shard is one run or a few."""

    class_index: int
    files: list  # the blocks: ClassFiles, or Ray's ObjectRefs until the decoding task resolves them
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def listed(self) -> ClassFiles:
        """The run's files [start, stop) once its blocks are here."""
        joined = ClassFiles.concatenate(self.files)
        return ClassFiles(joined.names[self.start:self.stop],
                          None if joined.stamps is None else joined.stamps[self.start:self.stop])


@dataclass(eq=False)
class FolderShard:
    """`shard_size` consecutive images of a split's listing (the last shard may be shorter).

    The driver's record of a shard is a few numbers per class folder it touches (`runs`), not
    its file names: those stay in the listing (in a job, in Ray's object store) until the task
    that decodes the shard resolves them (`resolved`); `names`, `paths` and the rest need that."""

    split: str
    index: int
    shard_size: int  # of every shard of this split (the last may be shorter)
    classes: tuple[str, ...]
    runs: list[Run]  # in class order

    @property
    def name(self) -> str:
        """Unique per split, shard size and position: runs with other shard sizes keep their own chunks."""
        return f"{self.split}-{self.shard_size}-{self.index:06d}"

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def found(self) -> np.ndarray:
        """int64 [C + 1]: files per class (the last slot, records of no class, is 0 for folders)."""
        found = np.zeros(len(self.classes) + 1, dtype=np.int64)
        for r in self.runs:
            found[r.class_index] += len(r)
        return found

    def resolved(self, get) -> FolderShard:
        """This shard with each run's files fetched and cut to the run: `get` turns the
        blocks that are refs into ClassFiles (ray.get), in one call."""
        refs = [b for r in self.runs for b in r.files if not isinstance(b, ClassFiles)]
        got = iter(get(refs) if refs else ())
        runs = []
        for r in self.runs:
            blocks = [b if isinstance(b, ClassFiles) else next(got) for b in r.files]
            runs.append(Run(r.class_index, [Run(r.class_index, blocks, r.start, r.stop).listed()], 0, len(r)))
        return dataclasses.replace(self, runs=runs)

    # The shard's files: only where its blocks are (in-process, or once `resolved`).
    @property
    def names(self) -> np.ndarray:
        """bytes 'S' [N]: file names within their class folders."""
        return np.concatenate([r.listed().names for r in self.runs])

    @property
    def class_indices(self) -> np.ndarray:
        """int32 [N]."""
        return np.repeat(np.array([r.class_index for r in self.runs], dtype=np.int32), [len(r) for r in self.runs])

    @property
    def stamps(self) -> np.ndarray | None:
        """int64 [N, 2]: (size, mtime ns) as listed, for objects in a store; None for local files."""
        listed = [r.listed() for r in self.runs]
        return None if listed[0].stamps is None else np.concatenate([f.stamps for f in listed])

    @property
    def paths(self) -> list[str]:
        return relative_paths(self.split, self.classes, self.class_indices, self.names)

    # A chunk of a folder shard is reused only when the files are the same, as they are now.
    changed = "written from other files (names, sizes or modification times differ)"

    def key(self, root: Root, decoding: Decoding) -> str:
        """What the chunk is made from now (`groups_key`). Raises OSError when a local file
        cannot be stat'ed."""
        return groups_key(root, self.groups(), decoding.settings, self.stamps)

    def read(self, root: Root, decoding: Decoding) -> ShardRead:
        """The shard's files read and decoded (`decode_files`), with their classes."""
        done = decode_files(root, self.groups(), decoding, self.stamps)
        return ShardRead(done.images, self.class_indices[done.kept], done.paths, done.rejected, done.digest,
                         done.files_key, None, done.conversions, done.notes)

    def records(self, root: Root, shape: tuple[int, int]):
        """(path, class index, bytes or None, reason) of each file, for the converter."""
        for path, c in zip(self.paths, self.class_indices.tolist()):
            try:
                yield path, c, read_file(root, path), None
            except DecodeError as e:
                yield path, c, None, e.reason

    def groups(self) -> list[Group]:
        """The shard's files as runs sharing a class folder: [("train/3", [b"10.png", ...]), ...]."""
        return [(class_folder(self.split, self.classes[r.class_index]), r.listed().names.tolist())
                for r in self.runs]


def make_shards(listing: Listing, shard_size: int) -> list[FolderShard]:
    """Consecutive runs of `shard_size` images (the last may be shorter), in listing order,
    each a few (class folder, blocks, start, stop) runs: cut from the class folders' counts
    alone, each run naming only the listing blocks it reads."""
    bounds = np.cumsum([0, *(f.count for f in listing.folders)]).tolist()
    shards = []
    for index, start in enumerate(range(0, bounds[-1], shard_size)):
        stop, runs = min(start + shard_size, bounds[-1]), []
        for c, (folder, low, high) in enumerate(zip(listing.folders, bounds, bounds[1:])):
            if low < stop and start < high:
                a, b, size = max(start, low) - low, min(stop, high) - low, folder.block_size
                first, last = a // size, (b - 1) // size
                runs.append(Run(c, folder.blocks[first:last + 1], a - first * size, b - first * size))
        shards.append(FolderShard(listing.split, index, shard_size, listing.classes, runs))
    return shards


def first_images(root: Root, paths: Sequence[str], wanted: int = 1) -> FirstImages:
    """images.first_images of the files at `paths` (relative to the root), read one at a time
    until `wanted` decode: a file that cannot be read counts as one that does not decode."""
    def items():
        for path in paths:
            try:
                yield path, read_file(root, path)
            except DecodeError as e:
                yield path, e

    return images.first_images(items(), wanted)



def header_sizes(root: Root, paths: Sequence[str]) -> list[tuple[int, int]]:
    """(H, W) each file at `paths` declares in its header (images.header_size), for those that
    can be read and have one: what the planner compares before anything is decoded."""
    if is_uri(root):
        from mnist37.storage.objects import read_objects

        contents = read_objects(root, list(paths))
    else:
        contents = []
        for path in paths:
            try:
                contents.append(read_file(root, path))
            except DecodeError as e:
                contents.append(e)
    sizes = (images.header_size(data) for data in contents if isinstance(data, bytes) and data)
    return [size for size in sizes if size is not None]


def groups_key(root: Root, groups: Sequence[Group], settings: str, stamps: np.ndarray | None = None) -> str:
    """keys.files_key of these files as they are now, for decode `settings`
    (images.Decoding.settings): the names, and each file's (size, mtime)
    from `stat`, or for objects in a store as the listing found them (`stamps`, int64 [N, 2]:
    no request per file). Raises OSError when a local file cannot be stat'ed."""
    stats = file_stats(root, groups) if stamps is None else np.asarray(stamps, dtype=np.int64).reshape(-1, 2).tolist()
    return files_key(groups, stats, settings)


@dataclass
class FilesDecoded:
    """What `decode_files` made of N listed files."""

    images: np.ndarray  # uint8 [K, *Decoding.array_shape]: the K files that decoded, in order
    kept: np.ndarray  # bool [N]: which of the N files those are
    paths: list[str]  # [K] '/'-separated, relative to the root
    rejected: list[tuple[str, str]]  # (path, reason) of every file left out, in order
    digest: str  # the sum of each read file's keys.file_digest, as 32 hex digits
    files_key: str  # keys.files_key of the files as they were read
    conversions: dict[str, int] = field(default_factory=dict)  # "CMYK to RGB" -> files converted so
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, "JPEG data named .png")


def decode_files(root: Root, groups: Sequence[Group], decoding: Decoding, stamps: np.ndarray | None = None) -> FilesDecoded:
    """Every file of `groups` read (files.read_files: local files or objects alike) and decoded
    together (images.decode_images), in order. A file that cannot be read or decoded, or has another
    shape, is not an exception: it is left out and listed in `rejected` with its reason."""
    files = read_files(root, groups, stamps)
    done = decode_images(files.data, files.paths.__getitem__, decoding, files.paths)
    images, decoded, reasons = done.images, done.kept, done.reasons
    kept = np.zeros(len(files.read), dtype=bool)
    positions = np.flatnonzero(files.read)
    kept[positions[decoded]] = True
    rejected, paths = files.rejected, files.paths
    if reasons:  # merged with the unreadable files, in the files' order
        unreadable = np.flatnonzero(~files.read).tolist()
        order = sorted([*zip(unreadable, rejected), *((int(positions[i]), (paths[i], reason))
                                                       for i, reason in reasons.items())])
        rejected = [entry for _, entry in order]
        paths = [p for p, keep in zip(paths, decoded.tolist()) if keep]
    digest = sum(file_digest(os.fsencode(p), d) for p, d in zip(files.paths, files.data)) % (1 << 128)
    notes = [(files.paths[i], note) for i, note in sorted(done.notes.items())]
    return FilesDecoded(images, kept, paths, rejected, f"{digest:032x}", files_key(groups, files.stats, decoding.settings),
                   dict(done.conversions), notes)
