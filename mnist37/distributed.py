"""Ray: the one module that turns mnist37's core into tasks.

Decode tasks read a shard's PNGs into an Arrow chunk and send back sums and counts;
classification tasks read a chunk and send back confusion matrices. Tasks are submitted
through a bounded window (`max_in_flight`) so a million-image job never queues a million
tasks at once, and results are consumed in completion order, so nothing here depends on
which task finishes first.
"""

from __future__ import annotations

import logging
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NoReturn
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from mnist37 import Mnist37Error
from mnist37.chunks import chunk_bytes
from mnist37.examples import Sides
from mnist37.memory import peak_rss_bytes
from mnist37.paths import StoreSettings, store, use_store
from mnist37.processes import children_running, stop_descendants, stopped_by_signals
from mnist37.progress import REPORT_EVERY_S, Stalled, Watch
from mnist37.shards import DecodedShard, decode_shard
from mnist37.sources.archive import ArchiveObject
from mnist37.images import Decoding
from mnist37.sources.base import ContainerShard
from mnist37.sources.folder import ClassListing, Shard

log = logging.getLogger(__name__)


# Decode tasks spread over every node with free CPUs; Ray retries a task whose worker or
# node died (max_retries), never one that raised (retry_exceptions is off): a data problem
# would only fail again.
_RETRIES = dict(max_retries=3, retry_exceptions=False)


# Where each task runs: every task notes its node in the GCS's key-value store as it starts
# (one small write, under the job's id and its task id), so that once Ray declares a node dead
# the driver knows which of its tasks ran there without asking that node (_InFlight.retry).
_WHERE = b"mnist37-where"


def _record_node() -> None:
    """Note in the GCS which node runs this task (a hint: without it, the job submits the
    task again on any node's loss)."""
    from ray.experimental import internal_kv

    context = ray.get_runtime_context()
    with contextlib.suppress(Exception):  # noqa: BLE001: a hint only, see above
        internal_kv._internal_kv_put(f"{context.get_job_id()}/{context.get_task_id()}", context.get_node_id(),
                                     namespace=_WHERE)


def _decode(shard: Shard | ContainerShard, root: str, chunk_dir: str, decoding: Decoding, with_sums: bool,
            archive: ArchiveObject | None = None, settings: StoreSettings | None = None) -> DecodedShard:
    _record_node()
    if settings is not None:  # the driver's way to its object store, whatever this node's environment says
        use_store(settings)
    if archive is not None:  # the root is its extraction, which this node may not have made yet
        archive.here()
    if isinstance(shard, Shard):  # its file names are in the listing, in the object store
        shard = shard.resolved(ray.get)
    result = decode_shard(shard, root, chunk_dir, decoding, with_sums)
    context = ray.get_runtime_context()
    result.node_id, result.pid = context.get_node_id(), os.getpid()
    result.gpu_ids = list(context.get_accelerator_ids().get("GPU", []))
    return result


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD", **_RETRIES)
def _decode_task(*args) -> DecodedShard:
    return _decode(*args)


@ray.remote(num_cpus=1, num_returns=2, scheduling_strategy="SPREAD", **_RETRIES)
def _decode_and_ship_task(*args) -> tuple[DecodedShard, pa.Buffer]:
    """Decode, and return the chunk's bytes too: they travel through the object store to
    whichever node classifies them, for clusters whose nodes share no disk."""
    result = _decode(*args)
    return result, chunk_bytes(result.chunk_path)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD", **_RETRIES)
def _classify_task(key: str, chunk: str | pa.Buffer, checksum: str, prototypes: np.ndarray, metrics: Sequence[str],
                   device: str, examples: int, verify: bool, settings: StoreSettings) -> ClassifiedChunk:
    # Imported here: the driver needs no torch.
    from mnist37.classify import classify_chunk

    _record_node()
    use_store(settings)  # a chunk store may be a URI

    start = time.perf_counter()
    confusions, used, found = classify_chunk(chunk, prototypes, metrics, device, examples, checksum, verify)
    context = ray.get_runtime_context()
    return ClassifiedChunk(
        chunk_path=key, confusions=confusions, examples=found, device=str(used),
        gpu_ids=list(context.get_accelerator_ids().get("GPU", [])), node_id=context.get_node_id(), pid=os.getpid(),
        elapsed_s=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes())


@dataclass
class ClassifiedChunk:
    """What a classify task sends back: confusion counts and a few examples, never the images."""

    chunk_path: str
    confusions: dict[str, np.ndarray]  # metric -> int64 [C, C], rows = true class
    examples: dict[str, dict[int, Sides]]  # metric -> true class -> sides
    device: str
    gpu_ids: list
    node_id: str
    pid: int
    elapsed_s: float
    peak_rss_bytes: int


class ClusterError(Mnist37Error, ConnectionError):
    """No Ray cluster answers at the address the job would join."""


def _current_cluster() -> str | None:
    """The address the last `ray start` on this machine left for `ray.init()` to join, if any.
    Ray keeps it in a file of its temp dir; reading it is Ray-internal, so a Ray without this
    helper gets no check rather than a wrong one."""
    try:
        from ray._private.utils import read_ray_address
        return read_ray_address()
    except (ImportError, OSError):
        return None


_STARTED_HERE = "the address the last `ray start` on this machine left behind"


def _target(address: str) -> tuple[str | None, str]:
    """(the GCS address `ray.init(address)` would join, where it came from): `address` (the
    ray_address config key), else RAY_ADDRESS, else the one a `ray start` left on this machine;
    (None, ...) when the job starts a Ray of its own."""
    if address == "local":
        return None, "local"
    if address and address != "auto":
        return address, "ray_address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return _current_cluster(), _STARTED_HERE


def check_address(address: str, timeout_s: float = 3.0) -> None:
    """Raise ClusterError, naming the address and where it came from, when nothing listens at
    the GCS address `ray.init(address)` would join: Ray itself retries such an address for
    minutes. The address is `address` (the ray_address config key), else RAY_ADDRESS, else the
    one a `ray start` left on this machine (stale when that cluster died without `ray stop`).
    `local`, `ray://` client addresses and names Ray resolves itself are left to Ray."""
    address, where = _target(address)
    host, _, port = (address or "").rpartition(":")
    if not address or "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        remedy = "`ray stop` clears it" if where == _STARTED_HERE else "start one with `ray start --head`"
        raise ClusterError(f"{where}: no Ray cluster answers at {address} ({e.strerror or e}); {remedy}, "
                           "or pass --ray-address local for a Ray of the job's own") from None


# How long the job waits for a Ray GCS to answer before it says the address is not one.
PROBE_TIMEOUT_S = 10.0


def _auth_side() -> str:
    """This job's Ray authentication, in words: its mode and where its token comes from
    (never the token)."""
    mode = os.environ.get("RAY_AUTH_MODE") or "unset"
    if mode in ("disabled", "unset"):
        return f"this job's RAY_AUTH_MODE is {mode}, so it sends no token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        token = "a token from RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = f"a token from RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    elif os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        token = "a token from ~/.ray/auth_token"
    else:
        token = "no token (neither RAY_AUTH_TOKEN nor ~/.ray/auth_token)"
    return f"this job's RAY_AUTH_MODE is {mode}, with {token}"


class _QuietStderr:
    """The process's stderr (fd 2, where Ray's C++ core writes its warnings) sent to a log
    file while the job probes a cluster: Ray's repeated lines about a refused or silent
    connection go there, not to the user. `restore()` puts fd 2 back; `keep()`, for a probe
    that failed and left Ray's threads retrying until the process exits, leaves fd 2 on the
    log and gives Python's own stderr (the job's last line) the terminal."""

    def __init__(self, path: str):
        self.path = path
        sys.stderr.flush()
        self.saved = os.dup(2)
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)

    def restore(self) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)

    def keep(self) -> None:
        sys.stderr.flush()
        sys.stderr = os.fdopen(self.saved, "w", buffering=1)


def probe(address: str, where: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """Ask the Ray GCS at `address` for its cluster's metadata, as `ray.init` would first do,
    within `timeout_s`, and raise ClusterError with one line when it refuses the job (a wrong
    or missing token, an auth mode mismatch), runs another Ray or Python version, or is not a
    Ray GCS at all (nothing answers in time). The request runs in a thread of its own while
    the main thread waits in short steps (a signal still stops the job), Ray's C++ warnings
    to a log file named in the error."""
    from ray._raylet import GcsClient

    log_path = os.path.join(tempfile.gettempdir(), f"mnist37-ray-connect-{os.getpid()}.log")
    outcome: list = []

    def ask() -> None:
        try:
            client = GcsClient(address=address)
            outcome.append(client.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster", timeout=timeout_s))
        except Exception as e:  # noqa: BLE001: reported below, as one line
            outcome.append(e)

    quiet = _QuietStderr(log_path)
    try:
        asking = threading.Thread(target=ask, daemon=True, name="mnist37-ray-probe")
        asking.start()
        deadline = time.monotonic() + timeout_s
        while asking.is_alive() and time.monotonic() < deadline:
            asking.join(WAIT_STEP_S)
    finally:
        if outcome and not isinstance(outcome[0], Exception):
            quiet.restore()
            with contextlib.suppress(OSError):
                os.unlink(log_path)
        else:  # Ray's threads may go on retrying, and writing, until the job exits
            quiet.keep()
    if not outcome:
        raise ClusterError(f"{where}: nothing at {address} answered as a Ray GCS in {timeout_s:g} s (is it a "
                           "Ray head's GCS port, 6379 by default?); Ray's lines are in " + log_path)
    answer = outcome[0]
    if isinstance(answer, ray.exceptions.AuthenticationError):
        raise ClusterError(f"{where}: the Ray cluster at {address} refused this job's authentication: it requires a "
                           f"token (RAY_AUTH_MODE=token) and {_auth_side()}; give the job the cluster's token in "
                           "RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
    if isinstance(answer, Exception):
        text = str(answer).strip().splitlines()[0] if str(answer).strip() else ""
        raise ClusterError(f"{where}: the Ray GCS at {address} did not answer ({type(answer).__name__}: "
                           f"{text[:200]}); Ray's lines are in {log_path}") from None
    import json
    import platform

    metadata = json.loads(answer) if answer else {}
    theirs = (metadata.get("ray_version"), ".".join((metadata.get("python_version") or "").split(".")[:2]))
    ours = (ray.__version__, ".".join(platform.python_version().split(".")[:2]))
    if metadata and theirs != ours:
        raise ClusterError(f"{where}: the Ray cluster at {address} runs Ray {theirs[0]} on Python {theirs[1]}, "
                           f"this job Ray {ours[0]} on Python {ours[1]}: they must match")
    return metadata


class HeadLost(ClusterError):
    """The Ray head stopped answering under the job. Ray's own client would end the process
    with its own lines after gcs_rpc_server_reconnect_timeout_s, and `ray.shutdown()` would
    wait on the head: the job says its line and ends at once (job.run)."""

    ends_process = True  # nothing of Ray's may run after the line, its exit handler included


class RayletLost(ClusterError):
    """The raylet of the job's own Ray ended under the job. Ray's core worker ends the
    process with its own lines at its next call to the raylet (`ray.shutdown()`'s included,
    or its exit handler's): the job stops its Ray's other processes itself, says its line
    and ends at once (job.run)."""

    ends_process = True


def reconnect_timeout_s() -> float:
    """How long Ray's GCS client in this process waits for a head that stopped answering
    before it ends the process (Ray's `gcs_rpc_server_reconnect_timeout_s`, 60 s unless set)."""
    try:
        return float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s") or 60)
    except ValueError:
        return 60.0


class HeadWatch:
    """A daemon thread that opens a TCP connection to the head's GCS every `probe_every_s` (at
    most `probe_timeout_s` each) and keeps when it last succeeded; never a call into Ray, which
    would block on a lost head. Once the head has been silent for `limit_s` it calls
    `on_lost(seconds)` from its own thread, wherever the main thread is blocked (a Ray call
    waiting on the head may not return before Ray ends the process itself)."""

    def __init__(self, address: str, limit_s: float, on_lost: Callable[[float], None] | None = None,
                 probe_every_s: float = 1.0, probe_timeout_s: float = 1.0):
        host, _, port = address.rpartition(":")
        self.target, self.limit_s, self.on_lost = (host, int(port)), limit_s, on_lost
        self.probe_every_s, self.probe_timeout_s = probe_every_s, probe_timeout_s
        self.answered = time.monotonic()
        self.stopped = threading.Event()
        threading.Thread(target=self._run, name="mnist37-head-watch", daemon=True).start()

    def _run(self) -> None:
        while not self.stopped.wait(self.probe_every_s):
            try:
                socket.create_connection(self.target, timeout=self.probe_timeout_s).close()
                self.answered = time.monotonic()
            except OSError:
                if self.on_lost is not None and (silent := self.silent_s()) >= self.limit_s and not self.stopped.is_set():
                    self.on_lost(silent)
                    return

    def silent_s(self) -> float:
        """Seconds since the head last accepted a connection (0 while it does)."""
        return max(0.0, time.monotonic() - self.answered - self.probe_every_s - self.probe_timeout_s)

    def lost(self) -> bool:
        return self.silent_s() >= self.limit_s


@dataclass
class Session:
    """The Ray this job runs on, named in the first line after connecting, and its waits."""

    address: str = "?"
    origin: str = "?"  # started by this job | `ray start` on this machine | RAY_ADDRESS | --ray-address
    own: bool = True
    stall_s: float = 300.0
    head: HeadWatch | None = None
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> address, of the nodes seen alive
    nodes_checked: float = 0.0  # time.monotonic() of the last look at them
    lost: set[str] = field(default_factory=set)  # ids of the nodes lost under the job
    raylet: subprocess.Popen | None = None  # the job's own Ray's raylet, when it started one

    def raylet_gone(self) -> str | None:
        """How the job's own Ray's raylet ended ("killed by signal 9"), or None while it runs
        (or when the job joined a cluster)."""
        status = self.raylet.poll() if self.raylet is not None else None
        if status is None:
            return None
        return f"killed by signal {-status}" if status < 0 else f"exit status {status}"

    def check_raylet(self, watch: Watch) -> None:
        """RayletLost once the job's own raylet has ended: the job's waits never call into
        the raylet (fetch_local=False), so they see it first, not Ray's core worker."""
        if (how := self.raylet_gone()) is not None:
            raise RayletLost(_failed_under(watch, f"the raylet of the job's own Ray (pid {self.raylet.pid}) ended ({how})"))

    def alive(self) -> dict[str, str]:
        """node id -> address of each node the cluster counts alive now."""
        return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}

    def check_nodes(self, watch: Watch, pending: int, force: bool = False,
                    retry: Callable[[dict[str, str]], dict[str | None, int]] | None = None) -> None:
        """At most every NODES_EVERY_S of a stage's waits (and at its end, `force`): a line for
        each node that was alive and no longer is, in the stage it happened in. `retry(lost)`
        (node id -> address) submits again the stage's tasks that ran on a lost node, and says
        how many per node (None: those not yet seen running anywhere). Not while the head is
        silent (the call would block; check_head reports that)."""
        now = time.monotonic()
        if (not force and now - self.nodes_checked < NODES_EVERY_S) or (self.head is not None and self.head.silent_s() > 0):
            return
        self.nodes_checked = now
        try:
            alive = self.alive()
        except Exception:  # noqa: BLE001: a hint only; the head's silence is check_head's
            return
        lost = {node: address for node, address in self.nodes.items() if node not in alive}
        self.nodes = alive
        self.lost |= set(lost)
        again = retry(lost) if lost and retry is not None else {}
        left = f"the {len(alive)} node{'s' if len(alive) != 1 else ''} left"
        for node, address in lost.items():
            if retry is None:
                done = f"Ray {'retries' if pending else 'ran'} its tasks on {left}"
            else:
                ran, unseen = again.get(node, 0), again.pop(None, 0)
                done = f"{ran} task{'s' if ran != 1 else ''} it ran submitted again on {left}"
                if unseen:
                    done += f", and {unseen} not yet seen running on a node"
            log.warning("%s: node %s (%s) lost; %s (%s)", watch.what, address, node[:8], done, watch.outstanding(pending))

    def head_lost_after_s(self) -> float:
        """How long the head may stay silent before the job stops: half the time Ray's own
        client gives it (so the job, not Ray, says why it stopped), at most the stall limit."""
        return max(2.0, min(self.stall_s, reconnect_timeout_s() / 2))

    def head_lost(self, silent_s: float) -> HeadLost:
        return HeadLost(f"the Ray head at {self.address} ({self.origin}) stopped answering: no connection to its "
                        f"GCS in {silent_s:.0f} s (its node, or the network to it, is down); the chunks already "
                        "written are kept and reused by the next run")

    def check_head(self) -> None:
        """HeadLost once the head has not accepted a connection for head_lost_after_s."""
        if self.head is not None and self.head.lost():
            raise self.head_lost(self.head.silent_s())

    def joined(self) -> str:
        self.nodes, self.nodes_checked = self.alive(), time.monotonic()  # what check_nodes compares with
        resources = ray.cluster_resources()
        return (f"Ray: {self.address} ({self.origin}): {len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}, "
                f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")

    def describe(self) -> tuple[str, str]:
        """The cluster's state, and the likely cause of tasks that do not finish."""
        if self.head is not None and self.head.silent_s() > 0:  # a call into Ray would block
            return f"the Ray head at {self.address} does not answer", "Ray's head may be unreachable"
        try:
            total, free = ray.cluster_resources(), ray.available_resources()
        except Exception as e:  # noqa: BLE001: the head not answering is the state to report
            return f"the cluster at {self.address} does not answer ({type(e).__name__})", "Ray's head may be unreachable"
        cpus, free_cpus = total.get("CPU", 0), free.get("CPU", 0)
        state = f"the cluster at {self.address} shows {free_cpus:g} of {cpus:g} CPUs free"
        if cpus == 0:
            cause = "it has no CPUs for tasks"
        elif free_cpus < 1:
            cause = "none of its CPUs is free (this job's running tasks or other work hold them)"
        else:
            cause = ("CPUs are free, yet no task finished: their worker processes may fail to start, or the "
                     "tasks wait on something outside Ray (Ray's logs: " + _logs_dir() + ")")
        if not self.own:
            cause += (f"; this job joined a cluster it did not start ({self.origin}): "
                      "--ray-address local runs it on a Ray of its own")
        return state, cause


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def _logs_dir() -> str:
    try:
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001: Ray-internal; a hint only (Ray not started: its newest session's)
        return os.path.join(os.environ.get("RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "ray"),
                            "session_latest", "logs")


_session = Session()


def watching(what: str, total: int, unit: str) -> Watch:
    """A Watch for a stage's waits on this job's Ray (its stall limit and cluster state)."""
    return Watch(what, total, unit, _session.stall_s, _session.describe,
                 report_s=min(REPORT_EVERY_S, _session.stall_s / 3))


_ORIGINS = {"ray_address": "--ray-address", "RAY_ADDRESS": "RAY_ADDRESS", _STARTED_HERE: "`ray start` on this machine"}


def connect(address: str, dashboard: bool, stall_timeout_s: float,
            end_job: Callable[[ClusterError], None] | None = None,
            on_signal: Callable[[int], None] | None = None) -> Session:
    """Join the Ray the job runs on, or start one of its own, with every wait bounded: an
    address where nothing listens or that refuses the job is one ClusterError line (see
    `check_address`, `probe`). Returns the Session, whose `joined()` line names it.

    `end_job(error)` ends the job from a thread, wherever its main thread waits in Ray: it is
    called when ray.init has not returned within the stall limit, and when a joined cluster's
    head stops answering (which also raises HeadLost from the job's next wait). Without it
    (an in-process caller), neither is watched from a thread. `on_signal(signum)`, which must
    end the process too, is called when a SIGINT or SIGTERM arrives while ray.init runs, once
    every process a half-started Ray had started is stopped (`processes.stopped_by_signals`);
    the caller's signal handlers are in place again when connect returns."""
    global _session
    target, where = _target(address)
    if target and "://" not in target:
        check_address(address)
        probe(target, where)
    # address=None: RAY_ADDRESS (set by `ray job submit`), else a cluster started on this
    # machine with `ray start`, else a new local Ray (its dashboard, if on, on loopback only).
    who = where if target else "a local Ray of the job's own"
    try:
        with _bounded_start(who, "connect" if target else "start", stall_timeout_s, end_job), \
                stopped_by_signals(on_signal):
            context = ray.init(address=address or None, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                               configure_logging=False, log_to_driver=True)
    except Exception as e:  # noqa: BLE001: ray.init raises plain Exceptions too (a node that timed out starting)
        raise ClusterError(f"{who}: Ray did not {'connect' if target else 'start'} ({_first_line(e)}); "
                           f"Ray's logs: {_logs_dir()}") from None
    own = target is None
    gcs = getattr(context, "address_info", {}).get("gcs_address") or target
    session = Session(address=target or gcs or "?",
                      origin="started by this job" if own else _ORIGINS.get(where, where), own=own,
                      stall_s=stall_timeout_s)
    if gcs and "://" not in gcs:
        # A Ray of the job's own is not ended from the thread: its processes must be stopped.
        report = end_job if not own else None
        session.head = HeadWatch(gcs, session.head_lost_after_s(),
                                 (lambda silent: report(session.head_lost(silent))) if report else None)
    if own:
        session.raylet = _own_raylet()
    _session = session
    return _session


IN_PROCESS = "ray.init() of this process, before the job"


def join_this_process(address: str, stall_timeout_s: float) -> Session | None:
    """The Ray this process already runs as a driver (a notebook that called `ray.init()`) as
    the job's session, which the job uses and leaves running (`own` False), without a second
    ray.init() and without a head watch (the caller's Ray reports a lost head itself); None
    when this process runs no Ray. An `address` beside it is a ClusterError: the job would
    otherwise silently run somewhere else than asked."""
    global _session
    if not ray.is_initialized():
        return None
    if address:
        raise ClusterError(
            f"ray_address {address!r}: this process already runs Ray (ray.init() was called), and the "
            "job uses that one; leave ray_address empty, or call ray.shutdown() first")
    _session = Session(address=ray.get_runtime_context().gcs_address, origin=IN_PROCESS, own=False,
                       stall_s=stall_timeout_s)
    return _session


@contextlib.contextmanager
def _bounded_start(who: str, verb: str, limit_s: float, end_job: Callable[[ClusterError], None] | None):
    """`ray.init` within the stall limit: past it, a thread stops what it started (this
    process's descendants: a half-started Ray of the job's own) and ends the job with one line
    (`end_job`, which does not return), wherever ray.init is waiting. Without `end_job` (a
    caller in-process), nothing is watched."""
    done = threading.Event()

    def expired() -> None:
        if done.wait(limit_s):
            return
        stop_descendants()  # the raylet's agents too, not only the job's children
        end_job(ClusterError(f"{who}: Ray did not {verb} within {limit_s:g} s (stall_timeout_s); "
                             f"Ray's logs: {_logs_dir()}"))

    if end_job is not None:
        threading.Thread(target=expired, name="mnist37-ray-start", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _own_raylet():
    """The raylet process of the Ray this process started (a subprocess.Popen), or None."""
    try:
        from ray._private import ray_constants

        (info,) = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
        return info.process
    except Exception:  # noqa: BLE001: Ray-internal; without it the job relies on Ray's errors
        return None


def disconnect(exiting: bool = False) -> None:
    """Leave Ray; a Ray the job started is stopped, every process of it (`ray.shutdown()`).
    Its autoscaler monitor goes first, by SIGKILL: a Ray of the job's own has nothing to
    scale, and on SIGTERM the monitor reports its end to the GCS, which `ray.shutdown()` has
    stopped before it, so it would hold the exit for Ray's 1 s grace (docs/fixed-costs.md).
    Safe to call when Ray never started. After HeadLost it stops only the watch: Ray's
    disconnect would wait on the head (job.run ends the process instead).

    `exiting`: the process ends right after, with no exit handler run (job.run, once the
    outputs are written). A joined cluster is then left as a driver that exits is: the raylet
    sees the driver's connection close and stops the job's workers. `ray.shutdown()` would
    hold the exit for up to 0.25 s to join a polling thread of Ray's gRPC client
    (benchmarks/fixed_costs). The caller must then end the process without exit handlers:
    Ray's would call `ray.shutdown()` after all."""
    if _session.head is not None:
        _session.head.stopped.set()
        if not _session.own and _session.head.lost():
            return
    if exiting and not _session.own and ray.is_initialized():
        return
    if _session.own and ray.is_initialized() and _session.raylet_gone():
        # ray.shutdown() would call the dead raylet, and Ray would end the process with its
        # own lines: stop the other processes of the job's Ray here (RayletLost ends the job).
        with contextlib.suppress(Exception):  # noqa: BLE001: Ray-internal; best effort
            ray._private.worker._global_node.kill_all_processes(check_alive=False, allow_graceful=False)
        return
    if _session.own and ray.is_initialized():
        for pid in children_running("/ray/autoscaler/", "monitor.py"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    ray.shutdown()


# How long a failed map waits for its other tasks to end before it raises (see _raise_cause).
SETTLE_S = 60.0


def _raise_cause(error: ray.exceptions.RayTaskError, pending: Sequence) -> NoReturn:
    """Let the tasks still `pending` (refs, or streaming generators) end, for up to SETTLE_S,
    then raise a task's mnist37 error as itself (one clear line, not a remote traceback),
    anything else as Ray raised it.

    They are not cancelled: cancelling a task whose reply is already on its way aborts Ray
    2.60's core worker, the driver's included (task_manager.cc "Check failed ... Tried to
    complete task that was not pending"; seen with a full chunk store, where the tasks fail
    together). A task that runs to its end leaves its chunk whole or not at all, and at most
    `max_in_flight` tasks are pending, each one shard's work. Any still running after SETTLE_S
    end with the job's Ray or with the driver."""
    ends = [p.completed() if isinstance(p, ray.ObjectRefGenerator) else p for p in pending]
    deadline = time.monotonic() + SETTLE_S
    while ends and time.monotonic() < deadline:  # in short steps, so a signal still stops the job
        _, ends = ray.wait(ends, num_returns=len(ends), timeout=WAIT_STEP_S, fetch_local=False)
    if isinstance(error.cause, Mnist37Error):
        raise error.cause from None
    raise error


def bounded_map(submit: Callable[[object], ray.ObjectRef], items: Iterable, max_in_flight: int,
                received: Callable[[ray.ObjectRef, object], object] = lambda ref, value: value,
                what: tuple[str, str] = ("tasks", "")) -> Iterator:
    """Submit `submit(item)` for each item with at most `max_in_flight` unfinished; yield
    `received(ref, result)` as tasks finish, once per item. Every wait is bounded and watched
    (`_InFlight.next`: `what` names the stage and its unit in its lines); an item whose task
    ran on a node Ray declares dead is submitted again at once (`_InFlight.retry`), and its
    first result counts. A task that fails with an mnist37 error re-raises that error (one
    clear line, not a remote traceback) once the tasks still pending have ended
    (`_raise_cause`). An interrupt leaves them to `ray.shutdown()` (the job's own Ray) or to
    the driver's exit (a cluster's tasks die with their owner); neither path cancels a task
    (see `_raise_cause`)."""
    items = list(items) if not isinstance(items, Sequence) else items
    watch = watching(what[0], len(items), what[1])
    flight = _InFlight(submit, watch)

    def next_result():
        _, ref = flight.next()
        value = received(ref, _get(ref, watch))
        watch.finished()
        return value

    try:
        with _cluster_failures(watch):
            for index, item in enumerate(items):
                if len(flight) >= max_in_flight:
                    yield next_result()
                flight.add(index, item)
            while flight:
                yield next_result()
        _session.check_nodes(watch, 0, force=True)  # a node lost while the last tasks ran
        flight.forget()
    except ray.exceptions.RayTaskError as e:
        _raise_cause(e, flight.handles())


# The longest a wait on Ray blocks the main thread: a signal's handler runs between waits.
WAIT_STEP_S = 0.5
# How often a wait that finds nothing finished looks for nodes lost (Session.check_nodes).
NODES_EVERY_S = 1.0


class _InFlight:
    """A map's tasks in flight, by item: each item's attempts (a task, or a streaming
    generator: `handle`, waited on through `end(handle)`), the first to finish counts, the
    others are forgotten (never waited on, never counted; decode, classify and listing are
    idempotent: chunk writes are atomic, identical data gives identical keys).

    Why attempts: Ray fails a task already pushed to a worker on a lost host only when the
    driver's gRPC connection to that worker is found dead (keepalive: 300 s + 120 s with Ray's
    defaults), not when the GCS declares the node dead (benchmarks/host_loss). So once a node is
    declared dead, every item whose latest attempt ran there, or was not yet seen running on a
    node that is alive (its lease request may wait on the lost node's raylet), is submitted
    again at once, as `submit(item, again=n)` for its n-th attempt after a loss: its task then
    takes `_again(n)`'s options, so that Ray leases it a worker of its own rather than queue it
    behind the lost attempt (see _again)."""

    def __init__(self, submit: Callable[[object], object], watch: Watch, end: Callable[[object], ray.ObjectRef] = lambda h: h):
        self.submit, self.watch, self.end = submit, watch, end
        self.items: dict[int, object] = {}  # index -> item, while in flight
        self.attempts: dict[int, list[ray.ObjectRef]] = {}  # index -> end refs, oldest first
        self.index_of: dict[ray.ObjectRef, int] = {}
        self.handle_of: dict[ray.ObjectRef, object] = {}
        self.recovering: dict[int, tuple[str, str]] = {}  # index -> (lost node's address, when submitted again)
        self.job = ray.get_runtime_context().get_job_id()
        watch.describe = self.describe

    def __len__(self) -> int:
        return len(self.items)

    def add(self, index: int, item: object) -> None:
        self.items[index], self.attempts[index] = item, []
        self._attempt(index)

    def _attempt(self, index: int) -> None:
        again = len(self.attempts[index])
        handle = self.submit(self.items[index], again=again) if again else self.submit(self.items[index])
        ref = self.end(handle)
        self.attempts[index].append(ref)
        self.index_of[ref], self.handle_of[ref] = index, handle

    def handles(self) -> list:
        return list(self.handle_of.values())

    def next(self) -> tuple[int, object]:
        """(index, handle) of the next item whose attempt finished: `ray.wait` in steps of
        WAIT_STEP_S, telling the watch of each step that ends with nothing finished (a line
        every 30 s, Stalled after stall_timeout_s), looking for lost nodes (Session.check_nodes)
        and submitting their tasks again."""
        while True:
            # fetch_local=False: ready anywhere is enough (a result is fetched by _get); a wait
            # that fetched would call the raylet, and a dead raylet's caller is ended by Ray.
            done, _ = ray.wait(list(self.index_of), num_returns=1, timeout=WAIT_STEP_S, fetch_local=False)
            _session.check_raylet(self.watch)
            _session.check_nodes(self.watch, len(self), retry=self.retry)
            if done:
                index = self.index_of[done[0]]
                handle = self.handle_of[done[0]]
                for ref in self.attempts.pop(index):
                    del self.index_of[ref], self.handle_of[ref]
                del self.items[index]
                self.recovering.pop(index, None)
                return index, handle
            _session.check_head()
            self.watch.waiting(len(self))

    def _nodes(self, refs: list[ray.ObjectRef]) -> dict[ray.ObjectRef, str]:
        """ref -> the node its task was last seen running on (_record_node), where known."""
        from ray.experimental import internal_kv

        keys = {f"{self.job}/{ref.task_id().hex()}".encode(): ref for ref in refs}
        try:
            found = internal_kv.global_gcs_client.internal_kv_multi_get(list(keys), _WHERE, timeout=5)
        except Exception:  # noqa: BLE001: unknown, so submitted again: a duplicate costs one task
            return {}
        return {keys[key]: node.decode() for key, node in found.items() if node}

    def retry(self, lost: dict[str, str]) -> dict[str | None, int]:
        """Submit again each item whose latest attempt ran on a `lost` node (node id ->
        address) or was not seen running; start the stall count again (Ray works on a
        recovery). Returns how many per lost node (None: not seen running)."""
        latest = {index: refs[-1] for index, refs in self.attempts.items()}
        where = self._nodes(list(latest.values()))
        alive, when, counts = _session.nodes, time.strftime("%H:%M:%S"), {}
        for index, ref in latest.items():
            node = where.get(ref)
            if node in alive:
                continue
            self._attempt(index)
            counts[node if node in lost else None] = counts.get(node if node in lost else None, 0) + 1
            # one not seen running is waited for on account of the first node lost
            self.recovering[index] = (lost.get(node) or next(iter(lost.values())), when)
        self.watch.renew()
        return counts

    def describe(self) -> tuple[str, str]:
        """The cluster's state (Session.describe), and what the job waits for after a node's loss."""
        state, cause = _session.describe()
        waits: dict[str, list] = {}
        for address, when in self.recovering.values():
            waits.setdefault(address, []).append(when)
        for address, times in waits.items():
            state += (f"; waiting for node {address}'s {len(times)} task{'s' if len(times) != 1 else ''}, "
                      f"submitted again at {max(times)}")
        return state, cause

    def forget(self) -> None:
        """Drop the GCS's notes of where this job's tasks ran (_record_node), once the map
        has ended (a map that failed leaves them: a few small keys, not a wait on the head)."""
        from ray.experimental import internal_kv

        with contextlib.suppress(Exception):  # noqa: BLE001: a few stale keys at worst
            internal_kv.global_gcs_client.internal_kv_del(f"{self.job}/".encode(), True, _WHERE, timeout=5)


def _get(ref: ray.ObjectRef, watch: Watch):
    """The value of a finished task (`_wait` returned it: ready, and inlined in the reply
    unless large), fetched within the stall limit."""
    try:
        return ray.get(ref, timeout=_session.stall_s)
    except ray.exceptions.GetTimeoutError:
        raise Stalled(f"{watch.outstanding(1)}: a finished task's result could not be fetched in "
                      f"{_session.stall_s:g} s (stall_timeout_s)") from None


@contextlib.contextmanager
def _cluster_failures(watch: Watch) -> Iterator[None]:
    """Ray itself failing under the job (its node's raylet gone, the head unreachable, a
    result lost with its node past Ray's retries) as one ClusterError line; a task's own
    error (RayTaskError) goes on to the caller."""
    try:
        yield
    except ray.exceptions.RayTaskError:
        raise
    except ray.exceptions.RayError as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _session.check_raylet(watch)  # Ray's error for it (LocalRayletDiedError) told the job's way
        raise ClusterError(_failed_under(watch, f"{type(e).__name__}{': ' + text[:200] if text else ''}")) from None


def _failed_under(watch: Watch, what: str) -> str:
    """The line for Ray failing under the job during `watch`'s stage."""
    return (f"Ray failed under the job during {watch.what} ({watch.done} of {watch.total}{watch.unit} done): "
            f"{what}; the chunks already written are kept and reused by the next run")


# Names (and stamps) per listing block in Ray's object store: a decode task of an 8,192-image
# shard fetches one or two blocks of its class folder, ~1-2 MB, never the whole listing.
LISTING_BLOCK = 65536


# Listing tasks per CPU of the cluster: each lists a run of class folders, so that 2,000 folders
# cost a few tasks, not 2,000 (8.8 s of scan on 2 cores at 1,000 classes; benchmarks/many_classes).
LISTING_TASKS_PER_CPU = 4


def _listed_in_blocks(function: Callable, block_size: int, settings: StoreSettings, batch: Sequence[tuple]):
    """A listing task over a run of folders: for each, (its summary, how many blocks follow),
    then its files in blocks, each its own object."""
    _record_node()
    use_store(settings)
    for arguments in batch:
        summary, files = function(*arguments)
        blocks = files.blocks(block_size)
        yield summary, len(blocks)
        for block in blocks:  # not `yield from`: Ray's streaming generator would call the list's send()
            yield block


def map_listings(function: Callable, arguments: Sequence[tuple]) -> list[ClassListing]:
    """`function(*a)` for each argument tuple, a function that returns (ClassListing,
    ClassFiles): in runs of consecutive tuples, each run a Ray task (LISTING_TASKS_PER_CPU per
    CPU of the cluster), all at once, with a progress line as they finish. How
    the job lists class folders and prefixes (mnist37.sources.folder.FolderMap), on whichever nodes
    have a free CPU. Only the summaries come to the driver; the files stay in Ray's object
    store in blocks of LISTING_BLOCK, owned by the driver, which keeps their refs. A block lost
    with its node is listed again by Ray (lineage), as a lost task's result is recomputed."""
    from mnist37.progress import Progress

    task = ray.remote(num_cpus=1, num_returns="streaming", scheduling_strategy="SPREAD", **_RETRIES)(_listed_in_blocks)
    settings = store()
    tasks = min(len(arguments), LISTING_TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1))))
    starts = np.linspace(0, len(arguments), tasks + 1).round().astype(int).tolist() if arguments else [0]
    watch = watching("list", len(arguments), " class folders")
    with _cluster_failures(watch):
        flight = _InFlight(lambda b, again=0: task.options(**_again(again)).remote(function, LISTING_BLOCK, settings, b),
                           watch, end=lambda generator: generator.completed())
        progress = Progress("list", len(arguments), " class folders")
        listed: dict[int, ClassListing] = {}
        try:
            for index, (a, b) in enumerate(zip(starts, starts[1:])):
                flight.add(index, list(arguments[a:b]))
            while flight:
                i, generator = flight.next()
                refs = list(generator)  # the task has ended: every ref is there
                at, blocks = 0, []
                for k in range(starts[i], starts[i + 1]):  # (summary, blocks) refs, blocks refs, ...
                    (summary, count), at = _get(refs[at], watch), at + 1
                    summary.blocks, summary.block_size, at = refs[at:at + count], LISTING_BLOCK, at + count
                    listed[k] = summary
                    blocks.extend(summary.blocks)
                _copy_here(blocks, watch)
                watch.finished(starts[i + 1] - starts[i])
                progress.update(starts[i + 1] - starts[i])
            _session.check_nodes(watch, 0, force=True)
            flight.forget()
        except ray.exceptions.RayTaskError as e:
            _raise_cause(e, flight.handles())
    return [listed[i] for i in range(len(arguments))]


def _again(again: int) -> dict:
    """Ray options for a task's `again`-th attempt after a node's loss (none for the first).
    In the first task's scheduling class (function, resources, strategy) an attempt once
    waited 95 s with 1 of 1 CPUs free, most likely because Ray's driver asks for workers per
    class and for no more than the class has tasks queued, so a lease request it had sent to
    the lost node's raylet (which no reply ends before the connection's keepalive) held it. A
    class of its own per generation of attempts (the default strategy, and `again` bytes of
    memory, which every node has) got it a worker at once (benchmarks/host_loss)."""
    return {"scheduling_strategy": "DEFAULT", "memory": again} if again else {}


def _copy_here(refs: list[ray.ObjectRef], watch: Watch) -> None:
    """A copy of these objects in the object store of the driver's node, on a cluster the job
    joined: a listing's blocks, which every decode task of its folder reads, then outlive the
    worker node that listed them. Without it, a decode task submitted again after that node's
    loss blocks on fetching a block from it until Ray finds the connection dead (keepalive)
    and rebuilds the block (issue 36). The copy is not pinned: the head's store evicts it
    only when full. The job's own Ray has one node: nothing to copy."""
    left = refs if not _session.own else []
    while left:
        _, left = ray.wait(left, num_returns=len(left), timeout=WAIT_STEP_S, fetch_local=True)
        if left:
            _session.check_head()
            watch.waiting(len(left))


def _lost(ref: ray.ObjectRef) -> bool:
    """Whether the object's every copy was on a node lost under the job (the owner's record:
    this driver's, for the objects it owns), so that a task needing it would wait for Ray to
    rebuild it; never before a node was lost."""
    if not _session.lost:
        return False
    from ray.experimental import get_object_locations

    try:
        where = get_object_locations([ref], timeout_ms=5000).get(ref) or {}
    except Exception:  # noqa: BLE001: unknown: Ray rebuilds it if it must
        return False
    return not where.get("did_spill") and not set(where.get("node_ids") or ()) - _session.lost


# Chunk bytes ref -> a function that decodes its shard again and returns the new ref: a
# classify task submitted again after a node's loss gets its chunk made again on a node alive
# when its only copy was lost with the node (see _lost), rather than wait on Ray's keepalive.
_remakes: dict[ray.ObjectRef, Callable[[], ray.ObjectRef]] = {}


def default_max_in_flight() -> int:
    """Twice the cluster's CPUs: every core busy, the next task already queued."""
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def decode_shards(shards: Iterable[Shard], root: Path, chunk_dir: str, decoding: Decoding, train_split: str,
                  ship_split: str | None, max_in_flight: int,
                  archive: ArchiveObject | None = None) -> Iterator[DecodedShard]:
    """Decode every shard as a Ray task; pixel sums come back for `train_split` shards only.

    Shards of `ship_split` (the evaluation split, when chunks travel through the object
    store) come back with `chunk_ref`, the ref to the chunk's bytes."""
    shipped: dict[ray.ObjectRef, ray.ObjectRef] = {}  # record ref -> chunk bytes ref
    settings = store()

    def submit(shard: Shard, again: int = 0) -> ray.ObjectRef:
        args = (shard, str(root), str(chunk_dir), decoding, shard.split == train_split, archive, settings)
        if shard.split != ship_split:
            return _decode_task.options(**_again(again)).remote(*args)
        record, chunk = _decode_and_ship_task.options(**_again(again)).remote(*args)
        shipped[record] = chunk
        _remakes[chunk] = lambda: _decode_and_ship_task.options(**_again(1)).remote(*args)[1]
        return record

    def received(ref: ray.ObjectRef, done: DecodedShard) -> DecodedShard:
        done.chunk_ref = shipped.pop(ref, None)
        if done.discarded:
            # Logged here, not in the task: Ray folds workers' lines that differ only in numbers
            # (as chunk names do) into one, and may not forward them at all.
            log.warning("%s; decoded again", done.discarded)
        return done

    return bounded_map(submit, shards, max_in_flight, received, what=("decode", " shards"))


def classify_chunks(chunks: Sequence[DecodedShard], prototypes: np.ndarray, metrics: Sequence[str], device: str,
                    gpus_per_task: float, examples: int, max_in_flight: int,
                    verify: bool = True) -> Iterator[ClassifiedChunk]:
    """Classify every decoded chunk as a Ray task, read from its path or, when it travelled
    through the object store, from its bytes, and checked to be the chunk decode reported.
    The prototypes go to the object store once; on a cluster with GPUs each task asks for
    `gpus_per_task` of one (decode tasks never do)."""
    prototypes_ref, settings = ray.put(prototypes), store()
    gpus = gpus_per_task if has_gpus() and device != "cpu" else 0

    def submit(r: DecodedShard, again: int = 0) -> ray.ObjectRef:
        if again and r.chunk_ref is not None and r.chunk_ref in _remakes and _lost(r.chunk_ref):
            remake = _remakes.pop(r.chunk_ref)
            r.chunk_ref = remake()  # its shard decoded again on a node alive: the producing work
            _remakes[r.chunk_ref] = remake
        return _classify_task.options(num_gpus=gpus, **_again(again)).remote(
            r.chunk_path, r.chunk_ref or r.chunk_path, r.checksum, prototypes_ref, list(metrics), device, examples,
            verify, settings)

    try:
        yield from bounded_map(submit, chunks, max_in_flight, what=("classify", " chunks"))
    finally:
        _remakes.clear()


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def num_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def cluster_info() -> dict:
    """The Ray cluster's resources and nodes, for results.json."""
    return {
        "cluster_resources": ray.cluster_resources(),
        "nodes": [
            {"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"), "resources": n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive")
        ],
    }
