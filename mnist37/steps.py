"""The per-shard steps of an evaluation, each a plain function of one request record, and how
they are mapped over shards.

    decode(DecodeRequest) -> DecodedShard                 a shard into its chunk (mnist37.shards)
    classify(ClassifyRequest, chunk, prototypes) -> ClassifiedChunk   a chunk's confusions

The evaluation's stages (mnist37.evaluation) hand their requests to a `ShardExecutor`, which
returns each step's record next to a `Placement` (where it ran), never patched onto it:
`InProcess` here, for a run without Ray; `mnist37.on_ray.tasks.RayExecutor`, one Ray task per
shard, for the job. A request is frozen and carries what its step needs, so a step's inputs
are one record, whoever runs it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from mnist37.examples import Sides
from mnist37.images import Decoding
from mnist37.memory import peak_rss_bytes
from mnist37.predictions import PredictionsFile, PredictionsRequest
from mnist37.storage.locations import StoreSettings
from mnist37.shards import DecodedShard, decode_shard
from mnist37.sources.archive import ArchiveObject
from mnist37.sources.protocol import Shard

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class DecodeRequest:
    """One shard to decode into its chunk (or to reuse the chunk of)."""

    shard: Shard
    root: str
    chunk_dir: str
    decoding: Decoding
    with_sums: bool  # pixel sums back (training shards)
    archive: ArchiveObject | None = None  # the root is its extraction, which a node may not have made yet
    settings: StoreSettings | None = None  # the driver's way to its object store, for a task on another node


def decode(request: DecodeRequest) -> DecodedShard:
    """The decode step: `decode_shard` on the request's shard, its archive extracted here first."""
    if request.archive is not None:
        request.archive.here()
    return decode_shard(request.shard, request.root, request.chunk_dir, request.decoding, request.with_sums)


@dataclass(frozen=True)
class ClassifyRequest:
    """One chunk to classify, and how: every setting the classify step reads."""

    chunk_path: str  # the chunk's key (a path or URI): where it is read, unless its bytes are handed over
    checksum: str  # what decode reported: the chunk read must be this one
    metrics: tuple[str, ...]
    device: str
    examples: int  # misclassified images kept per metric, true class and side of the boundary
    verify: bool  # hash the whole chunk before using it
    settings: StoreSettings | None = None  # the driver's way to its object store, for a task on another node
    top_k: int = 0  # k of the top-k hits counted per true class; 0: none
    predictions: PredictionsRequest | None = None  # the chunk's predictions file to write (mnist37.predictions)


@dataclass
class ClassifiedChunk:
    """What the classify step returns: confusion counts and a few examples, never the images."""

    chunk_path: str
    confusions: dict[str, np.ndarray]  # metric -> int64 [C, C], rows = true class
    examples: dict[str, dict[int, Sides]]  # metric -> true class -> sides
    device: str
    elapsed_s: float
    peak_rss_bytes: int
    top_k: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> int64 [C]: true class in the top k
    predictions: PredictionsFile | None = None  # the chunk's predictions file (its bytes, when the driver writes it)


def classify(request: ClassifyRequest, chunk: str | pa.Buffer, prototypes: np.ndarray) -> ClassifiedChunk:
    """The classify step: the chunk (its path or URI, or its bytes) against float32 [C, H, W]
    prototypes, checked to be the chunk decode reported."""
    # Imported here: a driver needs no torch.
    from mnist37.classify import classify_chunk

    start = time.perf_counter()
    done = classify_chunk(chunk, prototypes, list(request.metrics), request.device, request.examples,
                          request.checksum, request.verify, request.top_k, request.predictions)
    return ClassifiedChunk(chunk_path=request.chunk_path, confusions=done.confusions, examples=done.examples,
                           device=str(done.device), elapsed_s=time.perf_counter() - start,
                           peak_rss_bytes=peak_rss_bytes(), top_k=done.top_k, predictions=done.predictions)


@dataclass(frozen=True)
class Placement:
    """Where a step ran, beside its record: Ray's node (empty in this process), the process, the
    GPUs Ray assigned to it."""

    node_id: str = ""
    pid: int = 0
    gpu_ids: list = field(default_factory=list)

    @classmethod
    def here(cls) -> Placement:
        return cls(pid=os.getpid())


class ShardExecutor(Protocol):
    """Maps the per-shard steps over shards, yielding (record, placement) as each finishes, in any order."""

    def num_nodes(self) -> int: ...

    def decode(self, requests: Sequence[DecodeRequest],
               ship_split: str | None) -> Iterator[tuple[DecodedShard, Placement]]:
        """`ship_split`: the split whose chunks travel to the classify steps through the executor
        (Ray's object store), not through the chunk store; None: none does."""

    def classify(self, requests: Sequence[ClassifyRequest],
                 prototypes: np.ndarray) -> Iterator[tuple[ClassifiedChunk, Placement]]: ...

    def cluster_info(self) -> dict: ...


def _decoded_here(request: DecodeRequest) -> tuple[DecodedShard, Placement]:
    return decode(request), Placement.here()


def worker_processes() -> multiprocessing.context.BaseContext:
    """How this process starts a pool of worker processes: forked (they share what is imported:
    no start-up), unless this process is a Ray driver, whose gRPC connections and threads a
    forked child inherits mid-use (Ray does not support fork after `ray.init()`), or has
    initialized CUDA, which a forked child cannot use: spawned then.
    A converter forked from a pytest process joined to a Ray was followed, three times in a
    day's runs, by that Ray's raylet failing a check (`binary.size() == T::Size()` in
    HandleCancelWorkerLease, a lease id of 292 bytes) and the driver ending with it. Forked
    on purpose, the job after the conversion in tests/test_convert.py's figures test started
    no task in 300 s (twice in two tries); spawned, nine of nine such tests passed in 23 s."""
    ray, torch = sys.modules.get("ray"), sys.modules.get("torch")
    if ray is not None and ray.is_initialized() or torch is not None and torch.cuda.is_initialized():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


class InProcess:
    """The executor of a run without Ray: each step called in this process, decode steps in
    `workers` processes when there are several (started as `worker_processes` says)."""

    def __init__(self, workers: int = 1):
        self.workers = workers

    def num_nodes(self) -> int:
        return 1

    def decode(self, requests: Sequence[DecodeRequest],
               ship_split: str | None = None) -> Iterator[tuple[DecodedShard, Placement]]:
        workers = max(1, min(self.workers, len(requests)))
        if workers == 1:
            yield from map(_decoded_here, requests)
            return
        with ProcessPoolExecutor(workers, mp_context=worker_processes()) as pool:
            yield from pool.map(_decoded_here, requests)

    def classify(self, requests: Sequence[ClassifyRequest],
                 prototypes: np.ndarray) -> Iterator[tuple[ClassifiedChunk, Placement]]:
        for request in requests:
            yield classify(request, request.chunk_path, prototypes), Placement.here()

    def cluster_info(self) -> dict:
        return {}
