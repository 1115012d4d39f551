"""Before the job joins a Ray: the address it would join, checked and probed, every wait bounded.

`check_address` says at once when nothing listens where `ray.init()` would go (Ray itself
retries such an address for minutes); `probe` asks that GCS for its cluster's metadata
within PROBE_TIMEOUT_S and turns a refusal (authentication, another Ray or Python version, not
a GCS at all) into one ClusterError line. `mnist37.on_ray.session.connect` calls both.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
import time

import ray

from mnist37 import Mnist37Error

# The longest a wait on Ray blocks the main thread: a signal's handler runs between waits.
WAIT_STEP_S = 0.5


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

