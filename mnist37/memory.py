"""A process's memory: its peak, and keeping the memory it frees for its next shard.

Decode and classify tasks allocate the same few large buffers for every shard (a shard's
encoded bytes, its inflated rows, its images; a CPU batch's float32 differences). glibc
serves allocations over its mmap threshold (128 KiB to 32 MiB, moving) with fresh pages from
the kernel and gives freed heap above its trim threshold back: each shard then faults in its
memory anew. On this machine (a Firecracker VM whose freed memory goes back to the host) a
fresh page costs ~8 µs; a tar shard of 8192 MNIST records took ~2,700 page faults and 14-15 ms
of system time, against ~300 and 6-7 ms with the thresholds below (46-52 ms a shard against
63-71, `decode_shard` in one process, alternating).
"""

from __future__ import annotations

import ctypes
import functools
import resource

# Allocations up to MMAP_THRESHOLD come from the heap; freed heap is kept until TRIM_THRESHOLD
# of it is free at the top. A worker then holds on to at most ~128 MiB it is not using.
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@functools.cache
def reuse_freed_memory() -> bool:
    """Set glibc's thresholds (once per process) so freed buffers are reused, not returned and
    faulted in again; False where the C library has no mallopt (macOS) or refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
