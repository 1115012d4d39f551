"""The folder scan: find a data set's root and list its samples in a deterministic order.

Layout, as fastai's `untar_data` gives it: `<root>/<split>/<class>/<name>.png`. The label
of a sample is its class folder; class indices follow the order of `classes` in the config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mnist37 import Mnist37Error, archive

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png",)


class DatasetError(Mnist37Error, ValueError):
    """A data set folder that does not have the expected layout."""


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data root, '/'-separated: "train/3/10.png"
    class_index: int


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def find_root(data: str | Path, train_split: str, cache_dir: str | Path | None = None) -> Path:
    """The folder holding `<split>/` folders, from a folder or a .tgz archive.

    An archive that wraps everything in one top folder (mnist_sample/...) resolves to that
    folder, as does a given folder with a single subfolder that holds the splits.
    """
    if not str(data):
        raise DatasetError("data: no data set given; pass --data PATH (an ImageFolder folder or a .tgz archive)")
    path = Path(data).expanduser()
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


def list_samples(root: Path, split: str, classes: list[str]) -> list[Sample]:
    """All images of `split` for `classes`, sorted by class order, then file name."""
    split_dir = root / split
    if not split_dir.is_dir():
        found = ", ".join(_subfolders(root)) or "no folders"
        raise DatasetError(f"Split folder {split!r} not found under {root}; found: {found}")
    samples = []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            found = ", ".join(_subfolders(split_dir)) or "no folders"
            raise DatasetError(f"Class {name!r} has no folder under {split}/; found: {found}")
        files = sorted(e.name for e in os.scandir(class_dir)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DatasetError(f"Class {name!r} has no images under {split}/")
        samples.extend(Sample(f"{split}/{name}/{f}", index) for f in files)
    log.info("%s: %d images in %d classes", split, len(samples), len(classes))
    return samples
