"""Objects per second read from an S3-compatible server on loopback, at several numbers of
requests in flight: what chose mnist37.objects.REQUESTS_IN_FLIGHT.

    python jobs/object_benchmark.py                       # moto on 127.0.0.1, 2,000 MNIST-sized objects
    python jobs/object_benchmark.py --objects 4000 --requests 1 4 16 64
    AWS_ENDPOINT_URL=http://host:9000 python jobs/object_benchmark.py --uri s3://bucket/prefix

Without --uri it starts moto's server (a test dependency) on 127.0.0.1 and uploads
`--objects` objects of `--size` bytes; with --uri it reads the objects already under that
prefix (AWS variables as usual). Each setting reads every object once, through the same
`read_objects` a decode task uses, after one warm-up pass. Needs no Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37.objects import REQUESTS_IN_FLIGHT, list_objects, read_objects  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", help="read the objects under this prefix instead of starting a loopback server")
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=250, help="bytes per object (an MNIST PNG is ~250)")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server, uri = (None, args.uri) if args.uri else start_server(args.objects, args.size)
    try:
        names = [n.decode() for n in list_objects(uri)[0]]
        read_objects(uri, names[:200], requests=16)  # warm-up: connections, the server's caches
        print(f"{len(names)} objects under {uri}; default REQUESTS_IN_FLIGHT = {REQUESTS_IN_FLIGHT}")
        print(f"{'requests':>9} {'objects/s':>10} {'seconds':>8}")
        for requests in args.requests:
            clock = time.perf_counter()
            read_objects(uri, names, requests=requests)
            elapsed = time.perf_counter() - clock
            print(f"{requests:>9} {len(names) / elapsed:>10.0f} {elapsed:>8.2f}", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
