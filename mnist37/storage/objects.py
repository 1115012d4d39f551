"""Object stores (S3 and S3-compatible stores, GCS, HDFS: any pyarrow filesystem behind a URI):
listing a prefix, reading many small objects at once, writing an object whole.

Small objects are latency-bound: a decode task keeps `REQUESTS_IN_FLIGHT` reads open at once
(benchmarks/object_requests/ measured the choice; docs/object-storage.md). Each request goes
through `retries.retrying`.

An object that is gone since it was listed is not such an error: like a local file deleted
after listing it is a rejected file, counted and reported (decode.read_reason).

pyarrow 26's `open_input_stream` on S3 sends a HEAD before the GET (as `open_input_file` does):
two requests per object.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import numpy as np

from mnist37.storage.locations import open_location
from mnist37.storage.retries import ObjectStoreError, retrying

# Reads in flight per decode task: the fewest within 10% of the best objects/s with each request
# held 30 ms and 100 ms (`python benchmarks/object_requests/object_benchmark.py --latency-ms 30`,
# then `--latency-ms 100`: 64 and 32; benchmarks/object_requests/README.md). MNIST37_OBJECT_REQUESTS overrides it (set where the job starts,
# it reaches a local Ray's workers).
REQUESTS_IN_FLIGHT = int(os.environ.get("MNIST37_OBJECT_REQUESTS") or 64)


def _uri(location: str, path: str) -> str:
    """The URI of `path` on the filesystem of `location`: what error messages name."""
    return f"{location.split('://', 1)[0]}://{path}"


def check_folder(location: str) -> bool:
    """Whether a prefix holds anything (a "folder" of the store); ObjectStoreError when its
    bucket does not exist or the store refuses the request."""
    import pyarrow.fs as pafs

    fs, path = open_location(location)
    info = retrying(location, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.Directory:
        return True
    bucket = path.split("/", 1)[0]
    if retrying(location, lambda: fs.get_file_info(bucket)).type == pafs.FileType.NotFound:
        raise ObjectStoreError(f"{_uri(location, bucket)}: bucket not found (while looking for {location})")
    return False


def subfolders(location: str) -> list[str]:
    """Names of the "folders" (common prefixes) right under a prefix, sorted; [] when the
    prefix holds nothing."""
    import pyarrow.fs as pafs

    fs, path = open_location(location)
    try:
        infos = retrying(location, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    except FileNotFoundError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def list_objects(location: str) -> tuple[list[bytes], np.ndarray, int]:
    """The objects right under a prefix: their names (bytes, in the store's order), `int64
    [N, 2]` (size, modification time in ns) and how many "folders" were there too.

    pyarrow pages through the store's listing (1,000 keys a page on S3) by itself."""
    import pyarrow.fs as pafs

    fs, path = open_location(location)
    try:
        infos = retrying(location, lambda: fs.get_file_info(pafs.FileSelector(path)))
    except FileNotFoundError:
        raise ObjectStoreError(f"{location}: no objects under this prefix (was it deleted after it was found?)") from None
    files = [i for i in infos if i.type == pafs.FileType.File]
    stamps = np.array([(i.size, i.mtime_ns or 0) for i in files], dtype=np.int64).reshape(-1, 2)
    return [i.base_name.encode() for i in files], stamps, len(infos) - len(files)


def read_objects(location: str, names: Sequence[str], requests: int = REQUESTS_IN_FLIGHT) -> list[bytes | OSError]:
    """The bytes of the objects `<location>/<name>`, in order, `requests` at a time. An object
    gone since it was listed comes back as its FileNotFoundError; anything final raises
    ObjectStoreError (see `retrying`)."""
    fs, root = open_location(location)
    base = location.rstrip("/")

    def read(name: str) -> bytes | OSError:
        def get() -> bytes:
            with fs.open_input_stream(f"{root.rstrip('/')}/{name}") as f:
                return f.read()
        try:
            return retrying(f"{base}/{name}", get)
        except FileNotFoundError as e:
            return e

    if requests <= 1 or len(names) <= 1:
        return [read(n) for n in names]
    with ThreadPoolExecutor(max_workers=requests) as pool:
        return list(pool.map(read, names))


def write_object(location: str, write: Callable[[IO[bytes]], object]) -> int:
    """Write one object whole with `write(stream)`; return its size in bytes. An S3 object
    appears only when its upload completes, so a reader finds the old object, the new one, or
    none. Each try (`write` is called again for each) goes through `retrying`: a store
    answering 503 past the SDK's tries is asked again, and one that keeps refusing is an
    ObjectStoreError naming `location`. Callers publish through `writes.publish`."""
    fs, path = open_location(location)

    def put() -> int:
        with fs.open_output_stream(path) as f:
            write(f)
            return f.tell()
    return retrying(location, put)
