"""A one-node Ray cluster on loopback (`ray start --head`) for as long as a context lasts, and a
free port: test support, also used by the lab tools (benchmarks/seed_vs_job's --cluster runs,
benchmarks/fixed_costs), never by the package.

The test suite's shared Ray (tests/conftest.py, `shared_ray_address`) is one of these, so every
run of the suite exercises it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mnist37 import Mnist37Error


_GIVEN: set[int] = set()
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")  # where the kernel picks ports for bind(0) and connect()
PICKED = (20000, 32768)  # above Ray's worker ports (10002-19999), below Linux's default ephemeral range


def _bindable(port: int) -> bool:
    """Nothing is bound to `port` on any address (Ray's GCS listens on all of them)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that nothing is bound to, for a Ray head's component to bind a
    moment later. Picked outside the kernel's ephemeral range: a port found there by binding 0
    can be handed to another process's outgoing connection before Ray binds it (a fresh-clone
    run: a head's ray_client_server, given such a port, found it taken 3 s later, and `ray
    start --block` stopped the whole head). Each suite process (PYTEST_XDIST_WORKER `gwN`)
    picks in its own slice of PICKED, and never the same port twice: the two suite processes
    start heads at the same time."""
    low, high = PICKED
    ephemeral = [int(word) for word in EPHEMERAL.read_text().split()] if EPHEMERAL.exists() else [49152, 65535]
    if ephemeral[0] < high and ephemeral[1] >= low:
        raise Mnist37Error(f"the kernel's ephemeral ports ({ephemeral[0]}-{ephemeral[1]}, {EPHEMERAL}) overlap "
                           f"the test heads' ports ({low}-{high - 1})")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = (high - low) // max(workers, 1)
    first = low + size * (int(worker) if worker.isdigit() else 0)
    start = random.randrange(size)  # a rerun soon after starts elsewhere in the slice
    for offset in range(size):
        port = first + (start + offset) % size
        if port not in _GIVEN and _bindable(port):
            _GIVEN.add(port)
            return port
    raise Mnist37Error(f"no free port in {first}-{first + size - 1}")


@contextlib.contextmanager
def running_cluster(log_file: Path, timeout_s: float = 120, num_cpus: int | None = None,
                    env: dict[str, str] | None = None, node_ip_address: str | None = None) -> Iterator[str]:
    """A one-node Ray cluster (`ray start --head --block`, no dashboard) for as long as the
    context lasts; yields its address for `--ray-address`, and `ray start`'s output goes to
    `log_file`. Ending the `ray start` process stops what it started and nothing else on the
    machine (unlike `ray stop`, which stops every Ray of the user's). Its own --temp-dir keeps
    the "current cluster" file out of /tmp/ray: stopped this way the file would stay behind,
    and every later `ray.init()` on the machine would try to join the dead head.

    `num_cpus`: the CPUs the node offers its tasks (default: the machine's); `env`: the
    environment its processes, its tasks' included, start with (default: this process's);
    `node_ip_address`: the address the node announces (127.0.0.1 keeps it on loopback).
    Raises Mnist37Error (the benchmark's one-line error) naming `log_file` when the head does not
    come up within `timeout_s`."""
    port = free_port()
    ray = Path(sys.executable).with_name("ray")
    # Short, under Ray's own temp root (RAY_TMPDIR, else the system's): its socket paths must fit 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="mnist37-ray-", dir=os.environ.get("RAY_TMPDIR") or None)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        process = subprocess.Popen(
            [str(ray) if ray.exists() else "ray", "start", "--head", "--block", "--port", str(port),
             "--temp-dir", temp_dir, "--include-dashboard", "false", "--disable-usage-stats",
             "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
             *(["--num-cpus", str(num_cpus)] if num_cpus is not None else []),
             *(["--node-ip-address", node_ip_address] if node_ip_address else [])],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in log_file.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise Mnist37Error(f"ray start --head did not come up; its output is in {log_file}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        # SIGTERM to `ray start` alone: it stops its node in ~2 s (sent to the whole group, 33 s).
        process.terminate()
        try:
            process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # anything of it still there
        shutil.rmtree(temp_dir, ignore_errors=True)
