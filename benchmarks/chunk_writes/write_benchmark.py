"""Benchmark: what writing a chunk costs on this machine, and what fresh memory costs.

    python benchmarks/chunk_writes/write_benchmark.py --dir /tmp

A decode task writes one Arrow file per shard: 6.4 MB of pixels for 8192 MNIST images, into
pages of the kernel's page cache the file did not have. This writes --chunks such files of
--chunk-mb each into an empty folder under --dir, the way `chunks.write_chunk` does (one
write of the whole buffer), in three states side by side:

- `after-delete`: right after deleting as many bytes of earlier files (the kernel hands
  the freed page-cache pages straight back);
- `after-pause`: the same, but --pause seconds after the delete (a VM that returns freed
  memory to its host has done so by then: every page is faulted in again, as for a decode
  task seconds after a cold run emptied its chunk folder);
- `copy`: the same bytes copied into one buffer reused each time (memory bandwidth alone).

And for anonymous memory, what decode tasks allocate: `fresh-array` (a new NumPy array each
time, kept until the end, so every page is new) against `reused-array`. Prints the median ms
per chunk and GB/s of each, and the page faults per chunk. Findings: README.md beside this file.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time

import numpy as np


def timed(step, count: int) -> tuple[float, float]:
    """(median seconds, page faults per call) of `step(i)` for i in range(count)."""
    seconds = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(count):
        clock = time.perf_counter()
        step(i)
        seconds.append(time.perf_counter() - clock)
    return statistics.median(seconds), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / count


def write_files(folder: str, data: bytes, count: int) -> tuple[float, float]:
    os.makedirs(folder)

    def write(i: int) -> None:
        fd = os.open(os.path.join(folder, f"{i}.arrow"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    return timed(write, count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="chunk writes and fresh memory, side by side")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the chunk-like files go (a chunk store's disk)")
    parser.add_argument("--chunks", type=int, default=30)
    parser.add_argument("--chunk-mb", type=float, default=6.4, help="8192 MNIST images: 6.4")
    parser.add_argument("--pause", type=float, default=6.0, help="seconds between the delete and the writes")
    args = parser.parse_args(argv)
    size = int(args.chunk_mb * 1e6)
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    work = tempfile.mkdtemp(prefix="mnist37-write-", dir=args.dir)
    results = {}
    try:
        write_files(os.path.join(work, "warmup"), data, args.chunks)
        for name, pause in (("after-delete", 0.0), ("after-pause", args.pause)):
            shutil.rmtree(os.path.join(work, "warmup"))
            time.sleep(pause)
            results[name] = write_files(os.path.join(work, name), data, args.chunks)
            os.rename(os.path.join(work, name), os.path.join(work, "warmup"))
        target = bytearray(size)
        results["copy"] = timed(lambda i: target.__setitem__(slice(None), data), args.chunks)
        kept = []
        source = np.frombuffer(data, dtype=np.uint8)
        results["fresh-array"] = timed(lambda i: kept.append(source.copy()), args.chunks)
        kept.clear()
        reused = np.empty_like(source)
        results["reused-array"] = timed(lambda i: np.copyto(reused, source), args.chunks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.chunks} chunks of {size / 1e6:.1f} MB under {args.dir}; pause {args.pause:.0f} s")
    print(f"{'':14} {'ms a chunk':>10} {'GB/s':>6} {'faults a chunk':>15}")
    for name, (seconds, faults) in results.items():
        print(f"{name:14} {seconds * 1e3:10.2f} {size / seconds / 1e9:6.2f} {faults:15.0f}")


if __name__ == "__main__":
    main()
