"""The folder scan: find a data set's root and list its samples in a deterministic order.

Layout, as fastai's `untar_data` gives it: `<root>/<split>/<class>/<name>.png`. The label
of a sample is its class folder; class indices follow the order of `classes` in the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist37 import Mnist37Error, archive, datasets
from mnist37.config import Config, ConfigError
from mnist37.partials import claimed, partial_name
from mnist37.paths import is_uri, open_location, sample_path, under

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (b".png",)


class DatasetError(Mnist37Error, ValueError):
    """A data set folder that does not have the expected layout."""


@dataclass(eq=False)
class ClassFiles:
    """One class folder's images, sorted: the names (one fixed-width bytes array, not a
    Python object per file) and, for objects in a store, what the listing said of each. In a
    job these stay in Ray's object store, where the listing task left them: decode tasks read
    their shard's slice, the driver never holds them."""

    names: np.ndarray  # bytes 'S' [N]: file names within the class folder, bytewise sorted
    # int64 [N, 2]: (size, modification time in ns) of each object as the store listed it; only
    # for data in an object store, where it stands in for the stat a decode task would make.
    stamps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def concatenate(parts: Sequence[ClassFiles]) -> ClassFiles:
        if len(parts) == 1:
            return parts[0]
        return ClassFiles(np.concatenate([p.names for p in parts]),
                          None if parts[0].stamps is None else np.concatenate([p.stamps for p in parts]))

    def blocks(self, size: int) -> list[ClassFiles]:
        """These files in consecutive pieces of `size` (the last may be shorter)."""
        return [ClassFiles(self.names[a:a + size], None if self.stamps is None else self.stamps[a:a + size])
                for a in range(0, len(self), size)]


@dataclass(eq=False)
class ClassListing:
    """What the driver keeps of one class folder's listing: a few numbers, the first names
    (to find the image shape) and its files in blocks of `block_size`: in a job, refs to
    blocks in Ray's object store, so a decode task fetches the one or two its shard needs."""

    split: str
    class_name: str
    count: int  # image files listed
    ignored: int  # entries that are not image files (labels.csv, .DS_Store, folders)
    reused: bool  # the listing an earlier run kept, unchanged since
    head: np.ndarray  # bytes 'S' [<= HEAD_NAMES]: the first names
    blocks: list = field(default_factory=list)  # ClassFiles, or Ray's ObjectRefs to them
    block_size: int = 0  # files per block (the last block may hold fewer)
    # Why the listing could not be kept for the next run; logged by the driver, not the task
    # (a worker's lines reach the driver's stderr from Ray's log thread, at any moment).
    not_kept: str = ""

    def files(self) -> ClassFiles:
        """All the folder's files; in-process only (the blocks are here, not refs)."""
        return ClassFiles.concatenate(self.blocks)


# First names of each class folder the driver keeps, to find the image shape from.
HEAD_NAMES = 100


@dataclass(eq=False)
class Listing:
    """The sorted images of one split: its class folders' listings, in class order. Sample i
    of the split is sample i of the class folders laid end to end."""

    split: str
    classes: tuple[str, ...]
    folders: list[ClassListing]  # one per class, in class order

    def __len__(self) -> int:
        return sum(f.count for f in self.folders)

    @property
    def ignored(self) -> list[int]:
        return [f.ignored for f in self.folders]

    @property
    def reused(self) -> int:
        """Class folders whose listing an earlier run kept, unchanged since."""
        return sum(f.reused for f in self.folders)

    def counts(self) -> np.ndarray:
        """int64 [C]: image files listed per class."""
        return np.array([f.count for f in self.folders], dtype=np.int64)

    def head_paths(self, limit: int) -> list[str]:
        """'/'-separated paths of up to `limit` first images, in listing order."""
        paths = [sample_path(self.split, f.class_name, os.fsdecode(n)) for f in self.folders for n in f.head.tolist()]
        return paths[:limit]

    # In-process only (the files are here, not refs): the whole split as arrays.
    @property
    def class_indices(self) -> np.ndarray:
        """int32 [N]: the class of each image."""
        return np.repeat(np.arange(len(self.folders), dtype=np.int32), [f.count for f in self.folders])

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        """'/'-separated paths relative to the data root: "train/3/10.png"."""
        names = np.concatenate([f.files().names for f in self.folders])
        return relative_paths(self.split, self.classes, self.class_indices[start:stop], names[start:stop])


def relative_paths(split: str, classes: Sequence[str], class_indices: np.ndarray, names: np.ndarray) -> list[str]:
    """'/'-separated paths, relative to the data root, of listed images."""
    return [sample_path(split, classes[c], os.fsdecode(n)) for c, n in zip(class_indices.tolist(), names.tolist())]


# A data root: a local folder, or a URI of a prefix in an object store (s3://bucket/prefix).
Root = Path | str


def _subfolders(folder: Root) -> list[str]:
    if isinstance(folder, str):
        from mnist37.objects import subfolders
        return subfolders(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _is_folder(folder: Root) -> bool:
    if isinstance(folder, str):
        from mnist37.objects import check_folder
        return check_folder(folder)
    return folder.is_dir()


def _find_prefix(data: str, train_split: str) -> str:
    """`find_root` for a URI: the prefix holding `<split>/` prefixes, or the single prefix
    under it that does. A missing bucket or a refused listing is ObjectStoreError."""
    root = data.rstrip("/")
    if not _is_folder(root):
        raise DatasetError(f"data: {data} does not exist (no objects under this prefix)")
    if not _is_folder(under(root, train_split)):
        inner = _subfolders(root)
        if len(inner) == 1 and _is_folder(under(root, inner[0], train_split)):
            root = under(root, inner[0])
    return root


def find_root(data: str | Path, train_split: str, cache_dir: str | Path | None = None) -> Path:
    """The folder holding `<split>/` folders, from a folder, a .tgz archive, or the name of a
    data set in `datasets.DATASETS` (downloaded and verified once).

    An archive that wraps everything in one top folder (mnist_sample/...) resolves to that
    folder, as does a given folder with a single subfolder that holds the splits.
    """
    if (dataset := datasets.named(data)) is not None:
        data = datasets.download(dataset, cache_dir)
    if is_uri(data):
        fs, local = open_location(data)
        if fs is not None:
            if (source := archive.object_source(data, cache_dir)) is None:
                return _find_prefix(str(data), train_split)
            data = source.here()
        else:
            data = local  # file://: a local path
    path = Path(data).expanduser()
    if not str(data):
        raise DatasetError("data: no data set given; pass --data PATH (an ImageFolder folder or a .tgz "
                           f"archive) or one of {', '.join(datasets.DATASETS)}")
    if not path.exists():
        raise DatasetError(f"data: {path} does not exist")
    if path.is_file():
        if not archive.is_archive(path):
            raise DatasetError(f"data: {path} is neither a folder nor a .tgz/.tar.gz/.tar archive")
        path = archive.extract(path, cache_dir)
    if not (path / train_split).is_dir():
        inner = _subfolders(path)
        if len(inner) == 1 and (path / inner[0] / train_split).is_dir():
            path = path / inner[0]
    return path.resolve()


_BATCH = 65536

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
    Changes to a file's contents are not the listing's business; shards stat every file."""
    if reuse_dir is None:
        return (*_scan_images(folder), False, "")
    stamp = os.stat(folder)
    stamp = np.array([stamp.st_dev, stamp.st_ino, stamp.st_mtime_ns, stamp.st_ctime_ns], dtype=np.int64)
    kept = reuse_dir / f"{hashlib.blake2b(folder, digest_size=12).hexdigest()}.npz"
    try:
        with np.load(kept, allow_pickle=False) as saved:
            if np.array_equal(saved["stamp"], stamp) and saved["folder"].item() == folder:
                return saved["names"], int(saved["ignored"]), True, ""
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent, torn or from another version: list the folder
    listed_ns = time.time_ns()
    names, ignored = _scan_images(folder)
    not_kept = ""
    if listed_ns - max(stamp[2], stamp[3]) >= SETTLED_S * 1e9:
        temp = kept.with_name(partial_name(kept.name))
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            with claimed(temp), open(temp, "wb") as f:
                np.savez(f, folder=np.array(folder), stamp=stamp, names=names, ignored=np.int64(ignored))
                os.replace(temp, kept)
        except OSError as e:  # a listing not kept only costs the next run a scan
            not_kept = f"{os.fsdecode(folder)}: listing not kept for the next run: {e}"
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
    return names, ignored, False, not_kept


def _scan_images(folder: bytes) -> tuple[np.ndarray, int]:
    """`_image_names` from the folder itself.

    Names are gathered in batches of 64k, so a 600,000-file folder never exists as 600,000
    Python objects at once (~35 MB less peak memory); bytes sort in code-point order. Whether
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
    if not _is_folder(under(root, split)):
        found = ", ".join(_subfolders(root)) or "no folders"
        raise DatasetError(f"Split folder {split!r} not found under {root}; found: {found}")
    names = _subfolders(under(root, split))
    if len(names) < 2:
        raise DatasetError(f"classes = all: expected at least two class folders under {split}/, found {names}")
    return names


def check_split(root: Root, split: str, classes: Sequence[str]) -> None:
    """Raise DatasetError, naming what is there instead, unless `root/split/<class>/` exists
    for every class: two stats (or store requests) per class, so a wrong layout is reported
    before any listing."""
    split_dir = under(root, split)
    if not _is_folder(split_dir):
        found = ", ".join(_subfolders(root)) or "no folders"
        raise DatasetError(f"Split folder {split!r} not found under {root}; found: {found}")
    for name in classes:
        if not _is_folder(under(split_dir, name)):
            found = ", ".join(_subfolders(split_dir)) or "no folders"
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
        from mnist37.objects import list_objects

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
# per class folder, its blocks left in Ray's object store (mnist37.distributed.map_listings).
FolderMap = Callable[[Callable, Sequence[tuple]], Sequence[ClassListing]]


def _here(function: Callable, arguments: Sequence[tuple]) -> list[ClassListing]:
    listed = []
    for a in arguments:
        summary, files = function(*a)
        summary.blocks, summary.block_size = [files], max(1, len(files))
        listed.append(summary)
    return listed


def list_splits(root: Root, splits: Sequence[str], classes: Sequence[str], reuse_dir: Path | None = None,
                map_folders: FolderMap | None = None) -> dict[str, Listing]:
    """All images of each split for `classes`, sorted by class order, then file name (bytewise,
    which for UTF-8 names is code-point order): every class folder of every split listed by
    one `map_folders` call, so a job lists them all at once. With `reuse_dir`, local class
    folders unchanged since an earlier run kept their listing there are not listed again."""
    listed = iter((map_folders or _here)(list_class_folder,
                                         [(root, split, name, reuse_dir) for split in splits for name in classes]))
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


@dataclass(eq=False)
class Located:
    """The data set found, with its splits and classes resolved into the config."""

    cfg: Config  # train_split, eval_split and classes filled in
    root: Root  # the folder (or object store prefix) holding <split>/<class>/ folders, or a container format's files
    classes: list[str]  # in index order ("all" expanded for folders; containers resolve it in plan)
    format: str = "folder"  # or a container format (mnist37.formats)
    # The archive object the root was extracted from: tasks on other nodes extract it there too.
    archive: archive.ArchiveObject | None = None


def locate(cfg: Config) -> Located:
    """Find the data and resolve what the config left to the data set; fast (no listing), so
    a data problem is reported before Ray starts. A named data set is downloaded and an
    archive extracted here, once; later runs find them in the cache."""
    train, valid, classes = datasets.splits_and_classes(cfg.data)
    cfg = dataclasses.replace(cfg, train_split=cfg.train_split or train, eval_split=cfg.eval_split or valid,
                              classes=cfg.classes or classes)
    if cfg.train_split == cfg.eval_split:
        raise ConfigError(f"eval_split: must differ from train_split ({cfg.train_split!r})")
    root = find_root(cfg.data, cfg.train_split, cfg.cache_dir or None)
    source = archive.object_source(cfg.data, cfg.cache_dir or None)
    from mnist37 import formats  # here, not at the top: pyarrow.parquet is not needed to say "no such file"

    # Local or in an object store alike: the files (objects) under the root tell the format.
    inner = formats.container_root(root)
    fmt = formats.detect(inner, cfg.format)
    if fmt != "folder":
        root = inner
        formats.check_splits(root, fmt, (cfg.train_split, cfg.eval_split))
        return Located(cfg, root, list(cfg.classes), fmt, source)
    classes = class_folders(root, cfg.train_split) if cfg.classes == ["all"] else list(cfg.classes)
    for split in (cfg.train_split, cfg.eval_split):
        check_split(root, split, classes)
    return Located(cfg, root, classes, archive=source)
