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
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import ray

from mnist37 import Mnist37Error
from mnist37.shards import DecodedShard, Shard, decode_shard

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def _decode_task(shard: Shard, root: str, shape: tuple[int, int], chunk_dir: str,
                 with_sums: bool, reuse: bool, convert: bool) -> DecodedShard:
    result = decode_shard(shard, root, shape, chunk_dir, with_sums, reuse, convert)
    result.node_id = ray.get_runtime_context().get_node_id()
    result.pid = os.getpid()
    return result


@ray.remote(num_cpus=1)
def _classify_task(chunk_path: str, prototypes: np.ndarray, metrics: Sequence[str],
                   device: str) -> dict:
    # Imported here: the driver never needs torch.
    from mnist37.classify import classify_chunk

    start = time.perf_counter()
    confusions = classify_chunk(chunk_path, prototypes, metrics, device)
    return {
        "chunk_path": chunk_path,
        "confusions": confusions,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "elapsed_s": time.perf_counter() - start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def bounded_map(submit: Callable[[object], ray.ObjectRef], items: Iterable, max_in_flight: int) -> Iterator:
    """Submit `submit(item)` for each item with at most `max_in_flight` unfinished; yield
    results as they finish. A task that fails with an mnist37 error re-raises that error
    (one clear line, not a remote traceback) after cancelling the tasks still pending."""
    pending: list[ray.ObjectRef] = []

    def next_result():
        nonlocal pending
        done, pending = ray.wait(pending, num_returns=1)
        return ray.get(done[0])

    try:
        for item in items:
            if len(pending) >= max_in_flight:
                yield next_result()
            pending.append(submit(item))
        while pending:
            yield next_result()
    except ray.exceptions.RayTaskError as e:
        for ref in pending:
            ray.cancel(ref)
        if isinstance(e.cause, Mnist37Error):
            raise e.cause from None
        raise


def default_max_in_flight() -> int:
    """Twice the cluster's CPUs: every core busy, the next task already queued."""
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def decode_shards(shards: Iterable[Shard], root: Path, shape: tuple[int, int], chunk_dir: Path,
                  train_split: str, reuse: bool, convert: bool, max_in_flight: int) -> Iterator[DecodedShard]:
    """Decode every shard as a Ray task; pixel sums come back for `train_split` shards only."""
    return bounded_map(
        lambda shard: _decode_task.remote(shard, str(root), shape, str(chunk_dir),
                                          shard.split == train_split, reuse, convert),
        shards, max_in_flight)


def classify_chunks(chunk_paths: Sequence[str], prototypes: np.ndarray, metrics: Sequence[str],
                    device: str, gpus_per_task: float, max_in_flight: int) -> Iterator[dict]:
    """Classify every chunk as a Ray task. The prototypes go to the object store once; on a
    cluster with GPUs each task asks for `gpus_per_task` of one (decode tasks never do)."""
    prototypes_ref = ray.put(prototypes)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    task = _classify_task.options(num_gpus=gpus_per_task if has_gpus and device != "cpu" else 0)
    return bounded_map(lambda path: task.remote(path, prototypes_ref, list(metrics), device),
                       chunk_paths, max_in_flight)


def cluster_info() -> dict:
    """The Ray cluster's resources and nodes, for results.json."""
    return {
        "cluster_resources": ray.cluster_resources(),
        "nodes": [
            {"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"), "resources": n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive")
        ],
    }
