"""Where things are: the one home of the facts that several modules need about locations.

- A location is a local path or a URI that pyarrow.fs understands (`file://`, `s3://`, ...).
  A URI never carries a credential (`secret_part`): no user info, no secret-like query
  parameter; credentials come from each node's environment.
- The cache (extracted archives, downloads, default chunk folders) is `cache_dir` when the
  config gives one, else `$MNIST37_CACHE`, else `$XDG_CACHE_HOME/mnist37`, else `~/.cache/mnist37`.
- An image of an ImageFolder data set is `<split>/<class>/<name>` under the data root,
  '/'-separated whatever the platform.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from mnist37 import Mnist37Error



class LocationError(Mnist37Error, ValueError):
    """A URI that pyarrow cannot open (unknown scheme, unreachable store, no such bucket)."""


# Query parameters that carry a credential, by any spelling (case, '-' or '_', a vendor's
# prefix): pyarrow's own S3 options (access_key, secret_key, session_token), presigned URLs
# (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature), Azure SAS (sig),
# and the usual words.
_SECRET_WORDS = ("secret", "token", "signature", "password", "passwd", "credential", "accesskey", "access_key",
                 "apikey", "api_key", "private")
_SECRET_NAMES = {"sig", "key", "pwd", "pass", "auth", "authorization"}


def secret_part(location: str | os.PathLike) -> str | None:
    """The part of a URI that holds a credential, in words that never repeat it: "user info"
    (`s3://KEY:SECRET@bucket/x`, `gs://user@bucket`), "query parameter 'access_key'"; None for
    a local path or a URI without one. The one gate: the config refuses such a location
    (`config.validate`), and `open_location` would too."""
    text = os.fspath(location)
    if not is_uri(text):
        return None
    authority, _, rest = text.split("://", 1)[1].partition("/")
    if "@" in authority.split("?", 1)[0].split("#", 1)[0]:
        return "user info"
    query = text.split("?", 1)[1].split("#", 1)[0] if "?" in text else ""
    for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True):
        word = name.strip().lower().replace("-", "_")
        if word in _SECRET_NAMES or any(w in word for w in _SECRET_WORDS):
            return f"query parameter {name.strip()!r}"
    return None


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


# Tries per object-store request that pyarrow (the AWS SDK) makes itself; each waits at most
# StoreSettings.timeout_s for the store to accept the connection and to send each part of its
# answer. retries.retrying adds a few tries of its own, within a total deadline per request.
STORE_ATTEMPTS = 3


@dataclass(frozen=True)
class StoreSettings:
    """How this job reaches its object store: made once on the driver, from its environment
    and config (`from_environment`), and handed to every task with its arguments
    (`mnist37.on_ray.tasks`), so a task on any node reaches the store the driver reached,
    whatever that node's own environment says. Credentials are not in it: each node keeps
    its own (AWS_ACCESS_KEY_ID, ~/.aws, an instance or pod role), never copied by the job.
    Options given in a URI (`s3://b/p?endpoint_override=...&region=...`) travel in the URI."""

    endpoint: str | None = None  # AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL; None: AWS itself
    region: str | None = None  # AWS_REGION, else AWS_DEFAULT_REGION; None: the bucket's own
    virtual_addressing: bool | None = None  # bucket.host addressing (AWS_S3_ADDRESSING_STYLE=virtual)
    timeout_s: float = 12.0  # connect and read silence per try (the store_timeout_s key)

    @classmethod
    def from_environment(cls, timeout_s: float = 12.0, environ: dict | None = None) -> StoreSettings:
        env = os.environ if environ is None else environ
        style = (env.get("AWS_S3_ADDRESSING_STYLE") or "").lower()
        return cls(endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
                   virtual_addressing={"virtual": True, "path": False}.get(style),
                   timeout_s=timeout_s)

    def where(self) -> str:
        """The endpoint in words, for messages."""
        return f"endpoint {self.endpoint}" if self.endpoint else "AWS's own endpoint (no AWS_ENDPOINT_URL)"


class StoreMismatch(Mnist37Error, RuntimeError):
    """A task's node would reach another store than the driver did."""


_store: StoreSettings | None = None  # None: from this process's environment, at each use


def use_store(settings: StoreSettings | None, driver: bool = False) -> None:
    """Reach object stores with `settings` from now on in this process: the driver's record,
    on the driver (`driver=True`) and in every task; None goes back to this process's own
    environment (a job run in-process puts it back when it ends). In a task, a node whose own
    environment names an endpoint the record cannot override (the driver used AWS itself, the
    node sets AWS_ENDPOINT_URL, which the AWS SDK would read) makes `open_location` raise
    StoreMismatch naming both."""
    global _store, _in_task
    if (settings, settings is not None and not driver) != (_store, _in_task):
        _store, _in_task = settings, settings is not None and not driver
        _filesystems.cache_clear()


_in_task = False  # whether _store is a record handed down from the driver


def store() -> StoreSettings:
    """The settings this process reaches object stores with (see `use_store`)."""
    return _store if _store is not None else StoreSettings.from_environment()


@functools.lru_cache(maxsize=16)
def _filesystems(settings: StoreSettings, bucket: str, options: tuple[tuple[str, str], ...]):
    """An S3FileSystem for `settings` and the URI's own options: timeouts and tries set, so a
    store that never answers is an error in about STORE_ATTEMPTS x timeout_s."""
    import pyarrow.fs as pafs

    given = dict(options)
    unknown = set(given) - {"endpoint_override", "region", "scheme", "force_virtual_addressing"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r} in the URI")
    endpoint = given.get("endpoint_override") or settings.endpoint
    if endpoint is None and _in_task and (own := StoreSettings.from_environment().endpoint):
        import socket
        raise StoreMismatch(
            f"object store settings differ: the driver reached s3://{bucket} at {settings.where()}, but this "
            f"task on {socket.gethostname()} would use endpoint {own} (its own AWS_ENDPOINT_URL); unset it on "
            "that node, or give the job that endpoint")
    region = given.get("region") or settings.region
    if region is None and endpoint is None:
        region = pafs.resolve_s3_region(bucket)  # as FileSystem.from_uri does
    virtual = given.get("force_virtual_addressing")
    return pafs.S3FileSystem(
        region=region or "us-east-1", endpoint_override=endpoint, scheme=given.get("scheme"),
        connect_timeout=settings.timeout_s, request_timeout=settings.timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=STORE_ATTEMPTS),
        force_virtual_addressing=(virtual.lower() == "true") if virtual else bool(settings.virtual_addressing))


def open_location(location: str | os.PathLike):
    """`(filesystem, path)` for a location: `(None, path)` for a local path or `file://` URI,
    which callers open with the os module (and memory-map); a pyarrow FileSystem and its
    path (`bucket/key` for S3) for any other URI. The one place a location becomes a
    filesystem. Raises LocationError naming the location when pyarrow cannot open it.

    S3 endpoint, region and addressing come from this process's StoreSettings (`use_store`:
    the driver's, in every task), timeouts and tries set; credentials the standard AWS way
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles), on each node."""
    location = os.fspath(location)
    if not is_uri(location):
        return None, location
    if part := secret_part(location):
        raise LocationError(f"a location with a credential in its {part} is refused (not shown); give credentials "
                            "through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws)")
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:  # StoreMismatch is not caught here: it names both endpoints itself
        if location.startswith("s3://"):
            parts = urllib.parse.urlsplit(location)
            options = tuple(sorted(urllib.parse.parse_qsl(parts.query)))
            fs = _filesystems(store(), parts.netloc, options)
            return fs, parts.netloc + parts.path.rstrip("/") if parts.path.strip("/") else parts.netloc
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise LocationError(f"{location!r}: not a filesystem pyarrow can open ({e})") from None
    return (None, path) if isinstance(fs, pafs.LocalFileSystem) else (fs, path)


def local_or_uri(location: str | os.PathLike) -> Path | str:
    """A local path as a Path (`file://` URIs included), any other URI as its string."""
    fs, path = open_location(location)
    return Path(path) if fs is None else os.fspath(location)
