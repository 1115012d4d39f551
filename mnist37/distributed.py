"""Ray: the one module that turns mnist37's core into tasks.

Decode tasks read a shard's PNGs into an Arrow chunk and send back sums and counts;
classification tasks read a chunk and send back confusion matrices. Tasks are submitted
through a bounded window (`max_in_flight`) so a million-image job never queues a million
tasks at once, and results are consumed in completion order, so nothing here depends on
which task finishes first.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from mnist37 import Mnist37Error
from mnist37.chunks import chunk_bytes
from mnist37.examples import Sides
from mnist37.memory import peak_rss_bytes
from mnist37.shards import DecodedShard, decode_shard
from mnist37.sources.archive import ArchiveObject
from mnist37.images import Decoding
from mnist37.sources.base import ContainerShard
from mnist37.sources.folder import ClassListing, Shard

log = logging.getLogger(__name__)


# Decode tasks spread over every node with free CPUs; Ray retries a task whose worker or
# node died (max_retries), never one that raised (retry_exceptions is off): a data problem
# would only fail again.
_RETRIES = dict(max_retries=3, retry_exceptions=False)


def _decode(shard: Shard | ContainerShard, root: str, chunk_dir: str, decoding: Decoding, with_sums: bool,
            archive: ArchiveObject | None = None) -> DecodedShard:
    if archive is not None:  # the root is its extraction, which this node may not have made yet
        archive.here()
    if isinstance(shard, Shard):  # its file names are in the listing, in the object store
        shard = shard.resolved(ray.get)
    result = decode_shard(shard, root, chunk_dir, decoding, with_sums)
    context = ray.get_runtime_context()
    result.node_id, result.pid = context.get_node_id(), os.getpid()
    result.gpu_ids = list(context.get_accelerator_ids().get("GPU", []))
    return result


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD", **_RETRIES)
def _decode_task(*args) -> DecodedShard:
    return _decode(*args)


@ray.remote(num_cpus=1, num_returns=2, scheduling_strategy="SPREAD", **_RETRIES)
def _decode_and_ship_task(*args) -> tuple[DecodedShard, pa.Buffer]:
    """Decode, and return the chunk's bytes too: they travel through the object store to
    whichever node classifies them, for clusters whose nodes share no disk."""
    result = _decode(*args)
    return result, chunk_bytes(result.chunk_path)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD", **_RETRIES)
def _classify_task(key: str, chunk: str | pa.Buffer, checksum: str, prototypes: np.ndarray, metrics: Sequence[str],
                   device: str, examples: int, verify: bool) -> ClassifiedChunk:
    # Imported here: the driver needs no torch.
    from mnist37.classify import classify_chunk

    start = time.perf_counter()
    confusions, used, found = classify_chunk(chunk, prototypes, metrics, device, examples, checksum, verify)
    context = ray.get_runtime_context()
    return ClassifiedChunk(
        chunk_path=key, confusions=confusions, examples=found, device=str(used),
        gpu_ids=list(context.get_accelerator_ids().get("GPU", [])), node_id=context.get_node_id(), pid=os.getpid(),
        elapsed_s=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes())


@dataclass
class ClassifiedChunk:
    """What a classify task sends back: confusion counts and a few examples, never the images."""

    chunk_path: str
    confusions: dict[str, np.ndarray]  # metric -> int64 [C, C], rows = true class
    examples: dict[str, dict[int, Sides]]  # metric -> true class -> sides
    device: str
    gpu_ids: list
    node_id: str
    pid: int
    elapsed_s: float
    peak_rss_bytes: int


class ClusterError(Mnist37Error, ConnectionError):
    """No Ray cluster answers at the address the job would join."""


def _current_cluster() -> str | None:
    """The address the last `ray start` on this machine left for `ray.init()` to join, if any.
    Ray keeps it in a file of its temp dir; reading it is Ray-internal, so a Ray without this
    helper gets no check rather than a wrong one."""
    try:
        from ray._private.utils import read_ray_address
        return read_ray_address()
    except (ImportError, OSError):
        return None


def check_address(address: str, timeout_s: float = 3.0) -> None:
    """Raise ClusterError, naming the address and where it came from, when nothing listens at
    the GCS address `ray.init(address)` would join: Ray itself retries such an address for
    minutes. The address is `address` (the ray_address config key), else RAY_ADDRESS, else the
    one a `ray start` left on this machine (stale when that cluster died without `ray stop`).
    `local`, `ray://` client addresses and names Ray resolves itself are left to Ray."""
    if address and address != "auto":
        where = "ray_address"
    elif os.environ.get("RAY_ADDRESS"):
        address, where = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    else:
        address, where = _current_cluster(), "the address the last `ray start` on this machine left behind"
    host, _, port = (address or "").rpartition(":")
    if address == "local" or "://" in (address or "") or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        remedy = ("`ray stop` clears it" if where.startswith("the address")
                  else "start one with `ray start --head`")
        raise ClusterError(f"{where}: no Ray cluster answers at {address} ({e.strerror or e}); {remedy}, "
                           "or pass --ray-address local for a Ray of the job's own") from None


# How long a failed map waits for its other tasks to end before it raises (see _raise_cause).
SETTLE_S = 60.0


def _raise_cause(error: ray.exceptions.RayTaskError, pending: Sequence) -> NoReturn:
    """Let the tasks still `pending` (refs, or streaming generators) end, for up to SETTLE_S,
    then raise a task's mnist37 error as itself (one clear line, not a remote traceback),
    anything else as Ray raised it.

    They are not cancelled: cancelling a task whose reply is already on its way aborts Ray
    2.60's core worker, the driver's included (task_manager.cc "Check failed ... Tried to
    complete task that was not pending"; seen with a full chunk store, where the tasks fail
    together). A task that runs to its end leaves its chunk whole or not at all, and at most
    `max_in_flight` tasks are pending, each one shard's work. Any still running after SETTLE_S
    end with the job's Ray or with the driver."""
    ends = [p.completed() if isinstance(p, ray.ObjectRefGenerator) else p for p in pending]
    if ends:
        ray.wait(ends, num_returns=len(ends), timeout=SETTLE_S, fetch_local=False)
    if isinstance(error.cause, Mnist37Error):
        raise error.cause from None
    raise error


def bounded_map(submit: Callable[[object], ray.ObjectRef], items: Iterable, max_in_flight: int,
                received: Callable[[ray.ObjectRef, object], object] = lambda ref, value: value) -> Iterator:
    """Submit `submit(item)` for each item with at most `max_in_flight` unfinished; yield
    `received(ref, result)` as tasks finish. A task that fails with an mnist37 error
    re-raises that error (one clear line, not a remote traceback) once the tasks still
    pending have ended (`_raise_cause`). An interrupt leaves them to `ray.shutdown()` (the
    job's own Ray) or to the driver's exit (a cluster's tasks die with their owner); neither
    path cancels a task (see `_raise_cause`)."""
    pending: list[ray.ObjectRef] = []

    def next_result():
        nonlocal pending
        done, pending = ray.wait(pending, num_returns=1)
        return received(done[0], ray.get(done[0]))

    try:
        for item in items:
            if len(pending) >= max_in_flight:
                yield next_result()
            pending.append(submit(item))
        while pending:
            yield next_result()
    except ray.exceptions.RayTaskError as e:
        _raise_cause(e, pending)


# Names (and stamps) per listing block in Ray's object store: a decode task of an 8,192-image
# shard fetches one or two blocks of its class folder, ~1-2 MB, never the whole listing.
LISTING_BLOCK = 65536


def _listed_in_blocks(function: Callable, block_size: int, *arguments):
    """A listing task: the folder's summary first, then its files in blocks, each its own object."""
    summary, files = function(*arguments)
    yield summary
    for block in files.blocks(block_size):
        yield block


def map_listings(function: Callable, arguments: Sequence[tuple]) -> list[ClassListing]:
    """`function(*a)` for each argument tuple, a function that returns (ClassListing,
    ClassFiles): each call a Ray task, all at once, with a progress line as they finish. How
    the job lists class folders and prefixes (mnist37.sources.folder.FolderMap), on whichever nodes
    have a free CPU. Only the summaries come to the driver; the files stay in Ray's object
    store in blocks of LISTING_BLOCK, owned by the driver, which keeps their refs. A block lost
    with its node is listed again by Ray (lineage), as a lost task's result is recomputed."""
    from mnist37.progress import Progress

    task = ray.remote(num_cpus=1, num_returns="streaming", scheduling_strategy="SPREAD", **_RETRIES)(_listed_in_blocks)
    generators = [task.remote(function, LISTING_BLOCK, *a) for a in arguments]
    progress = Progress("list", len(arguments), " class folders")
    listed = []
    try:
        for generator in generators:
            refs = list(generator)  # returns once the task has yielded everything
            summary = ray.get(refs[0])
            summary.blocks, summary.block_size = refs[1:], LISTING_BLOCK
            listed.append(summary)
            progress.update()
    except ray.exceptions.RayTaskError as e:
        _raise_cause(e, generators)
    return listed


def default_max_in_flight() -> int:
    """Twice the cluster's CPUs: every core busy, the next task already queued."""
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def decode_shards(shards: Iterable[Shard], root: Path, chunk_dir: str, decoding: Decoding, train_split: str,
                  ship_split: str | None, max_in_flight: int,
                  archive: ArchiveObject | None = None) -> Iterator[DecodedShard]:
    """Decode every shard as a Ray task; pixel sums come back for `train_split` shards only.

    Shards of `ship_split` (the evaluation split, when chunks travel through the object
    store) come back with `chunk_ref`, the ref to the chunk's bytes."""
    shipped: dict[ray.ObjectRef, ray.ObjectRef] = {}  # record ref -> chunk bytes ref

    def submit(shard: Shard) -> ray.ObjectRef:
        args = (shard, str(root), str(chunk_dir), decoding, shard.split == train_split, archive)
        if shard.split != ship_split:
            return _decode_task.remote(*args)
        record, chunk = _decode_and_ship_task.remote(*args)
        shipped[record] = chunk
        return record

    def received(ref: ray.ObjectRef, done: DecodedShard) -> DecodedShard:
        done.chunk_ref = shipped.pop(ref, None)
        if done.discarded:
            # Logged here, not in the task: Ray folds workers' lines that differ only in numbers
            # (as chunk names do) into one, and may not forward them at all.
            log.warning("%s; decoded again", done.discarded)
        return done

    return bounded_map(submit, shards, max_in_flight, received)


def classify_chunks(chunks: Sequence[DecodedShard], prototypes: np.ndarray, metrics: Sequence[str], device: str,
                    gpus_per_task: float, examples: int, max_in_flight: int,
                    verify: bool = True) -> Iterator[ClassifiedChunk]:
    """Classify every decoded chunk as a Ray task, read from its path or, when it travelled
    through the object store, from its bytes, and checked to be the chunk decode reported.
    The prototypes go to the object store once; on a cluster with GPUs each task asks for
    `gpus_per_task` of one (decode tasks never do)."""
    prototypes_ref = ray.put(prototypes)
    task = _classify_task.options(num_gpus=gpus_per_task if has_gpus() and device != "cpu" else 0)
    return bounded_map(lambda r: task.remote(r.chunk_path, r.chunk_ref or r.chunk_path, r.checksum, prototypes_ref,
                                             list(metrics), device, examples, verify), chunks, max_in_flight)


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def num_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def cluster_info() -> dict:
    """The Ray cluster's resources and nodes, for results.json."""
    return {
        "cluster_resources": ray.cluster_resources(),
        "nodes": [
            {"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"), "resources": n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive")
        ],
    }
