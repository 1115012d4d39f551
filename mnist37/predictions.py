"""Per-image predictions: one Parquet file per evaluation chunk under `<out>/predictions/`,
written by the classify task that classified the chunk, so the driver never holds a row per image.

Columns (docs/output.md), in this order: `path` (the image's file relative to the data root; in
a container, `<container>:<record key or index>`), `split`, `true` (class index), `true_name`,
then per metric `<metric>_predicted`, `<metric>_distance` (to the true class's prototype) and
`<metric>_margin` (d(true) - d(predicted): 0 when right); with `predictions = "full"` also
`<metric>_distances` (`list<float32>`, to every prototype) and, with top-k on, `<metric>_top_k`
(whether the true class is among the k nearest, exactly: distances.in_top_k).

A file is named by the evaluation order, `<split>-<shard index:06d>.parquet` (never by which
task finished first), and its rows are the chunk's, in listing order: the files read in name
order are the evaluation split in listing order, for any shard size and cluster. Each file's
schema metadata holds `mnist37.key`: a digest of the chunk's checksum and everything else its
rows depend on (prototypes, classes, metrics, columns, k); results.json lists every file with its
key and rows, and `read` checks them, so a run that stopped half way through rewriting a folder
is never read as the run results.json describes.

Files go through `storage.publish` (atomic, local or object store). The classify task publishes
its file itself when every node reaches the output location (an object-store prefix, or a Ray
of one node); otherwise it sends the file's bytes back with its result and the driver publishes
them (`publish_returned`), one chunk's at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnist37 import Mnist37Error, __version__
from mnist37.arrays import arrow_array, arrow_strings
from mnist37.storage.locations import is_uri, open_location
from mnist37.storage.writes import publish, writing

log = logging.getLogger(__name__)

LEVELS = ("none", "brief", "full")
FOLDER = "predictions"
KEY = b"mnist37.key"


class PredictionsError(Mnist37Error, ValueError):
    """A predictions folder that does not hold what results.json lists."""


@dataclass(frozen=True)
class PredictionsRequest:
    """What a classify task needs to write its chunk's predictions file."""

    columns: str  # "brief" | "full"
    folder: str  # <out>/predictions: an absolute local path or a URI
    split: str
    classes: tuple[str, ...]
    metrics: tuple[str, ...]
    top_k: int  # 0: off (no <metric>_top_k column)
    run_key: str  # digest of what the rows depend on besides the chunk (see module docstring)
    publish: bool  # the task publishes the file; False: its bytes go back to the driver
    name: str = ""  # this chunk's file name (for_chunk)

    def for_chunk(self, index: int) -> PredictionsRequest:
        return dataclasses.replace(self, name=file_name(self.split, index))


@dataclass
class PredictionsFile:
    """What a classify task reports of the file it wrote (or sends back to be written)."""

    name: str
    rows: int
    num_bytes: int
    key: str
    elapsed_s: float  # building and publishing it (or encoding, when the driver publishes)
    data: bytes | None = None  # the file, when the driver publishes it

    def record(self) -> dict:
        return {"name": self.name, "rows": self.rows, "num_bytes": self.num_bytes, "key": self.key}


def file_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.parquet"


def folder_of(out: str | os.PathLike) -> str:
    """`<out>/predictions` as every node names it: a URI, or an absolute local path."""
    out = os.fspath(out)
    if is_uri(out) and not out.startswith("file://"):
        return f"{out.rstrip('/')}/{FOLDER}"
    return str(Path(out.removeprefix("file://")).absolute() / FOLDER)


def run_key(prototypes: np.ndarray, classes: Sequence[str], metrics: Sequence[str], columns: str, top_k: int,
            split: str) -> str:
    """A digest of everything a predictions file's rows depend on besides its chunk."""
    digest = hashlib.sha256(np.ascontiguousarray(prototypes, dtype=np.float32).tobytes())
    digest.update(json.dumps([__version__, list(classes), list(metrics), columns, top_k, split]).encode())
    return digest.hexdigest()


def make_request(columns: str, out: str | os.PathLike, split: str, classes: Sequence[str], metrics: Sequence[str],
                 top_k: int, prototypes: np.ndarray, tasks_publish: bool) -> PredictionsRequest | None:
    """The run's request (`for_chunk` names each chunk's file), or None for `columns = "none"`."""
    if columns == "none":
        return None
    return PredictionsRequest(columns, folder_of(out), split, tuple(classes), tuple(metrics), top_k,
                              run_key(prototypes, classes, metrics, columns, top_k, split), tasks_publish)


# Arrays are built from their buffers (arrays.arrow_array, arrow_strings): pa.array() looks for
# pandas objects, importing pandas where it is installed, ~1.5 s of each classify worker's first
# file on this machine.


def _dictionary(values: Sequence[str], indices: np.ndarray) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(arrow_array(np.asarray(indices, dtype=np.int32)), arrow_strings(values))


def chunk_table(request: PredictionsRequest, paths: Sequence[str] | pa.Array, true: np.ndarray,
                predicted: dict[str, np.ndarray], distances: dict[str, np.ndarray],
                in_top_k: dict[str, np.ndarray], key: str) -> pa.Table:
    """One chunk's rows: `true` int [N]; per metric `predicted` int [N], `distances` float32
    [N, C] (a misclassified image's to its true and predicted class float64 rechecks:
    distances.nearest_with_distances), `in_top_k` bool [N] (only with top-k on)."""
    n = len(true)
    true = np.asarray(true, dtype=np.int32)
    rows = np.arange(n)
    columns: dict[str, pa.Array] = {
        "path": paths if isinstance(paths, pa.Array) else arrow_strings(paths),
        "split": _dictionary([request.split], np.zeros(n, dtype=np.int32)),
        "true": arrow_array(true),
        "true_name": _dictionary(request.classes, true),
    }
    for metric in request.metrics:
        guess = np.asarray(predicted[metric], dtype=np.int32)
        dist = np.asarray(distances[metric], dtype=np.float32).reshape(n, len(request.classes))
        to_true = dist[rows, true]
        columns[f"{metric}_predicted"] = arrow_array(guess)
        columns[f"{metric}_distance"] = arrow_array(to_true)
        columns[f"{metric}_margin"] = arrow_array(np.maximum(to_true - dist[rows, guess], np.float32(0)))
        if request.columns == "full":
            columns[f"{metric}_distances"] = pa.ListArray.from_arrays(
                arrow_array(np.arange(0, n * dist.shape[1] + 1, dist.shape[1], dtype=np.int32)),
                arrow_array(dist.reshape(-1)))
            if request.top_k:
                columns[f"{metric}_top_k"] = arrow_array(np.asarray(in_top_k[metric], dtype=bool))
    metadata = {KEY: key.encode(), b"mnist37.classes": json.dumps(list(request.classes)).encode(),
                b"mnist37.top_k": str(request.top_k).encode()}
    return pa.table(columns).replace_schema_metadata(metadata)


def chunk_key(request: PredictionsRequest, chunk_checksum: str | None) -> str:
    return hashlib.sha256(f"{request.run_key}/{chunk_checksum or ''}".encode()).hexdigest()[:32]


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as a Parquet file; dictionary-encoded where values repeat (the split and class
    names) only: on the distances it costs 5x the whole write of a `full` file, and gains
    nothing (benchmarks/predictions/README.md)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=["split", "true_name"])
    return sink.getvalue().to_pybytes()


def write_chunk(request: PredictionsRequest, chunk_checksum: str | None, paths: Sequence[str] | pa.Array,
                true: np.ndarray, predicted: dict[str, np.ndarray], distances: dict[str, np.ndarray],
                in_top_k: dict[str, np.ndarray]) -> PredictionsFile:
    """Build a chunk's predictions file and publish it at `<folder>/<name>` (or, when the
    request says the driver publishes, return its bytes in the record)."""
    clock = time.perf_counter()
    key = chunk_key(request, chunk_checksum)
    data = parquet_bytes(chunk_table(request, paths, true, predicted, distances, in_top_k, key))
    if request.publish:
        _publish(request.folder, request.name, data)
    return PredictionsFile(request.name, len(true), len(data), key, time.perf_counter() - clock,
                           None if request.publish else data)


def _publish(folder: str, name: str, data: bytes) -> None:
    if is_uri(folder):
        publish(f"{folder}/{name}", lambda f: f.write(data))
        return
    with writing("output folder", folder, f"writing {name}"):
        publish(os.path.join(folder, name), lambda f: f.write(data))


def publish_returned(request: PredictionsRequest, written: PredictionsFile) -> PredictionsFile:
    """The driver's part where tasks cannot reach the output folder: publish the bytes a task
    sent back, and return the record without them."""
    if written.data is not None:
        _publish(request.folder, written.name, written.data)
    return dataclasses.replace(written, data=None)


def _listed(folder: str) -> list[str]:
    """The `*.parquet` names right under `folder` (none when it is not there)."""
    import pyarrow.fs as pafs

    fs, path = open_location(folder)
    if fs is None:
        return sorted(p.name for p in Path(path).glob("*.parquet")) if Path(path).is_dir() else []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.File
                  and info.base_name.endswith(".parquet"))


def remove_stale(out: str | os.PathLike, keep: Sequence[str]) -> int:
    """Remove the `*.parquet` files under `<out>/predictions/` that this run did not write (an
    earlier run's: another shard size, more images, or predictions now off); return how many."""
    folder = folder_of(out)
    stale = sorted(set(_listed(folder)) - set(keep))
    fs, path = open_location(folder)
    for name in stale:
        with writing("output folder", folder, f"removing the earlier run's {name}"):
            if fs is None:
                os.unlink(os.path.join(path, name))
            else:
                fs.delete_file(f"{path}/{name}")
    if stale:
        log.info("removed %d predictions files of an earlier run from %s", len(stale), folder)
    return len(stale)


def read(out: str | os.PathLike, listing: dict) -> pa.Table:
    """Every file results.json's `predictions` lists, in order, as one Table; each file's key
    checked against the listing (PredictionsError naming the file otherwise)."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    folder = folder_of(out)
    files = listing["files"]
    fs, path = open_location(folder)
    names = [f"{path}/{f['name']}" for f in files]
    if fs is None:
        missing = next((f["name"] for f in files if not os.path.isfile(os.path.join(path, f["name"]))), None)
        if missing:
            raise PredictionsError(f"{folder}/{missing}: not found; results.json lists it")
    try:
        return _checked_table(ds.dataset(names, format=ds.ParquetFileFormat(), filesystem=fs), folder, files)
    except FileNotFoundError:  # in an object store (a local folder's are named above)
        missing = next(f["name"] for f, info in zip(files, fs.get_file_info(names))
                       if info.type == pafs.FileType.NotFound)
        raise PredictionsError(f"{folder}/{missing}: not found; results.json lists it") from None


def _checked_table(dataset, folder: str, files: list[dict]) -> pa.Table:
    for fragment, f in zip(dataset.get_fragments(), files):
        found = (fragment.physical_schema.metadata or {}).get(KEY, b"").decode()
        if found != f["key"]:
            raise PredictionsError(f"{folder}/{f['name']}: written by another run than results.json describes "
                                   "(a later run into the same folder that did not finish?); run the job again")
    table = dataset.to_table()
    if table.num_rows != sum(f["rows"] for f in files):
        raise PredictionsError(f"{folder}: {table.num_rows} rows, but results.json lists "
                               f"{sum(f['rows'] for f in files)}")
    return table
