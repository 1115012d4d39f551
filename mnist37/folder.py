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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
class Listing:
    """The sorted images of one split, compactly: the driver of a million-image job holds
    file names as one fixed-width bytes array, not a million Python objects."""

    split: str
    classes: tuple[str, ...]
    names: np.ndarray  # bytes 'S' [N]: file names within their class folder
    class_indices: np.ndarray  # int32 [N], into `classes`
    ignored: list[int]  # per class: entries that are not image files (labels.csv, .DS_Store, folders)
    reused: int = 0  # class folders whose listing an earlier run kept, unchanged since
    # int64 [N, 2]: (size, modification time in ns) of each object as the store listed it; only
    # for data in an object store, where it stands in for the stat a decode task would make.
    stamps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        """'/'-separated paths relative to the data root: "train/3/10.png"."""
        return relative_paths(self.split, self.classes, self.class_indices[start:stop], self.names[start:stop])

    def counts(self) -> dict[str, int]:
        per_class = np.bincount(self.class_indices, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, per_class)}


def relative_paths(split: str, classes: Sequence[str], class_indices: np.ndarray, names: np.ndarray) -> list[str]:
    """'/'-separated paths, relative to the data root, of listed images."""
    return [sample_path(split, classes[c], os.fsdecode(n)) for c, n in zip(class_indices.tolist(), names.tolist())]


# A data root: a local folder, or a URI of a prefix in an object store (s3://bucket/prefix).
Root = Path | str


_under = under  # a location under a root, of the root's kind


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
    if not _is_folder(_under(root, train_split)):
        inner = _subfolders(root)
        if len(inner) == 1 and _is_folder(_under(root, inner[0], train_split)):
            root = _under(root, inner[0])
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
            if archive.is_archive(Path(local)):
                raise DatasetError(f"data: {data}: archives are read from local paths only; "
                                   "upload the extracted ImageFolder, or copy the archive here")
            return _find_prefix(str(data), train_split)
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


def _image_names(folder: bytes, reuse_dir: Path | None = None) -> tuple[np.ndarray, int, bool]:
    """Sorted names of the image files in `folder` as a fixed-width bytes array, how many
    other entries (files of other types, subfolders) were ignored, and whether the listing
    was reused.

    With `reuse_dir`, a listing kept there by an earlier run is reused while the folder's
    device, inode, mtime and ctime are unchanged: adding, removing or renaming an entry moves
    its folder's mtime and ctime (ctime cannot be set back, as `tar` and `rsync -t` set mtime).
    Changes to a file's contents are not the listing's business; shards stat every file."""
    if reuse_dir is None:
        return (*_scan_images(folder), False)
    stamp = os.stat(folder)
    stamp = np.array([stamp.st_dev, stamp.st_ino, stamp.st_mtime_ns, stamp.st_ctime_ns], dtype=np.int64)
    kept = reuse_dir / f"{hashlib.blake2b(folder, digest_size=12).hexdigest()}.npz"
    try:
        with np.load(kept, allow_pickle=False) as saved:
            if np.array_equal(saved["stamp"], stamp) and saved["folder"].item() == folder:
                return saved["names"], int(saved["ignored"]), True
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent, torn or from another version: list the folder
    listed_ns = time.time_ns()
    names, ignored = _scan_images(folder)
    if listed_ns - max(stamp[2], stamp[3]) >= SETTLED_S * 1e9:
        temp = kept.with_name(partial_name(kept.name))
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            with claimed(temp), open(temp, "wb") as f:
                np.savez(f, folder=np.array(folder), stamp=stamp, names=names, ignored=np.int64(ignored))
                os.replace(temp, kept)
        except OSError as e:  # a listing not kept only costs the next run a scan
            log.warning("%s: listing not kept for the next run: %s", os.fsdecode(folder), e)
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
    return names, ignored, False


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
    if not _is_folder(_under(root, split)):
        found = ", ".join(_subfolders(root)) or "no folders"
        raise DatasetError(f"Split folder {split!r} not found under {root}; found: {found}")
    names = _subfolders(_under(root, split))
    if len(names) < 2:
        raise DatasetError(f"classes = all: expected at least two class folders under {split}/, found {names}")
    return names


def check_split(root: Root, split: str, classes: Sequence[str]) -> None:
    """Raise DatasetError, naming what is there instead, unless `root/split/<class>/` exists
    for every class: two stats (or store requests) per class, so a wrong layout is reported
    before any listing."""
    split_dir = _under(root, split)
    if not _is_folder(split_dir):
        found = ", ".join(_subfolders(root)) or "no folders"
        raise DatasetError(f"Split folder {split!r} not found under {root}; found: {found}")
    for name in classes:
        if not _is_folder(_under(split_dir, name)):
            found = ", ".join(_subfolders(split_dir)) or "no folders"
            raise DatasetError(f"Class {name!r} has no folder under {split}/; found: {found}")


def list_object_folder(location: str) -> tuple[np.ndarray, np.ndarray, int]:
    """One class prefix of an object store: the image names (bytes 'S' [N], sorted), their
    `int64 [N, 2]` (size, mtime in ns) and how many other entries were ignored. Runs where
    it is called: the job runs it as one Ray task per class prefix."""
    from mnist37.objects import list_objects

    names, stamps, folders = list_objects(location)
    names = np.array(names, dtype=bytes) if names else np.array([], dtype="S1")
    keep = _image_mask(names)
    names, stamps = names[keep], stamps[keep]
    order = np.argsort(names, kind="stable")
    return names[order], stamps[order], folders + int((~keep).sum())


# Maps a function over class folder locations, yielding results in order: serially here by
# default, as Ray tasks in the job (mnist37.distributed.map_tasks).
FolderMap = Callable[[Callable, Sequence[str]], Iterable]


def list_split(root: Root, split: str, classes: Sequence[str], reuse_dir: Path | None = None,
               map_folders: FolderMap | None = None) -> Listing:
    """All images of `split` for `classes`, sorted by class order, then file name (bytewise,
    which for UTF-8 names is code-point order). With `reuse_dir`, class folders unchanged
    since an earlier run kept their listing there are not listed again (`_image_names`).

    A root in an object store is listed one class prefix at a time through `map_folders`
    (the job's runs them as Ray tasks, all at once), and the listing keeps each object's
    (size, mtime) in `stamps`."""
    check_split(root, split, classes)
    if isinstance(root, str):
        return _list_object_split(root, split, classes, map_folders or map)
    names, class_indices, ignored, reused = [], [], [], 0
    for index, name in enumerate(classes):
        files, others, kept = _image_names(os.fsencode(root / split / name), reuse_dir)
        ignored.append(others)
        reused += kept
        if others:
            log.info("%s/%s/: ignored %d entries that are not image files", split, name, others)
        if not len(files):
            raise DatasetError(f"Class {name!r} has no images under {split}/")
        names.append(files)
        class_indices.append(np.full(len(files), index, dtype=np.int32))
    width = max(n.dtype.itemsize for n in names)
    listing = Listing(split, tuple(classes), np.concatenate([n.astype(f"S{width}") for n in names]),
                      np.concatenate(class_indices), ignored, reused)
    log.info("%s: %d images in %d classes%s", split, len(listing), len(classes),
             f" ({reused} folder listings reused)" if reused else "")
    return listing


@dataclass(eq=False)
class Located:
    """The data set found, with its splits and classes resolved into the config."""

    cfg: Config  # train_split, eval_split and classes filled in
    root: Root  # the folder (or object store prefix) holding <split>/<class>/ folders, or a container format's files
    classes: list[str]  # in index order ("all" expanded for folders; containers resolve it in plan)
    format: str = "folder"  # or a container format (mnist37.formats)


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
    from mnist37 import formats  # here, not at the top: pyarrow.parquet is not needed to say "no such file"

    # Local or in an object store alike: the files (objects) under the root tell the format.
    inner = formats.container_root(root)
    fmt = formats.detect(inner, cfg.format)
    if fmt != "folder":
        root = inner
        formats.check_splits(root, fmt, (cfg.train_split, cfg.eval_split))
        return Located(cfg, root, list(cfg.classes), fmt)
    classes = class_folders(root, cfg.train_split) if cfg.classes == ["all"] else list(cfg.classes)
    for split in (cfg.train_split, cfg.eval_split):
        check_split(root, split, classes)
    return Located(cfg, root, classes)


def _list_object_split(root: str, split: str, classes: Sequence[str], map_folders: FolderMap) -> Listing:
    """`list_split` for a prefix of an object store (no listing reuse: listing a prefix is
    what finds out whether it changed)."""
    folders = [_under(root, split, name) for name in classes]
    names, stamps, class_indices, ignored = [], [], [], []
    for index, (name, (files, stamp, others)) in enumerate(zip(classes, map_folders(list_object_folder, folders))):
        if others:
            log.info("%s/%s/: ignored %d entries that are not image files", split, name, others)
        if not len(files):
            raise DatasetError(f"Class {name!r} has no images under {_under(root, split)}/")
        names.append(files)
        stamps.append(stamp)
        ignored.append(others)
        class_indices.append(np.full(len(files), index, dtype=np.int32))
    width = max(n.dtype.itemsize for n in names)
    listing = Listing(split, tuple(classes), np.concatenate([n.astype(f"S{width}") for n in names]),
                      np.concatenate(class_indices), ignored, 0, np.concatenate(stamps))
    log.info("%s: %d images in %d classes (listed from %s)", split, len(listing), len(classes), root)
    return listing
