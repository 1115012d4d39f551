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
jobs/evaluate.py (--shard-size 4096); `--help` lists every flag with its default.

The code is benchmarks/seed_vs_job/seed_vs_job_benchmark.py, a lab tool outside the package
(benchmarks/seed_vs_job/README.md has its findings); this entry point stays here because README's
commands and every figure quoted from it name `python jobs/benchmark.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.seed_vs_job.seed_vs_job_benchmark import main, parse_args, run  # noqa: E402, F401 - for callers

if __name__ == "__main__":
    sys.exit(run())
