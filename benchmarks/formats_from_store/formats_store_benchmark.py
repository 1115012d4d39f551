"""Container data sets (Parquet, WebDataset tar shards, IDX) read from an S3-compatible server on
loopback, side by side with the same files on disk: figures identical, the decode stage, and the
requests each job makes.

    python jobs/convert.py --data ../shared/data/mnist_png.tgz --train-split training \\
        --eval-split testing --to webdataset --dest /tmp/mnist-webdataset     # likewise parquet, idx
    python benchmarks/formats_from_store/formats_store_benchmark.py /tmp/mnist-webdataset /tmp/mnist-parquet /tmp/mnist-idx \\
        --train-split training --eval-split testing

Starts moto's server (a test dependency) on 127.0.0.1, uploads each folder, then runs
jobs/evaluate.py three times per folder, each with a Ray of its own (`--ray-address local`):
from disk, from the store with a cold chunk cache, and from the store again (warm: nothing is
decoded). The store runs go through a proxy on 127.0.0.1 that only counts requests
(tests/s3server.FaultProxy with no faults). Needs no Ray of its own.

A lab tool, not part of the package: it imports the project's test support (tests.s3server),
as benchmarks/ may and mnist37/ never does (benchmarks/README.md); run it from a checkout with
the test extras installed. Findings: README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT))

# What must agree between a run from the store and one from disk.
FIGURES = ("counts", "files", "rejected", "metrics", "prototypes_sha256", "classes", "image_shape")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="container data sets on disk (one folder each)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="valid")
    parser.add_argument("--classes", nargs="+", default=["all"])
    return parser.parse_args(argv)


def run_job(data: str, out: Path, cache: Path, env: dict, args: argparse.Namespace) -> tuple[dict, float]:
    """(results.json, wall seconds) of one job; exits with its stderr when it fails."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "jobs/evaluate.py", "--ray-address", "local", "--data", data,
                          "--out", str(out), "--cache-dir", str(cache), "--train-split", args.train_split,
                          "--eval-split", args.eval_split, "--classes", *args.classes],
                         cwd=PROJECT_ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{data}: the job failed:\n{run.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text()), time.perf_counter() - start


def figures(results: dict) -> dict:
    return {key: results[key] for key in FIGURES} | {"fingerprint": results["data"]["fingerprint"]}


def main(args: argparse.Namespace) -> None:
    from tests.s3server import FaultProxy, S3Server, aws_env

    server = S3Server()
    os.environ.update(aws_env(server.endpoint))
    server.client().create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="formats-store-"))
    print(f"{'data':<24} {'format':<10} {'images':>7} {'same':>5} {'decode s disk/cold':>19} "
          f"{'job s disk/cold/warm':>21} {'requests cold/warm':>19}")
    try:
        for folder in args.data:
            name = folder.name
            server.upload(folder, "bench", name)
            disk, disk_s = run_job(str(folder), work / name / "disk", work / name / "c1", {}, args)
            proxy = FaultProxy(server.endpoint, slow_every=10**9, drop_every=10**9)  # counts, never fails
            try:
                env = aws_env(proxy.endpoint)
                cold, cold_s = run_job(f"s3://bench/{name}", work / name / "cold", work / name / "c2", env, args)
                cold_requests, proxy.counts["requests"] = proxy.counts["requests"], 0
                warm, warm_s = run_job(f"s3://bench/{name}", work / name / "warm", work / name / "c2", env, args)
                warm_requests = proxy.counts["requests"]
            finally:
                proxy.stop()
            same = (figures(disk) == figures(cold) == figures(warm) and warm["shards"]["files_decoded"] == 0
                    and (work / name / "disk" / "table.txt").read_text() == (work / name / "cold" / "table.txt").read_text())
            images = sum(sum(c.values()) for c in cold["counts"].values())
            print(f"{name:<24} {cold['data']['format']:<10} {images:>7} {'yes' if same else 'NO':>5} "
                  f"{disk['elapsed_s']['decode']:>9.2f}/{cold['elapsed_s']['decode']:<9.2f} "
                  f"{disk_s:>7.1f}/{cold_s:.1f}/{warm_s:<5.1f} {cold_requests:>9}/{warm_requests:<9}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main(parse_args())
