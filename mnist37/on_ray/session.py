"""The Ray the job runs on: joining or starting it, watching its head and raylet, leaving it.

`connect` joins a cluster (its address checked and probed first: mnist37.on_ray.probe) or
starts a Ray of the job's own, and returns the `Session`, which the scheduling's waits ask
about lost nodes, a silent head (`HeadWatch`, a thread that never calls into Ray) and a
raylet that ended. `join_this_process` takes a Ray the caller already runs; `disconnect`
leaves, stopping a Ray the job started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from mnist37.on_ray.probe import _STARTED_HERE, ClusterError, _target, check_address, probe
from mnist37.processes import children_running, stop_descendants, stopped_by_signals
from mnist37.progress import REPORT_EVERY_S, Watch

log = logging.getLogger(__name__)

# How often a wait that finds nothing finished looks for nodes lost (Session.check_nodes).
NODES_EVERY_S = 1.0


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


def current() -> Session:
    """The session the job runs on (`connect`, `join_this_process`); a blank one before."""
    return _session


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


def _failed_under(watch: Watch, what: str) -> str:
    """The line for Ray failing under the job during `watch`'s stage."""
    return (f"Ray failed under the job during {watch.what} ({watch.done} of {watch.total}{watch.unit} done): "
            f"{what}; the chunks already written are kept and reused by the next run")


def cluster_cpus() -> int:
    """The CPUs of the Ray this process joined (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def default_max_in_flight() -> int:
    """Twice the cluster's CPUs: every core busy, the next task already queued."""
    return max(2, 2 * cluster_cpus())


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
