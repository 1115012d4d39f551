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

from mnist37 import Mnist37Error



class LocationError(Mnist37Error, ValueError):
    """A URI that pyarrow cannot open (unknown scheme, unreachable store, no such bucket)."""

def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (a pyarrow filesystem URI), False for a local path."""
    return "://" in str(location)


def under(root: str | os.PathLike, *parts: str) -> str | Path:
    """A location under a root, of the root's kind: a Path under a Path, else '/'-joined text
    (a URI, or a pyarrow filesystem path); empty parts and their slashes are dropped."""
    if not isinstance(root, str):
        return Path(root).joinpath(*parts)
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])


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


def open_location(location: str | os.PathLike):
    """`(filesystem, path)` for a location: `(None, path)` for a local path or `file://` URI,
    which callers open with the os module (and memory-map); a pyarrow FileSystem and its
    path (`bucket/key` for S3) for any other URI. The one place a location becomes a
    filesystem. Raises LocationError naming the location when pyarrow cannot open it.

    S3 credentials, region and endpoint come the standard AWS way (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, ~/.aws, instance roles)."""
    location = os.fspath(location)
    if not is_uri(location):
        return None, location
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise LocationError(f"{location!r}: not a filesystem pyarrow can open ({e})") from None
    return (None, path) if isinstance(fs, pafs.LocalFileSystem) else (fs, path)


def local_or_uri(location: str | os.PathLike) -> Path | str:
    """A local path as a Path (`file://` URIs included), any other URI as its string."""
    fs, path = open_location(location)
    return Path(path) if fs is None else os.fspath(location)
