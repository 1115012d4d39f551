"""Threads within one task: how a decode or classify task uses the node's idle cores.

A job's tasks ask Ray for one CPU each, and there are as many as there are shards (evaluation
chunks): where a split has fewer shards than the node has CPUs, or its shards differ in size
(8,000 training images in one shard beside 2,000 evaluation images in another), one task ends
up working alone on one core while the others idle. Their work is codec and kernel calls that
release the GIL (libjpeg-turbo through simplejpeg, Pillow's decoders and resize, torch's
kernels), so a task splits it over a few threads. Where every CPU already runs a task the
threads only share its core (no thread waits on another), so the cost is a few context
switches: MAX_THREADS bounds that. Figures: benchmarks/many_classes/README.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

# At most this many threads per task, whatever the node's size.
MAX_THREADS = 4


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for(items: int, least_per_thread: int) -> int:
    """Threads for `items` pieces of work, each thread given at least `least_per_thread`."""
    return max(1, min(MAX_THREADS, usable_cpus(), items // max(1, least_per_thread)))


def run_spread(work: Callable[[Sequence[int]], object], items: int, threads: int) -> list:
    """`work(indices)` over `range(items)` cut into `threads` interleaved parts (0, t, 2t, ...;
    1, t + 1, ...), each in a thread of its own (here where `threads` is 1): images of one
    size then fall evenly. Returns the parts' results in order; the first error is raised."""
    parts: Iterable[Sequence[int]] = [range(k, items, threads) for k in range(threads)]
    if threads <= 1:
        return [work(range(items))]
    with ThreadPoolExecutor(threads, thread_name_prefix="mnist37-work") as pool:
        return list(pool.map(work, parts))
