"""What flushing an extracted archive to disk costs: `mnist37.sources.archive.extract` as it
publishes now (writes.publish_folder: one os.sync before the rename) against the extraction it
replaced (renamed, nothing flushed) and against one fsync per file, rounds alternating, each
into a fresh cache folder.

    python benchmarks/chunk_writes/extract_benchmark.py --archive ../shared/data/mnist_sample.tgz --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from mnist37.sources.archive import extract
from mnist37.storage import writes


def fsync_each(folder: str) -> None:
    """One fsync per file and folder, each folder after its files."""
    for here, _, names in os.walk(folder, topdown=False):
        for path in [*(os.path.join(here, n) for n in names), here]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


FLUSHES = {"unflushed (before)": lambda folder: None, "os.sync (publish_folder)": writes._flush_tree,
           "fsync per file": fsync_each}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the caches go (the cache's disk)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in FLUSHES}
    for _ in range(args.rounds):
        for name, flush in FLUSHES.items():
            writes._flush_tree = flush
            cache = tempfile.mkdtemp(prefix="mnist37-extract-", dir=args.dir)
            try:
                start = time.perf_counter()
                extract(args.archive, cache)
                times[name].append(time.perf_counter() - start)
            finally:
                shutil.rmtree(cache)
    for name, values in times.items():
        print(f"{name:<26} median {statistics.median(values):6.2f} s (min {min(values):.2f}, max {max(values):.2f}, "
              f"{len(values)} extractions of {os.path.basename(args.archive)})")


if __name__ == "__main__":
    main()
