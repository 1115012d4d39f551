"""Objects per second read from an S3-compatible server on loopback, at several numbers of
requests in flight: what chose mnist37.storage.objects.REQUESTS_IN_FLIGHT.

    python benchmarks/object_requests/object_benchmark.py                       # moto on 127.0.0.1, 2,000 MNIST-sized objects
    python benchmarks/object_requests/object_benchmark.py --objects 4000 --requests 1 4 16 64
    python benchmarks/object_requests/object_benchmark.py --latency-ms 30       # each request held 30 ms, as a store's latency
    python benchmarks/object_requests/object_benchmark.py --job --requests 1 16   # the whole job, from moto
    python benchmarks/object_requests/object_benchmark.py --job --job-data ~/.cache/mnist37/extracted/mnist_sample-*/mnist_sample
    AWS_ENDPOINT_URL=http://host:9000 python benchmarks/object_requests/object_benchmark.py --uri s3://bucket/prefix

Without --uri it starts moto's server (a test dependency) on 127.0.0.1 and uploads
`--objects` objects of `--size` bytes; with --uri it reads the objects already under that
prefix (AWS variables as usual). With --latency-ms, requests go through a proxy on loopback
(tests.s3server.FaultProxy) that holds each one that long before passing it to moto: on
loopback a request costs the server's CPU only, against a real store it waits tens of ms.
Each setting reads every object once, through the same
`read_objects` a decode task uses, after one warm-up pass. Needs no Ray.

With --job: uploads a 3,000-image 28x28 ImageFolder (tests.conftest.make_image_folder) to
moto and runs jobs/evaluate.py on it (`--shard-size 1000`, a local Ray, a cold chunk cache)
once per --requests setting (MNIST37_OBJECT_REQUESTS), printing the job's and the mean
task's objects/s. With --job --job-data FOLDER: uploads that ImageFolder instead and runs the
job once from the store and once from FOLDER on disk, side by side: wall, the driver's peak RSS,
listing and decode times, and whether the figures agree.

A lab tool, not part of the package: it imports the project's test support (tests.s3server's
moto server and fault proxy, tests.conftest.make_image_folder), as benchmarks/ may and mnist37/
never does (benchmarks/README.md). Run it from a checkout with the test extras installed
(`pip install -e '.[test]'`). Findings: README.md beside this file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT))  # mnist37 and tests/ of this checkout

from benchmarks.support.processes import fresh_process  # noqa: E402
from mnist37.storage.objects import REQUESTS_IN_FLIGHT, list_objects, read_objects  # noqa: E402


def start_server(objects: int, size: int) -> tuple[object, str]:
    """moto on loopback with `objects` objects of `size` bytes at s3://bench/objects."""
    from tests.s3server import S3Server, aws_env

    server = S3Server()
    os.environ.update(aws_env(server.endpoint))
    client = server.client()
    client.create_bucket(Bucket="bench")
    body = os.urandom(size)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket="bench", Key=f"objects/{i:07d}.png", Body=body),
                      range(objects)))
    return server, "s3://bench/objects"


def job_figures(requests: list[int]) -> None:
    import json
    import subprocess
    import tempfile

    from tests.conftest import make_image_folder
    from tests.s3server import S3Server, aws_env

    tmp = Path(tempfile.mkdtemp(prefix="mnist37-object-bench-"))
    root = make_image_folder(tmp / "data", {"train": {"3": 1000, "7": 1000}, "valid": {"3": 500, "7": 500}},
                             shape=(28, 28))
    server = S3Server()
    try:
        server.client().create_bucket(Bucket="bench")
        server.upload(root, "bench", "data")
        for n in requests:
            out = tmp / f"out-{n}"
            run = subprocess.run(
                [sys.executable, "jobs/evaluate.py", "--data", "s3://bench/data", "--out", str(out), "--cache-dir",
                 str(tmp / f"cache-{n}"), "--ray-address", "local", "--shard-size", "1000"],
                cwd=PROJECT_ROOT, capture_output=True, text=True,
                env={**os.environ, **aws_env(server.endpoint), "MNIST37_OBJECT_REQUESTS": str(n)})
            if run.returncode:
                sys.exit(run.stderr)
            results = json.loads((out / "results.json").read_text())
            tasks = results["shards"]["per_shard"]
            per_task = sum(t["num_files"] for t in tasks) / sum(t["decode_elapsed_s"] for t in tasks)
            print(f"requests {n:>3}: job {results['throughput']['decode_files_per_s']:.0f} objects/s "
                  f"(decode stage {results['elapsed_s']['decode']:.2f} s), a task {per_task:.0f} objects/s "
                  f"(mean of {len(tasks)})", flush=True)
    finally:
        server.stop()


def store_against_disk(root: Path) -> None:
    """The job on the ImageFolder `root` uploaded to moto, then on `root` itself, each with a
    cold chunk folder and a local Ray: wall time, the driver's peak RSS, listing and decode, and
    whether the figures agree."""
    import json
    import subprocess
    import tempfile

    from tests.s3server import S3Server, aws_env

    tmp = Path(tempfile.mkdtemp(prefix="mnist37-object-bench-"))
    server = S3Server()
    try:
        server.client().create_bucket(Bucket="bench")
        clock = time.perf_counter()
        uploaded = server.upload(root, "bench", "data")
        print(f"uploaded {uploaded} objects in {time.perf_counter() - clock:.0f} s", flush=True)
        figures = {}
        print(f"{'data':<6} {'wall s':>7} {'driver RSS MiB':>15} {'with Ray MiB':>13} {'list+plan s':>12} "
              f"{'decode s':>9} {'objects/s':>10}")
        for label, data in (("store", "s3://bench/data"), ("disk", str(root))):
            out = tmp / f"out-{label}"
            clock = time.perf_counter()
            child = subprocess.Popen(
                fresh_process([sys.executable, "jobs/evaluate.py", "--data", data, "--out", str(out), "--chunk-dir",
                               str(tmp / f"chunks-{label}"), "--ray-address", "local"]),
                cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True, env={**os.environ, **aws_env(server.endpoint)})
            stderr = child.stderr.read()
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - clock
            if os.waitstatus_to_exitcode(status):
                sys.exit(stderr)
            r = json.loads((out / "results.json").read_text())
            figures[label] = (r["metrics"], r["data"]["fingerprint"], r["prototypes_sha256"])
            # The driver's own peak (results.json), and wait4's: the largest of the job's process
            # tree (the Ray processes the driver started and reaped, a local Ray's GCS and raylet).
            print(f"{label:<6} {wall:>7.1f} {r['memory']['driver_peak_rss_bytes'] / 2**20:>15.1f} "
                  f"{usage.ru_maxrss / 1024:>13.1f} {r['elapsed_s']['scan']:>12.2f} "
                  f"{r['elapsed_s']['decode']:>9.1f} {r['throughput']['decode_files_per_s']:>10.0f}", flush=True)
        print(f"figures identical (metrics, fingerprint, prototypes): {figures['store'] == figures['disk']}")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", help="read the objects under this prefix instead of starting a loopback server")
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=250, help="bytes per object (an MNIST PNG is ~250)")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="hold each request this long in a loopback proxy in front of moto")
    parser.add_argument("--job", action="store_true", help="time the whole job from moto instead")
    parser.add_argument("--job-data", type=Path,
                        help="with --job: upload this ImageFolder and run the job from moto and from disk")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if args.job:
        return store_against_disk(args.job_data) if args.job_data else job_figures(args.requests)
    server, uri = (None, args.uri) if args.uri else start_server(args.objects, args.size)
    proxy = None
    if args.latency_ms and server is not None:
        from tests.s3server import FaultProxy, aws_env

        proxy = FaultProxy(server.endpoint, slow_every=0, drop_every=0, delay_s=args.latency_ms / 1000)
        os.environ.update(aws_env(proxy.endpoint))
        print(f"every request held {args.latency_ms:g} ms by a proxy on loopback")
    try:
        clock = time.perf_counter()
        names = [n.decode() for n in list_objects(uri)[0]]
        listed_s = time.perf_counter() - clock
        read_objects(uri, names[:200], requests=16)  # warm-up: connections, the server's caches
        print(f"{len(names)} objects under {uri}, listed in {listed_s:.2f} s ({len(names) / listed_s:.0f} keys/s, "
              f"one prefix); default REQUESTS_IN_FLIGHT = {REQUESTS_IN_FLIGHT}")
        print(f"{'requests':>9} {'objects/s':>10} {'seconds':>8}")
        rates = {}
        for requests in args.requests:
            clock = time.perf_counter()
            read_objects(uri, names, requests=requests)
            elapsed = time.perf_counter() - clock
            rates[requests] = len(names) / elapsed
            print(f"{requests:>9} {rates[requests]:>10.0f} {elapsed:>8.2f}", flush=True)
        best = max(rates.values())
        knee = min(n for n, rate in rates.items() if rate >= 0.9 * best)
        print(f"fewest requests in flight within 10% of the best ({best:.0f} objects/s): {knee}")
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
