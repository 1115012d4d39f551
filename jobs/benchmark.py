"""Benchmark: fastbook's single-process baseline against mnist37 cold and warm, side by side.

    python jobs/benchmark.py --data ../shared/data/mnist_sample.tgz --copies 1 10 100 --repeats 3
    python jobs/benchmark.py --data ../shared/data/mnist_sample.tgz --copies 100 --formats tar parquet idx

For each N in --copies it builds the data set replicated N times (hard links) under --work,
then alternates seed / cold / warm --repeats times and prints median wall seconds, images/s,
ratios to the seed, decode throughput, peak RSS of the driver and of the largest Ray worker.
--formats tar parquet idx adds cold runs from the same images converted (once, timed apart) to
WebDataset tar shards, Parquet and IDX.
cold and warm start their own Ray (`ray.init()`), as on a laptop; --cluster adds cluster-cold
and cluster-warm, the same job connecting to a Ray head already running on loopback, as under
`ray job submit`. --unverified adds warm-unverified (verify_chunks = false) after each warm
run: what checking chunks costs. Everything is also written to --json. Flags after `--` go to
jobs/evaluate.py (--shard-size 4096); `--help` lists every flag with its default. The
benchmark is mnist37.benchmark (`mnist37-benchmark`, or `python -m mnist37.benchmark`, from an
installed mnist37). One-off studies (checksums, chunk writes, object stores) are not this
benchmark: they live in benchmarks/, outside the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37.benchmark import main, parse_args, run  # noqa: E402, F401 - main and parse_args for callers

if __name__ == "__main__":
    sys.exit(run())
