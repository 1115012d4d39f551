"""Test hosts on this machine: each its own network namespace (its own address on a bridge of a
private test subnet), its own disk (a mount namespace in which `~/.cache` and `/tmp/ray` are
bind mounts of the host's own folders) and its own processes (a PID namespace); a Ray head and
workers started in them with `ray start`; the S3 test server (tests/s3server.py's moto) on the
bridge's address, so that data lives only in the store.

    10.237.37.1   the bridge, in the root namespace: the test process, moto, `ray job submit`
    10.237.37.2   head      ray start --head --num-cpus 0 (GCS 6379, dashboard and job API 8265)
    10.237.37.3   worker-1  ray start --address 10.237.37.2:6379 --num-cpus 1
    10.237.37.4   worker-2  ray start --address 10.237.37.2:6379 --num-cpus 1

(10.237.37 is the first free subnet of 10.237.37-46: several networks can stand at once, each
on a subnet and with names of its own.)

A host is cut off as a network partition cuts it (`cut()`: its link, the bridge side of its
veth pair, set down); its processes keep running. Everything is stopped by process id (a
host's PID 1, which takes its PID namespace with it, each process started there, then anything
left in its network namespace, which only this harness starts anything in), then the
namespaces, veths and bridge are removed: in `close()`, and at the next start for what an
earlier, killed run left behind (`clear_leftovers`, by the name prefix and the dead owner's pid
in every name). Only addresses of the test subnet and loopback are ever used.

Ray's detection of a lost host is a mode of the harness (`node_env(..., detection)`): Ray's own
defaults (`RAY_DEFAULTS`: nothing set, as on a cluster users start with `ray start`), or faster
settings (`DETECTION`) on every node and driver, as `RAY_<name>` variables, which override the
setting of that name (src/ray/common/ray_config_def.h):

- the GCS asks each raylet for its health every `health_check_period_ms`, gives each check
  `health_check_timeout_ms`, and after `health_check_failure_threshold` failures in a row the
  node is dead. Ray 2.60's defaults (5000 ms initial delay, 3000 ms period, 10000 ms timeout, 5
  failures) took 65 s to report a host that stopped answering; these take 5 s
  (benchmarks/host_loss).
- a task already pushed to a worker on that host fails only when the driver's gRPC connection to
  it is found dead: `grpc_client_keepalive_time_ms` / `grpc_client_keepalive_timeout_ms` (300 s /
  120 s by default; a lost host then cost the job 143 s, with fast health checks alone still over
  120 s). They must be set on every Ray process: a server accepts keepalive pings only as often
  as `min(60 s, grpc_client_keepalive_time_ms)` (src/ray/rpc/grpc_server.cc).
- `gcs_rpc_server_reconnect_timeout_s` (default 60) is how long a raylet or driver cut off from
  the head keeps trying before it ends.

Needs root, `ip`, `unshare` and `nsenter` (`unavailable()` says which is missing, for a skip).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "m37h"  # every namespace and link this harness makes: m37h<owner pid><suffix>
SUBNETS = [f"10.237.{third}" for third in range(37, 47)]  # the first free one is used
SUBNET_LOCK = Path("/tmp") / f"{PREFIX}-subnets.lock"  # held while a network picks and takes its subnet
RAY = str(Path(sys.executable).with_name("ray"))
HOME_CACHE = Path.home() / ".cache"
RAY_TMP = Path("/tmp/ray")

# Ray's detection of a lost host (see the module docstring): dead for the cluster in about 5 s,
# its in-flight tasks failed within 4 s of their connection's last traffic.
DETECTION = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_gcs_rpc_server_reconnect_timeout_s": "10",
    "RAY_grpc_client_keepalive_time_ms": "2000",
    "RAY_grpc_client_keepalive_timeout_ms": "2000",
}
# Ray's own detection settings: what a cluster users start with `ray start` has (the job
# recovers from a lost host as soon as Ray declares it dead: mnist37.on_ray.scheduling._InFlight).
RAY_DEFAULTS: dict[str, str] = {}


def unavailable() -> str | None:
    """Why test hosts cannot be made here (a reason for pytest.skip), or None."""
    if os.geteuid() != 0:
        return "test hosts need root (network, mount and PID namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"test hosts need `{tool}`, not found on PATH"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if check and run.returncode:
        raise RuntimeError(f"ip {' '.join(argv)}: {run.stderr.strip()}")
    return run


def _owner(name: str) -> int | None:
    digits = name.removeprefix(PREFIX)
    digits = digits[:len(digits) - len(digits.lstrip("0123456789"))]
    return int(digits) if name.startswith(PREFIX) and digits else None


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def namespace_pids(namespace: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", namespace, check=False).stdout.split()]


def kill_namespace(namespace: str) -> None:
    """SIGKILL every process in a namespace this harness made, by id, and remove it."""
    for _ in range(50):
        pids = namespace_pids(namespace)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    ip("netns", "del", namespace, check=False)


def clear_leftovers() -> list[str]:
    """Remove the namespaces (and their processes) and links that a killed earlier run of this
    harness left: those named with PREFIX whose owner pid is gone. Returns their names."""
    cleared = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if (owner := _owner(name)) is not None and not _alive(owner):
            kill_namespace(name)
            cleared.append(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if (owner := _owner(name)) is not None and not _alive(owner):
            ip("link", "del", name, check=False)
            cleared.append(name)
    return cleared


@dataclass
class Process:
    """A process started in a host, in its own session; its output goes to `log`."""

    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM to the leader (`ray start --block` then stops what it started), then SIGKILL
        to its process group."""
        if self.popen.poll() is None:
            self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


@dataclass
class Host:
    """A machine of its own as far as Ray can tell: a network namespace with an address, and
    one PID and mount namespace (booted by `boot()`, whose first process holds them) that every
    process started in the host joins, in which `~/.cache` and `/tmp/ray` are this host's own
    folders under `disk`. Its own PID namespace matters: a driver finds its node's raylet by
    looking for raylet processes (ray._private.services.find_node_ids), and would otherwise
    find every host's, and prefer the head's."""

    name: str
    namespace: str
    address: str
    link: str  # the bridge side of its veth pair: cut() sets it down
    disk: Path
    processes: list[Process] = field(default_factory=list)
    init: subprocess.Popen | None = None
    init_pid: int = 0  # the host's PID 1, as the root namespace numbers it
    is_cut: bool = False  # its link is down (cut(), till mend())

    @property
    def cache(self) -> Path:
        """This host's ~/.cache, as the root namespace sees it."""
        return self.disk / "cache"

    def boot(self, timeout_s: float = 30) -> None:
        """The host's PID 1 (`sleep infinity`) in new PID and mount namespaces, with the binds."""
        for folder in ("cache", "ray"):
            (self.disk / folder).mkdir(parents=True, exist_ok=True)
        mounts = f'mount --bind "$1" "{HOME_CACHE}" && mount --bind "$2" "{RAY_TMP}" && exec sleep infinity'
        self.init = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, "unshare", "--mount", "--propagation", "private", "--pid",
             "--fork", "--mount-proc", "sh", "-c", mounts, "sh", str(self.disk / "cache"), str(self.disk / "ray")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError):  # not forked yet
                child = int(Path(f"/proc/{self.init.pid}/task/{self.init.pid}/children").read_text().split()[0])
                if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep"):
                    self.init_pid = child
                    return
            if self.init.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name} did not boot: {self.init.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)

    def argv(self, command: list[str], cwd: Path | None = None) -> list[str]:
        if not self.init_pid:
            self.boot()
        chdir = ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(cwd)] if cwd else []
        return ["nsenter", "--target", str(self.init_pid), "--net", "--mount", "--pid", "--", *chdir, *command]

    def start(self, command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Process:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            popen = subprocess.Popen(self.argv(command, cwd), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        process = Process(popen, log)
        self.processes.append(process)
        return process

    def run(self, command: list[str], env: dict[str, str], cwd: Path | None = None,
            timeout_s: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command, cwd), env=env, capture_output=True, text=True, timeout=timeout_s)

    def pids(self) -> list[int]:
        return namespace_pids(self.namespace)

    def clear_ray_files(self) -> None:
        """Empty this host's /tmp/ray, as a reboot would."""
        shutil.rmtree(self.disk / "ray", ignore_errors=True)
        (self.disk / "ray").mkdir(parents=True)

    def cut(self) -> None:
        """A network partition: the host's link goes down, its processes keep running."""
        ip("link", "set", self.link, "down")
        self.is_cut = True

    def mend(self) -> None:
        ip("link", "set", self.link, "up")
        self.is_cut = False

    def stop_all(self) -> None:
        """Every process of this host, by id: its PID 1 (the kernel then kills everything in
        its PID namespace), each started process's group, then anything left in its network
        namespace. No graceful stop: a test host's state is thrown away."""
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait()
        self.processes.clear()
        for _ in range(50):
            if not (pids := self.pids()):
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if self.init is not None:
            self.init.wait()
        self.init, self.init_pid = None, 0


class Network:
    """A bridge with its own subnet and `names` hosts on it (.2, .3, ...); the bridge's own
    address (.1) is the root namespace's, where the test process and the store listen."""

    _made = 0  # networks made by this process: the second and later get a letter in their names

    def __init__(self, names: list[str], root: Path):
        clear_leftovers()
        RAY_TMP.mkdir(exist_ok=True)
        HOME_CACHE.mkdir(parents=True, exist_ok=True)
        # Several networks may stand at once (tests/test_hosts.py runs two; another test process
        # or session its own): each has names of its own (the owner's pid, then a letter from
        # the second one a process makes) and a subnet of its own, chosen and taken under a lock.
        tag = f"{PREFIX}{os.getpid()}{'abcdefghij'[Network._made - 1] if Network._made else ''}"
        Network._made += 1
        self.bridge, self.hosts = f"{tag}b", {}
        try:
            with open(SUBNET_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                used = ip("-o", "addr", "show").stdout
                self.subnet = next((s for s in SUBNETS if f" {s}." not in used), None)
                if self.subnet is None:
                    raise RuntimeError(f"every test subnet {SUBNETS[0]}-{SUBNETS[-1]}.0/24 is in use")
                self.address = f"{self.subnet}.1"
                ip("link", "add", self.bridge, "type", "bridge")
                ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for index, name in enumerate(names):
                host = Host(name, f"{tag}-{name}", f"{self.subnet}.{index + 2}", f"{tag}v{index}", root / name)
                ip("netns", "add", host.namespace)
                self.hosts[name] = host
                ip("link", "add", host.link, "type", "veth", "peer", "name", f"{tag}p{index}")
                ip("link", "set", f"{tag}p{index}", "netns", host.namespace)
                inside = ("netns", "exec", host.namespace, "ip")
                ip(*inside, "link", "set", f"{tag}p{index}", "name", "eth0")
                ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
                ip(*inside, "link", "set", "eth0", "up")
                ip(*inside, "link", "set", "lo", "up")
                ip("link", "set", host.link, "master", self.bridge)
                ip("link", "set", host.link, "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                host.stop_all()
            kill_namespace(host.namespace)
            ip("link", "del", host.link, check=False)
        ip("link", "del", self.bridge, check=False)


def node_env(base: dict[str, str], store: dict[str, str], detection: dict[str, str] = DETECTION) -> dict[str, str]:
    """What every Ray process of the harness starts with: the test session's environment (its
    Ray token: tests/conftest.py, less any RAY_ setting of its own of the detection), the store's
    variables, the detection settings (`DETECTION`, or `RAY_DEFAULTS`). Not the
    session's cache folder (`.ci/run` sets MNIST37_CACHE to one folder of its own): each host
    keeps its cache on its own disk, in its own ~/.cache."""
    env = {k: v for k, v in base.items()
           if k not in ("RAY_ADDRESS", "MNIST37_CACHE", "XDG_CACHE_HOME", *DETECTION) and not k.startswith("AWS_")}
    return {**env, **store, **detection, "RAY_USAGE_STATS_ENABLED": "0"}


class RayCluster:
    """`ray start --block` on each host: the head on `hosts[0]`, a worker on each other;
    stopped by process id.

    The head advertises no CPUs (`--num-cpus 0`, as Ray advises for a cluster's head): it holds
    the GCS, the dashboard, the job API and the drivers, and the tasks run on the workers, 1 CPU
    each. That also makes the workers alike: a head that runs tasks too has its worker
    processes and the driver's extraction of an archive ready first and may finish a small job
    before the workers' first tasks start (seen: all 29 shards of mnist_sample on the head)."""

    GCS_PORT, DASHBOARD_PORT = 6379, 8265

    def __init__(self, network: Network, env: dict[str, str], logs: Path, object_store_bytes: int = 200 << 20):
        self.network, self.env, self.logs = network, env, logs
        self.object_store_bytes = object_store_bytes
        self.head, *self.workers = network.hosts.values()
        self.address = f"{self.head.address}:{self.GCS_PORT}"
        self.dashboard = f"http://{self.head.address}:{self.DASHBOARD_PORT}"
        self.nodes: dict[str, Process] = {}
        self.starts = 0

    def _start(self, host: Host, env: dict[str, str]) -> Process:
        cpus = "0" if host is self.head else "1"
        common = ["--block", "--num-cpus", cpus, "--node-ip-address", host.address, "--disable-usage-stats",
                  "--object-store-memory", str(self.object_store_bytes)]
        if host is self.head:
            command = [RAY, "start", "--head", "--port", str(self.GCS_PORT), "--dashboard-host", host.address,
                       "--dashboard-port", str(self.DASHBOARD_PORT), *common]
        else:
            command = [RAY, "start", "--address", self.address, *common]
        self.starts += 1
        process = host.start(command, env, self.logs / f"{host.name}-{self.starts}.log")
        self.nodes[host.name] = process
        return process

    def start(self, env: dict[str, str] | None = None, timeout_s: float = 120) -> None:
        """Start (or start again) the head, then every worker, and wait for all of them."""
        self.env = env or self.env
        for host in self.network.hosts.values():
            host.clear_ray_files()
        head = self._start(self.head, self.env)
        self._wait_started(head, timeout_s)
        for process in [self._start(w, self.env) for w in self.workers]:
            self._wait_started(process, timeout_s)
        self.wait_for_nodes(1 + len(self.workers), timeout_s)

    def restart_worker(self, host: Host, timeout_s: float = 120) -> None:
        """A worker host that was cut off joins again as a new node: its old processes are
        stopped by id, its link is mended, `ray start` runs there again."""
        host.stop_all()
        host.clear_ray_files()
        host.mend()
        self._wait_started(self._start(host, self.env), timeout_s)
        self.wait_for_nodes(1 + len(self.workers), timeout_s)

    def remove_worker(self, host: Host, timeout_s: float = 60) -> None:
        """A worker host that was cut off leaves for good, as a machine shut down does: its link
        mended, SIGTERM to its `ray start --block` and what it started (the raylet then tells
        the GCS it is leaving: the node is dead at once, not after Ray's health checks), then,
        once the GCS counts the node dead (or after `timeout_s`), every process of the host
        stopped by id."""
        node = next((n for n, address in self.alive_nodes().items() if address == host.address), None)
        host.mend()
        process = self.nodes.pop(host.name, None)
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while node is not None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, KeyError, ValueError):
                if node not in self.alive_nodes():
                    break
            time.sleep(0.2)
        host.stop_all()

    def stop(self) -> None:
        for host in self.network.hosts.values():  # their files (Ray's logs) stay till a start
            host.stop_all()
        self.nodes.clear()

    @staticmethod
    def _wait_started(process: Process, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in process.output():
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not come up:\n{process.output()[-3000:]}")
            time.sleep(0.1)

    def alive_nodes(self) -> dict[str, str]:
        """node id -> address of every node the GCS counts alive (the dashboard's state API)."""
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=100&detail=false",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.load(response)["data"]["result"]["result"]
        return {n["node_id"]: n["node_ip"] for n in nodes if n["state"] == "ALIVE"}

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError, KeyError, ValueError):
                if len(alive := self.alive_nodes()) == count:
                    return alive
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not show {count} nodes alive within {timeout_s:.0f} s")
            time.sleep(0.2)

    def node_of(self, host: Host) -> str:
        """The node id of the live node on `host`."""
        return next(node for node, address in self.alive_nodes().items() if address == host.address)


@contextlib.contextmanager
def s3_on_bridge(address: str, bucket: str) -> Iterator:
    """tests/s3server.py's moto, listening on the bridge address (reachable from every host)."""
    from tests.s3server import S3Server

    server = S3Server(ip_address=address)
    try:
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()
