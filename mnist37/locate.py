"""Finding the data: the data root a `--data` value names, and what the config leaves to it.

`--data` is a folder, an archive (`.tgz`, `.tar.gz`, `.tar`: extracted once, mnist37.sources.
archive), the name of a data set downloaded once (mnist37.sources.named), or a URI of a prefix
or an archive in an object store. `locate` finds the root, detects its format through the
sources table and checks its splits and classes, before Ray starts: a data problem is one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mnist37 import DatasetError
from mnist37.config import Config, ConfigError
from mnist37.storage.locations import is_uri, open_location, under
from mnist37.sources import archive, named
from mnist37.storage.files import Root, is_folder, subfolders

def _find_prefix(data: str, train_split: str) -> str:
    """`find_root` for a URI: the prefix holding `<split>/` prefixes, or the single prefix
    under it that does. A missing bucket or a refused listing is ObjectStoreError."""
    root = data.rstrip("/")
    if not is_folder(root):
        raise DatasetError(f"data: {data} does not exist (no objects under this prefix)")
    if not is_folder(under(root, train_split)):
        inner = subfolders(root)
        if len(inner) == 1 and is_folder(under(root, inner[0], train_split)):
            root = under(root, inner[0])
    return root


def find_root(data: str | Path, train_split: str, cache_dir: str | Path | None = None) -> Path:
    """The folder holding `<split>/` folders, from a folder, a .tgz archive, or the name of a
    data set in `named.DATASETS` (downloaded and verified once).

    An archive that wraps everything in one top folder (mnist_sample/...) resolves to that
    folder, as does a given folder with a single subfolder that holds the splits.
    """
    if (dataset := named.named(data)) is not None:
        data = named.download(dataset, cache_dir)
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
                           f"archive) or one of {', '.join(named.DATASETS)}")
    if not path.exists():
        raise DatasetError(f"data: {path} does not exist")
    if path.is_file():
        if not archive.is_archive(path):
            raise DatasetError(f"data: {path} is neither a folder nor a .tgz/.tar.gz/.tar archive")
        path = archive.extract(path, cache_dir)
    if not (path / train_split).is_dir():
        inner = subfolders(path)
        if len(inner) == 1 and (path / inner[0] / train_split).is_dir():
            path = path / inner[0]
    return path.resolve()


@dataclass(eq=False)
class Located:
    """The data set found, with its splits and classes resolved into the config."""

    cfg: Config  # train_split, eval_split and classes filled in
    root: Root  # the folder (or object store prefix) holding the data set's splits
    classes: list[str]  # in index order (`check` of its format: "all" expanded where the layout names them)
    format: str  # a name in mnist37.sources.FORMATS
    # The archive object the root was extracted from: tasks on other nodes extract it there too.
    archive: archive.ArchiveObject | None = None


def locate(cfg: Config) -> Located:
    """Find the data and resolve what the config left to the data set; fast (no listing), so
    a data problem is reported before Ray starts. A named data set is downloaded and an
    archive extracted here, once; later runs find them in the cache."""
    train, valid, classes = named.splits_and_classes(cfg.data)
    cfg = dataclasses.replace(cfg, train_split=cfg.train_split or train, eval_split=cfg.eval_split or valid,
                              classes=cfg.classes or classes)
    if cfg.train_split == cfg.eval_split:
        raise ConfigError(f"eval_split: must differ from train_split ({cfg.train_split!r})")
    root = find_root(cfg.data, cfg.train_split, cfg.cache_dir or None)
    source = archive.object_source(cfg.data, cfg.cache_dir or None)
    from mnist37 import sources

    # Local or in an object store alike: the files (objects) under the root tell the format;
    # a container data set wrapped in one top folder is found inside it.
    root = sources.container_root(root)
    fmt = sources.detect(root, cfg.format)
    classes = sources.format_module(fmt).check(root, (cfg.train_split, cfg.eval_split), cfg.classes)
    return Located(cfg, root, classes, fmt, source)
