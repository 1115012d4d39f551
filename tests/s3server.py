"""A real S3-compatible server on 127.0.0.1 for tests (moto's server mode), a fault proxy in
front of it, and uploading a folder into it.

`aws_env(endpoint)` is every variable a process needs to talk to the loopback server and to
nothing else: the endpoint, dummy credentials, a region, no instance metadata, no ~/.aws files.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def aws_credentials() -> dict[str, str]:
    """What a node of a test cluster holds: the test server's credentials and region, and
    nothing that could send it to AWS (no metadata service, no config files), but no endpoint."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def aws_env(endpoint: str) -> dict[str, str]:
    """What a driver reading the test server holds: the credentials and the server's endpoint."""
    return {"AWS_ENDPOINT_URL": endpoint, **aws_credentials()}


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1 (or `ip_address`), on a free port."""

    def __init__(self, ip_address: str = "127.0.0.1"):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.server = ThreadedMotoServer(ip_address=ip_address, port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload(self, folder: Path, bucket: str, prefix: str) -> int:
        """Every file under `folder` to `s3://bucket/prefix/<relative path>`; returns how many."""
        client = self.client()
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(folder).as_posix()}",
                                                      Body=p.read_bytes()), files))
        return len(files)

    def stop(self) -> None:
        self.server.stop()


_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
              b'<Message>Please reduce your request rate.</Message></Error>')


@contextlib.contextmanager
def serving(bucket: str) -> Iterator[S3Server]:
    """A server with `bucket`, and this process's AWS variables pointed at it (and nowhere
    else) until it stops."""
    server = S3Server()
    saved = dict(os.environ)
    os.environ.update(aws_env(server.endpoint))
    try:
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that answers every `slow_every`-th
    request with 503 SlowDown and drops the connection, unanswered, on every `drop_every`-th
    (0: never); the requests numbered in `slow_burst` (from 1) are answered with 503 SlowDown
    too; every `hold_every`-th is held, never answered, until the client gives up or the proxy
    stops (a stalled store), or with `hold_once` only when that request (method and path) was
    never held before, so its next try is answered (a store that drops some requests now and
    then); every request is held `delay_s` before it is forwarded: a store's latency. The first
    `slow_writes` writes (PUT or POST) whose path holds `writes_matching` are answered with 503
    SlowDown too (counted in `slow_writes`): a store throttling uploads only."""

    def __init__(self, upstream: str, slow_every: int = 5, drop_every: int = 7, slow_burst: range = range(0),
                 delay_s: float = 0.0, hold_every: int = 0, hold_once: bool = False, slow_writes: int = 0,
                 writes_matching: str = ""):
        host, port = upstream.removeprefix("http://").split(":")
        self.counts = {"requests": 0, "slow_down": 0, "dropped": 0, "held": 0, "slow_writes": 0}
        self.stopping = threading.Event()
        lock, counts, stopping = threading.Lock(), self.counts, self.stopping
        held: set[tuple[str, str]] = set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                """The request's body; a chunked one (the AWS SDK's uploads) without its HTTP
                chunk framing, forwarded with a Content-Length."""
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)

            def _forward(self):
                body = self._body()
                with lock:
                    counts["requests"] += 1
                    n = counts["requests"]
                    request = (self.command, self.path)
                    hold = hold_every and n % hold_every == 0 and request not in held
                    slow_write = (self.command in ("PUT", "POST") and writes_matching in self.path
                                  and counts["slow_writes"] < slow_writes)
                    if slow_write:
                        counts["slow_writes"] += 1
                    if hold:
                        counts["held"] += 1
                        if hold_once:
                            held.add(request)
                if hold:
                    stopping.wait()  # the client times out and asks again on another connection
                    self.close_connection = True
                    return
                if drop_every and n % drop_every == 0:
                    counts["dropped"] += 1
                    self.close_connection = True
                    return
                if (slow_every and n % slow_every == 0) or n in slow_burst or slow_write:
                    counts["slow_down"] += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOW_DOWN)
                    return
                if delay_s:
                    time.sleep(delay_s)
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    connection.request(self.command, self.path, body=body or None,
                                       headers={k: v for k, v in self.headers.items()
                                                if k.lower() not in ("connection", "transfer-encoding", "expect")})
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
