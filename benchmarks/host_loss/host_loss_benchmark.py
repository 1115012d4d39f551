"""What a lost host costs: the job undisturbed against the same job with a worker host cut off
mid-decode, on the test hosts of tests/hosts.py (three network, mount and PID namespaces; a
Ray head with no CPUs and two workers of 1 CPU; mnist_sample.tgz as one object in the S3 test
server on the bridge), medians of a few runs side by side.

    sudo python benchmarks/host_loss/host_loss_benchmark.py --data ../shared/data/mnist_sample.tgz --repeats 3
    ... --settings ray-defaults --repeats 1      Ray's own detection settings (minutes: see README)

A lab tool, not part of the package: it imports the project's test support (tests.hosts,
tests.s3server). Needs root, `ip`, `unshare`, `nsenter`, and the test extras (moto).

Each run is a fresh chunk folder (nothing reused) on a cluster whose hosts already hold the
archive's extraction (a warm-up run first), so runs differ only by the cut. A cut run cuts
worker-1's link once it has written its first chunk, notes when the head's GCS reports the
node dead (the detection time, polled on the dashboard's state API every 0.1 s) and when the
job ends; worker-1 then joins again as a new node for the next run. Per run it prints the job's
wall seconds (`ray start`-to-exit of `python jobs/evaluate.py` on the head), its decode and
classify stage seconds, and for a cut run the detection, cut-to-end and detection-to-end
seconds (the last is what the job adds once Ray has declared the node dead: issue 36's goal is
the lost host's share of the work plus at most 30 s); then medians.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BUCKET = "mnist37-host-loss"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="mnist_sample.tgz (uploaded as one object)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--shard-size", type=int, default=512, help="images per shard (default 512: 29 shards)")
    parser.add_argument("--settings", choices=("harness", "ray-defaults", "no-keepalive"), default="harness",
                        help="Ray's detection settings: tests/hosts.DETECTION (default); Ray's own; "
                             "DETECTION without the gRPC client keepalive")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the hosts' folders and logs")
    return parser.parse_args(argv)


def detection(settings: str) -> dict[str, str]:
    from tests.hosts import DETECTION

    if settings == "ray-defaults":
        return {}
    if settings == "no-keepalive":
        return {k: v for k, v in DETECTION.items() if "keepalive" not in k}
    return dict(DETECTION)


def main(args: argparse.Namespace) -> int:
    from tests import hosts
    from tests.s3server import aws_env

    if reason := hosts.unavailable():
        print(f"error: {reason}", file=sys.stderr)
        return 1
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                       "RAY_USAGE_STATS_ENABLED": "0"})
    os.environ.pop("RAY_ADDRESS", None)
    work = Path(tempfile.mkdtemp(prefix="m37h-bench-"))
    network = hosts.Network(["head", "worker-1", "worker-2"], work / "hosts")
    rows = []
    try:
        with hosts.s3_on_bridge(network.address, BUCKET) as store:
            store.client().upload_file(str(args.data), BUCKET, args.data.name)
            env = {k: v for k, v in hosts.node_env(dict(os.environ), aws_env(store.endpoint)).items()
                   if k not in hosts.DETECTION}
            env |= detection(args.settings)
            cluster = hosts.RayCluster(network, env, work / "logs")
            try:
                cluster.start()
                print(f"settings: {args.settings} {json.dumps(detection(args.settings))}", flush=True)
                run(cluster, store, args, "warm-up", cut=False)  # every host fetches and extracts once
                for index in range(args.repeats):
                    for cut in (False, True):
                        row = run(cluster, store, args, f"{'cut' if cut else 'undisturbed'}-{index}", cut)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                cluster.stop()
    finally:
        network.close()
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    table(rows, args)
    return 0


def run(cluster, store, args, name: str, cut: bool) -> dict:
    from tests import hosts

    argv = [sys.executable, "jobs/evaluate.py", "--data", f"s3://{BUCKET}/{args.data.name}",
            "--out", f"s3://{BUCKET}/runs/{name}", "--shard-size", str(args.shard_size),
            "--chunk-dir", str(hosts.HOME_CACHE / "host-loss" / name), "--ray-address", cluster.address]
    worker = cluster.workers[0]
    clock = time.perf_counter()
    job = cluster.head.start(argv, cluster.env, cluster.logs / f"{name}.log", cwd=ROOT)
    row = {"run": name, "cut": cut}
    try:
        if cut:
            chunks = worker.cache / "host-loss" / name
            while not any(chunks.glob("*/*.arrow")):
                if job.popen.poll() is not None or time.perf_counter() - clock > args.timeout:
                    raise RuntimeError(f"{name}: worker-1 wrote no chunk before the job ended:\n{job.output()[-2000:]}")
                time.sleep(0.02)
            lost = cluster.node_of(worker)
            worker.cut()
            cut_at = time.perf_counter()
            while lost in cluster.alive_nodes() and job.popen.poll() is None:
                time.sleep(0.1)
            row["detected_s"] = round(time.perf_counter() - cut_at, 1)
        status = job.popen.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - clock)))
        row["job_s"] = round(time.perf_counter() - clock, 1)
        if cut:
            row["cut_to_end_s"] = round(time.perf_counter() - cut_at, 1)
            row["detected_to_end_s"] = round(row["cut_to_end_s"] - row["detected_s"], 1)
        if status != 0:
            raise RuntimeError(f"{name}: exit {status}:\n{job.output()[-3000:]}")
        results = json.loads(store.client().get_object(Bucket=BUCKET, Key=f"runs/{name}/results.json")["Body"].read())
        row |= {"decode_s": round(results["elapsed_s"]["decode"], 1),
                "classify_s": round(results["elapsed_s"]["classify"], 1),
                "l1_mean": results["metrics"]["l1"]["mean_class_accuracy"],
                "prototypes_sha256": results["prototypes_sha256"][:12]}
    finally:
        job.stop(timeout_s=5)
        if cut:
            cluster.restart_worker(worker)
    return row


def table(rows: list[dict], args) -> None:
    def median(kind: bool, key: str) -> str:
        values = [r[key] for r in rows if r["cut"] == kind and key in r]
        return f"{statistics.median(values):.1f}" if values else "-"

    print(f"\nsettings: {args.settings}; medians of {args.repeats} runs; shard size {args.shard_size}")
    print("| | job s | decode s | classify s | detected s | cut to end s | detected to end s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, label in ((False, "undisturbed"), (True, "worker-1 cut mid-decode")):
        print(f"| {label} | {median(kind, 'job_s')} | {median(kind, 'decode_s')} | {median(kind, 'classify_s')} "
              f"| {median(kind, 'detected_s')} | {median(kind, 'cut_to_end_s')} | {median(kind, 'detected_to_end_s')} |")
    figures = {(r["l1_mean"], r["prototypes_sha256"]) for r in rows}
    print(f"figures identical in every run: {len(figures) == 1}")


if __name__ == "__main__":
    sys.exit(main(parse_args()))
