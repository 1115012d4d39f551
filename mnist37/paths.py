"""Where things are: the one home of the facts that several modules need about locations.

- A location is a local path or a URI that pyarrow.fs understands (`file://`, `s3://`, ...).
- The cache (extracted archives, downloads, default chunk folders) is `cache_dir` when the
  config gives one, else `$MNIST37_CACHE`, else `$XDG_CACHE_HOME/mnist37`, else `~/.cache/mnist37`.
- An image of an ImageFolder data set is `<split>/<class>/<name>` under the data root,
  '/'-separated whatever the platform.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (a pyarrow filesystem URI), False for a local path."""
    return "://" in str(location)


def cache_home(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir` if given, else $MNIST37_CACHE, else
    $XDG_CACHE_HOME/mnist37, else ~/.cache/mnist37."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("MNIST37_CACHE"):
        return Path(os.environ["MNIST37_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist37"


def class_folder(split: str, class_name: str) -> str:
    """A class folder relative to the data root: "train/3"."""
    return f"{split}/{class_name}"


def sample_path(split: str, class_name: str, name: str) -> str:
    """An image relative to the data root: "train/3/10.png"."""
    return f"{class_folder(split, class_name)}/{name}"
