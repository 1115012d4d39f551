"""The tasks: mnist37's per-shard steps (mnist37.steps) and folder listings as Ray tasks.

Each task takes one frozen request record (`ListingRequest`, `DecodeRequest`,
`ClassifyRequest`), plus, for classify, the objects Ray must fetch before the task starts (the
chunk's bytes, the prototypes). It returns the step's own record next to a `Placement` (its
node, process and GPUs), never patched onto it. `RayExecutor` is the evaluation's executor on
Ray: decode tasks spread over every node with free CPUs, classify tasks on GPUs where the
cluster has them, each map through `bounded_map` (mnist37.on_ray.scheduling).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from mnist37.chunks import chunk_bytes
from mnist37.on_ray.probe import WAIT_STEP_S
from mnist37.on_ray.scheduling import (_again, _cluster_failures, _get, _InFlight, _raise_cause, _record_node,
                                       bounded_map)
from mnist37.on_ray.session import cluster_info, current, default_max_in_flight, has_gpus, num_nodes, watching
from mnist37.storage.locations import StoreSettings, store, use_store
from mnist37.progress import Watch
from mnist37.shards import DecodedShard
from mnist37.sources.protocol import ListedFolder, called_in_threads
from mnist37.steps import ClassifiedChunk, ClassifyRequest, DecodeRequest, Placement, classify, decode

log = logging.getLogger(__name__)


# Decode tasks spread over every node with free CPUs; Ray retries a task whose worker or
# node died (max_retries), never one that raised (retry_exceptions is off): a data problem
# would only fail again.
_RETRIES = dict(max_retries=3, retry_exceptions=False)


def _placement() -> Placement:
    """Where this task runs: its node, its process, the GPUs Ray assigned to it."""
    context = ray.get_runtime_context()
    return Placement(context.get_node_id(), os.getpid(), list(context.get_accelerator_ids().get("GPU", [])))


def _decode(request: DecodeRequest) -> tuple[DecodedShard, Placement]:
    _record_node()
    if request.settings is not None:  # the driver's way to its object store, whatever this node's environment says
        use_store(request.settings)
    # what it left in the object store (a folder shard's file names)
    request = dataclasses.replace(request, shard=request.shard.resolved(ray.get))
    return decode(request), _placement()


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD", **_RETRIES)
def _decode_task(request: DecodeRequest) -> tuple[DecodedShard, Placement]:
    return _decode(request)


@ray.remote(num_cpus=1, num_returns=2, scheduling_strategy="SPREAD", **_RETRIES)
def _decode_and_ship_task(request: DecodeRequest) -> tuple[tuple[DecodedShard, Placement], pa.Buffer]:
    """Decode, and return the chunk's bytes too: they travel through the object store to
    whichever node classifies them, for clusters whose nodes share no disk."""
    result = _decode(request)
    return result, chunk_bytes(result[0].chunk_path)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD", **_RETRIES)
def _classify_task(request: ClassifyRequest, chunk: str | pa.Buffer,
                   prototypes: np.ndarray) -> tuple[ClassifiedChunk, Placement]:
    """`chunk` and `prototypes` are arguments of their own, not fields of the request: Ray
    fetches an argument's object before the task starts (a ref inside a record would be
    fetched by the running task, holding its CPU and GPU while it waits)."""
    _record_node()
    use_store(request.settings)  # a chunk store may be a URI
    return classify(request, chunk, prototypes), _placement()


# Names (and stamps) per listing block in Ray's object store: a decode task of an 8,192-image
# shard fetches one or two blocks of its class folder, ~1-2 MB, never the whole listing.
LISTING_BLOCK = 65536
# Listing tasks per CPU of the cluster: each lists a run of class folders, so that 2,000 folders
# cost a few tasks, not 2,000 (8.8 s of scan on 2 cores at 1,000 classes; benchmarks/many_classes).
LISTING_TASKS_PER_CPU = 4


@dataclass(frozen=True)
class ListingRequest:
    """A run of class folders (or prefixes) to list: `function(*a)` for each `a` of `batch`
    returns (a ListedFolder, its files)."""

    function: Callable
    batch: tuple  # argument tuples, one per folder
    block_size: int  # names (and stamps) per block
    settings: StoreSettings  # the driver's way to its object store
    threads: int = 1  # calls at once (protocol.called_in_threads)


def _listed_in_blocks(request: ListingRequest):
    """A listing task over a run of folders: for each, (its summary, how many blocks follow),
    then its files in blocks, each its own object."""
    _record_node()
    use_store(request.settings)
    yield from _blocks(called_in_threads(request.function, request.batch, request.threads), request.block_size)


def _blocks(listed: Iterator[tuple], block_size: int):
    for summary, files in listed:
        blocks = files.blocks(block_size)
        yield summary, len(blocks)
        for block in blocks:  # not `yield from` a list: Ray's streaming generator would call its send()
            yield block


def map_listings(function: Callable, arguments: Sequence[tuple], threads: int = 1) -> list[ListedFolder]:
    """`function(*a)` for each argument tuple, a function that returns (a ListedFolder, its
    files, which `.blocks(size)` cuts): in runs of consecutive tuples, each run a Ray task
    (LISTING_TASKS_PER_CPU per CPU of the cluster, each `threads` calls at once), all at once,
    with a progress line as they finish. How the job lists class folders and prefixes (a
    format's `PlanRequest.map_tasks`), on whichever nodes have a free CPU. Only the summaries
    come to the driver; the files stay in Ray's object store in blocks of LISTING_BLOCK, owned
    by the driver, which keeps their refs. A block lost with its node is listed again by Ray
    (lineage), as a lost task's result is recomputed."""
    from mnist37.progress import Progress

    task = ray.remote(num_cpus=1, num_returns="streaming", scheduling_strategy="SPREAD", **_RETRIES)(_listed_in_blocks)
    settings = store()
    tasks = min(len(arguments), LISTING_TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1))))
    starts = np.linspace(0, len(arguments), tasks + 1).round().astype(int).tolist() if arguments else [0]
    watch = watching("list", len(arguments), " class folders")
    with _cluster_failures(watch):
        flight = _InFlight(lambda b, again=0: task.options(**_again(again)).remote(
            ListingRequest(function, b, LISTING_BLOCK, settings, threads)),
            watch, end=lambda generator: generator.completed())
        progress = Progress("list", len(arguments), " class folders")
        listed: dict[int, ListedFolder] = {}
        try:
            for index, (a, b) in enumerate(zip(starts, starts[1:])):
                flight.add(index, tuple(arguments[a:b]))
            while flight:
                i, generator = flight.next()
                refs = list(generator)  # the task has ended: every ref is there
                listed.update(_listings(refs, range(starts[i], starts[i + 1]), watch))
                watch.finished(starts[i + 1] - starts[i])
                progress.update(starts[i + 1] - starts[i])
            current().check_nodes(watch, 0, force=True)
            flight.forget()
        except ray.exceptions.RayTaskError as e:
            _raise_cause(e, flight.handles())
    return [listed[i] for i in range(len(arguments))]


def _listings(refs: list[ray.ObjectRef], indices: range, watch: Watch) -> dict[int, ListedFolder]:
    """The listings of one listing task's run of folders, from its refs in the order it yielded
    them: (summary, blocks) of a folder, its blocks, the next folder's (summary, blocks), ..."""
    at, listed, blocks = 0, {}, []
    for k in indices:
        (summary, count), at = _get(refs[at], watch), at + 1
        summary.blocks, summary.block_size, at = refs[at:at + count], LISTING_BLOCK, at + count
        listed[k] = summary
        blocks.extend(summary.blocks)
    _copy_here(blocks, watch)
    return listed


def _copy_here(refs: list[ray.ObjectRef], watch: Watch) -> None:
    """A copy of these objects in the object store of the driver's node, on a cluster the job
    joined: a listing's blocks, which every decode task of its folder reads, then outlive the
    worker node that listed them. Without it, a decode task submitted again after that node's
    loss blocks on fetching a block from it until Ray finds the connection dead (keepalive)
    and rebuilds the block (issue 36). The copy is not pinned: the head's store evicts it
    only when full. The job's own Ray has one node: nothing to copy."""
    left = refs if not current().own else []
    while left:
        _, left = ray.wait(left, num_returns=len(left), timeout=WAIT_STEP_S, fetch_local=True)
        if left:
            current().check_head()
            watch.waiting(len(left))


def _lost(ref: ray.ObjectRef) -> bool:
    """Whether the object's every copy was on a node lost under the job (the owner's record:
    this driver's, for the objects it owns), so that a task needing it would wait for Ray to
    rebuild it; never before a node was lost."""
    if not current().lost:
        return False
    from ray.experimental import get_object_locations

    try:
        where = get_object_locations([ref], timeout_ms=5000).get(ref) or {}
    except Exception:  # noqa: BLE001: unknown: Ray rebuilds it if it must
        return False
    return not where.get("did_spill") and not set(where.get("node_ids") or ()) - current().lost


# Chunk bytes ref -> a function that decodes its shard again and returns the new ref: a
# classify task submitted again after a node's loss gets its chunk made again on a node alive
# when its only copy was lost with the node (see _lost), rather than wait on Ray's keepalive.
_remakes: dict[ray.ObjectRef, Callable[[], ray.ObjectRef]] = {}


def decode_shards(requests: Sequence[DecodeRequest], ship_split: str | None, max_in_flight: int,
                  shipped: dict[str, ray.ObjectRef] | None = None) -> Iterator[tuple[DecodedShard, Placement]]:
    """Decode every shard as a Ray task; yield (record, placement) as each finishes.

    The chunks of `ship_split` shards (the evaluation split, when chunks travel through the
    object store) are also returned as bytes: `shipped[chunk path]` is the ref to them."""
    chunks: dict[ray.ObjectRef, ray.ObjectRef] = {}  # record ref -> chunk bytes ref

    def submit(request: DecodeRequest, again: int = 0) -> ray.ObjectRef:
        if request.shard.split != ship_split:
            return _decode_task.options(**_again(again)).remote(request)
        record, chunk = _decode_and_ship_task.options(**_again(again)).remote(request)
        chunks[record] = chunk
        _remakes[chunk] = lambda: _decode_and_ship_task.options(**_again(1)).remote(request)[1]
        return record

    def received(ref: ray.ObjectRef, done: tuple[DecodedShard, Placement]) -> tuple[DecodedShard, Placement]:
        chunk = chunks.pop(ref, None)
        if chunk is not None and shipped is not None:
            shipped[done[0].chunk_path] = chunk
        if done[0].discarded:
            # Logged here, not in the task: Ray folds workers' lines that differ only in numbers
            # (as chunk names do) into one, and may not forward them at all.
            log.warning("%s; decoded again", done[0].discarded)
        return done

    return bounded_map(submit, requests, max_in_flight, received, what=("decode", " shards"))


def classify_chunks(requests: Sequence[ClassifyRequest], prototypes: np.ndarray, gpus_per_task: float,
                    max_in_flight: int, shipped: dict[str, ray.ObjectRef] | None = None
                    ) -> Iterator[tuple[ClassifiedChunk, Placement]]:
    """Classify every decoded chunk as a Ray task, read from its path or, when it travelled
    through the object store, from its bytes (`shipped[chunk path]`), and checked to be the
    chunk decode reported. The prototypes go to the object store once; on a cluster with GPUs
    each task asks for `gpus_per_task` of one (decode tasks never do)."""
    prototypes_ref, shipped = ray.put(prototypes), shipped if shipped is not None else {}
    gpus = gpus_per_task if has_gpus() else 0

    def submit(request: ClassifyRequest, again: int = 0) -> ray.ObjectRef:
        chunk = shipped.get(request.chunk_path)
        if again and chunk is not None and chunk in _remakes and _lost(chunk):
            remake = _remakes.pop(chunk)
            chunk = shipped[request.chunk_path] = remake()  # its shard decoded again on a node alive
            _remakes[chunk] = remake
        return _classify_task.options(num_gpus=gpus if request.device != "cpu" else 0, **_again(again)).remote(
            request, chunk or request.chunk_path, prototypes_ref)

    try:
        yield from bounded_map(submit, requests, max_in_flight, what=("classify", " chunks"))
    finally:
        _remakes.clear()


class RayExecutor:
    """The evaluation's executor on the connected Ray (mnist37.steps.ShardExecutor): one task per
    shard, at most `max_in_flight` unfinished (0: twice the cluster's CPUs), classify tasks
    asking for `gpus_per_task` of a GPU where the cluster has GPUs. Chunks shipped by its
    decode map reach its classify map through the object store."""

    def __init__(self, max_in_flight: int = 0, gpus_per_task: float = 0.25):
        self.max_in_flight, self.gpus_per_task = max_in_flight, gpus_per_task
        self.shipped: dict[str, ray.ObjectRef] = {}  # chunk path -> ref to its bytes

    def _window(self) -> int:
        self.max_in_flight = self.max_in_flight or default_max_in_flight()
        return self.max_in_flight

    def num_nodes(self) -> int:
        return num_nodes()

    def decode(self, requests: Sequence[DecodeRequest],
               ship_split: str | None) -> Iterator[tuple[DecodedShard, Placement]]:
        return decode_shards(requests, ship_split, self._window(), self.shipped)

    def classify(self, requests: Sequence[ClassifyRequest],
                 prototypes: np.ndarray) -> Iterator[tuple[ClassifiedChunk, Placement]]:
        return classify_chunks(requests, prototypes, self.gpus_per_task, self._window(), self.shipped)

    def cluster_info(self) -> dict:
        return cluster_info()
