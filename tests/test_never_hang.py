"""Never hang, never wait in silence (issue 23): every wait bounded and reporting, a store that
never answers as one line, Ray refusing the job as one line, the cluster named, a stop that
always stops, Ray's node dying as one line.

Real parts only: a loopback TCP server that accepts connections and never answers, the S3 test
server (moto) behind a fault proxy that holds some or all requests unanswered, `ray start` heads
of the test's own (stopped by their process ids, in their own temp dirs, so no
/tmp/ray/ray_current_cluster is left), and the job as a user runs it. Limits are made small
through the settings (stall_timeout_s, store_timeout_s); tests wait for events, never for time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mnist37.storage.locations import StoreMismatch, StoreSettings, open_location, use_store
from mnist37.progress import Stalled, Watch

from tests.conftest import PROJECT_ROOT, make_image_folder, session_processes, shared_ray_address
from tests.s3server import FaultProxy, aws_env, serving


# ---------------------------------------------------------------- the watch on a wait (clock patched)


class Clock:
    def __init__(self):
        self.now = 1000.0  # time.monotonic() counts from boot: any value will do

    def __call__(self) -> float:
        return self.now


def test_watch_reports_what_is_outstanding_then_stops(caplog):
    clock = Clock()
    watch = Watch("list", 4, " class folders", stall_s=90, report_s=30, clock=clock,
                  describe=lambda: ("the cluster at 127.0.0.1:6379 shows 0 of 2 CPUs free", "none is free"))
    clock.now += 29
    watch.waiting(4)
    assert not caplog.records
    clock.now += 1
    with caplog.at_level("WARNING"):
        watch.waiting(4)
    assert caplog.records[-1].getMessage() == ("list: 0/4 class folders done, 4 tasks pending for 30 s; "
                                               "the cluster at 127.0.0.1:6379 shows 0 of 2 CPUs free")
    clock.now += 60
    with pytest.raises(Stalled, match=r"^list: 0/4 class folders done, 4 tasks pending and none finished in 90 s "
                                      r"\(stall_timeout_s\); the cluster at 127.0.0.1:6379 shows 0 of 2 CPUs free: "
                                      r"none is free$"):
        watch.waiting(4)


def test_watch_never_stops_a_slow_job_that_moves():
    clock = Clock()
    watch = Watch("decode", 100, " shards", stall_s=10, report_s=5, clock=clock)
    for _ in range(100):  # each task takes 9 s, 900 s in all: far past the stall limit, never stalled
        clock.now += 9
        watch.waiting(2)
        watch.finished()
    assert watch.done == 100


# ---------------------------------------------------------------- store settings


def test_a_head_that_stops_accepting_connections_is_lost_within_the_limit():
    """HeadWatch on a real listening socket: never lost while it accepts; once it is closed,
    `on_lost` is called from the watching thread, after the limit and not long after it."""
    from mnist37.on_ray.session import HeadWatch

    server = socket.create_server(("127.0.0.1", 0))
    lost: list[float] = []
    watch = HeadWatch(f"127.0.0.1:{server.getsockname()[1]}", limit_s=1.0, on_lost=lost.append,
                      probe_every_s=0.05, probe_timeout_s=0.05)
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # a second of answered probes: never lost
            assert not watch.lost() and not lost, watch.silent_s()
            time.sleep(0.05)
        server.close()
        closed = time.monotonic()
        while not lost and time.monotonic() < closed + 10:
            time.sleep(0.01)
        assert lost and lost[0] >= 1.0 and watch.lost(), (lost, watch.silent_s())
        assert 1.0 <= time.monotonic() - closed < 5
    finally:
        watch.stopped.set()
        server.close()


def test_store_settings_come_from_the_environment():
    env = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-3",
           "AWS_S3_ADDRESSING_STYLE": "virtual", "AWS_SECRET_ACCESS_KEY": "secret"}
    settings = StoreSettings.from_environment(7.0, env)
    assert settings == StoreSettings("http://minio:9000", "eu-west-3", True, 7.0)
    assert "secret" not in repr(settings)  # credentials stay on each node
    assert StoreSettings.from_environment(environ={"AWS_ENDPOINT_URL_S3": "http://a:1",
                                                   "AWS_ENDPOINT_URL": "http://b:2"}).endpoint == "http://a:1"


def test_a_task_whose_node_names_another_endpoint_stops_the_job(monkeypatch):
    """The driver reached AWS itself (no endpoint); a task's node sets AWS_ENDPOINT_URL, which
    the AWS SDK would read: the task stops with one line naming both."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    try:
        use_store(StoreSettings(endpoint=None, region="us-east-1"))  # as a task receives it
        with pytest.raises(StoreMismatch, match=r"object store settings differ: the driver reached s3://b at AWS's "
                                                r"own endpoint \(no AWS_ENDPOINT_URL\), but this task on .* would use "
                                                r"endpoint http://127.0.0.1:9 \(its own AWS_ENDPOINT_URL\)"):
            open_location("s3://b/data")
        use_store(StoreSettings(endpoint="http://127.0.0.1:8", region="us-east-1"))  # the driver's endpoint wins
        assert open_location("s3://b/data")[1] == "b/data"
    finally:
        use_store(None)


# ---------------------------------------------------------------- real parts


class Silent:
    """A loopback TCP server that accepts every connection and never answers (a black-holed
    proxy, a wrong endpoint behind a firewall); counts the connections it accepted."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.accepted, self.held, self.stopping = 0, [], False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopping:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.held.append(connection)
            self.accepted += 1

    def stop(self):
        self.stopping = True
        self.socket.close()
        for c in self.held:
            c.close()


@pytest.fixture
def silent():
    server = Silent()
    yield server
    server.stop()


def start_job(*argv: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """jobs/evaluate.py in its own session, its output (stdout and stderr) to `log`."""
    env = env if env is not None else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "wb") as out:
        job = subprocess.Popen([sys.executable, "jobs/evaluate.py", *argv], cwd=PROJECT_ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    job.started = time.monotonic()
    return job


def wait_for(seen, what: str, job: subprocess.Popen | None = None, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not seen():
        assert job is None or job.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def finish(job: subprocess.Popen, log: Path, timeout_s: float) -> tuple[int, list[str], float]:
    """(exit status, the job's lines, seconds it took to exit from now)."""
    clock = time.monotonic()
    try:
        job.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        pytest.fail(f"the job did not exit within {timeout_s} s: {log.read_text(errors='replace')[-2000:]}")
    finally:  # the log of Ray's lines a refused connection leaves, which its error line names
        import tempfile
        Path(tempfile.gettempdir(), f"mnist37-ray-connect-{job.pid}.log").unlink(missing_ok=True)
    now, lines = time.monotonic(), log.read_text(errors="replace").splitlines()
    said = [line for line in lines if line.startswith(("error:", "interrupted"))]
    print(f"\n{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}: exit {job.returncode}, "
          f"{now - job.started:.1f} s after it started, {now - clock:.1f} s after this wait began: {said}")
    return job.returncode, lines, now - clock


def stop_with(job: subprocess.Popen, log: Path, signum: int = signal.SIGTERM) -> tuple[int, list[str], float]:
    os.kill(job.pid, signum)
    return finish(job, log, timeout_s=60)


def user_lines(lines: list[str]) -> list[str]:
    """The lines a user reads as the job's outcome: not its timestamped log lines."""
    return [line for line in lines if not line[:4].isdigit()]


def outcome(lines: list[str]) -> list[str]:
    """The job's own last word: its error or interrupted lines (Ray's autoscaler may print too)."""
    assert not any("Traceback" in line for line in lines), lines
    return [line for line in lines if line.startswith(("error:", "interrupted"))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("never-hang") / "data",
                             {"train": {"3": 20, "7": 20}, "valid": {"3": 8, "7": 8}})


# ---------------------------------------------------------------- a store that never answers


def store_env(endpoint: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    return {**env, **aws_env(endpoint), **extra}


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_a_store_that_never_answers_is_one_line_within_the_limit(silent, tmp_path):
    log = tmp_path / "job.log"
    clock = time.monotonic()
    job = start_job("--data", "s3://images/sample", "--out", str(tmp_path / "out"), "--store-timeout-s", "0.5",
                    log=log, env=store_env(f"http://{silent.address}"))
    status, lines, _ = finish(job, log, timeout_s=60)
    assert status == 1 and time.monotonic() - clock < 30, lines
    assert lines == [f"error: s3://images/sample: no answer from endpoint http://{silent.address} in 0.5 s after "
                     "3 attempts (store_timeout_s)"]
    assert silent.accepted >= 3


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_sigterm_while_reading_a_stalled_store(silent, tmp_path):
    log = tmp_path / "job.log"
    job = start_job("--data", "s3://images/sample", "--out", str(tmp_path / "out"), log=log,
                    env=store_env(f"http://{silent.address}"))
    wait_for(lambda: silent.accepted >= 1, "a request to the store", job)
    status, lines, seconds = stop_with(job, log)
    assert (status, user_lines(lines)) == (143, ["interrupted before decoding began (while finding and listing the "
                                                 "data); nothing to keep"]), lines
    assert seconds < 5


@pytest.fixture(scope="module")
def s3():
    with serving("images") as server:
        yield server


@pytest.fixture(scope="module")
def stored(s3, tiny):
    s3.upload(tiny, "images", "tiny")
    return "s3://images/tiny"


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_a_store_that_holds_some_requests_unanswered_still_finishes(s3, stored, tmp_path):
    """Every 20th request is held and never answered, once per request (its next try is
    answered): pyarrow gives up on it after store_timeout_s and asks again, and the job
    finishes with every image. (2 s: a loopback moto behind a Python proxy can be slower than
    1 s to answer on a busy machine; each held request costs its stage that long.) Holding
    every n-th request whatever it is would now and then hold all of one request's tries: a
    store down for that object, which the next test covers (one line, exit 1). The job joins
    the session's Ray (the store is the point, not the job's own Ray), whose tasks read the
    store through the driver's settings: MNIST37_OBJECT_REQUESTS bounds the driver's reads."""
    proxy = FaultProxy(s3.endpoint, slow_every=0, drop_every=0, hold_every=20, hold_once=True)
    try:
        log = tmp_path / "job.log"
        job = start_job("--data", stored, "--out", str(tmp_path / "out"), "--store-timeout-s", "2",
                        "--ray-address", shared_ray_address(), log=log,
                        env=store_env(proxy.endpoint, MNIST37_OBJECT_REQUESTS="8"))
        status, lines, _ = finish(job, log, timeout_s=300)
    finally:
        proxy.stop()
    assert status == 0, lines[-20:]
    assert proxy.counts["held"] >= 1
    assert "56 image files = 56 used + 0 rejected" in "\n".join(lines)


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_a_store_that_holds_every_request_is_one_line(s3, stored, tmp_path):
    proxy = FaultProxy(s3.endpoint, slow_every=0, drop_every=0, hold_every=1)
    try:
        log = tmp_path / "job.log"
        job = start_job("--data", stored, "--out", str(tmp_path / "out"), "--store-timeout-s", "0.5", log=log,
                        env=store_env(proxy.endpoint))
        status, lines, _ = finish(job, log, timeout_s=60)
    finally:
        proxy.stop()
    assert (status, lines) == (1, [f"error: {stored}: no answer from endpoint {proxy.endpoint} in 0.5 s after 3 "
                                   "attempts (store_timeout_s)"])


# ---------------------------------------------------------------- Ray heads of the tests' own


def ray_head(log: Path, env: dict, num_cpus: int = 2):
    """`ray start --head --block` on loopback in its own temp dir (so no
    /tmp/ray/ray_current_cluster is left behind) with `env`; yields its address; stopped by
    its process id (and its process group, whatever is left), never by `ray stop`."""
    from tests.ray_heads import running_cluster

    return running_cluster(log, num_cpus=num_cpus, env=env, node_ip_address="127.0.0.1")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.fixture(scope="module")
def no_cpu_head(tmp_path_factory):
    """A token-auth head (this session's token) that advertises no CPU: the job's tasks are
    never scheduled there, as on a cluster whose CPUs other work holds."""
    log = tmp_path_factory.mktemp("heads") / "no-cpu.log"
    with ray_head(log, {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, num_cpus=0) as address:
        yield address


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_a_wrong_token_is_one_line(no_cpu_head, tiny, tmp_path):
    log, token = tmp_path / "job.log", "0" * 64
    clock = time.monotonic()
    job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", no_cpu_head, log=log,
                    env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(tmp_path)))
    status, lines, _ = finish(job, log, timeout_s=60)
    assert status == 1 and time.monotonic() - clock < 15, lines
    assert user_lines(lines) == [
        f"error: ray_address: the Ray cluster at {no_cpu_head} refused this job's authentication: it requires a token "
        "(RAY_AUTH_MODE=token) and this job's RAY_AUTH_MODE is token, with a token from RAY_AUTH_TOKEN; give the job "
        "the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"], lines
    assert token not in log.read_text() and "gcs_client" not in log.read_text()


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_auth_disabled_job_against_a_token_head_is_one_line(no_cpu_head, tiny, tmp_path):
    log = tmp_path / "job.log"
    job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", no_cpu_head, log=log,
                    env=clean_env(RAY_AUTH_MODE="disabled", HOME=str(tmp_path)))
    status, lines, seconds = finish(job, log, timeout_s=60)
    assert status == 1 and user_lines(lines) == [
        f"error: ray_address: the Ray cluster at {no_cpu_head} refused this job's authentication: it requires a token "
        "(RAY_AUTH_MODE=token) and this job's RAY_AUTH_MODE is disabled, so it sends no token; give the job the "
        "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"], lines


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_another_ray_version_is_one_line(no_cpu_head, tiny, tmp_path):
    """The head's cluster metadata (what ray.init compares) says another Ray and Python: the
    job stops with one line naming both, before ray.init. The metadata is put back after."""
    import json

    from ray._raylet import GcsClient

    client = GcsClient(address=no_cpu_head)
    saved = client.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster")
    other = {**json.loads(saved), "ray_version": "2.59.0", "python_version": "3.10.14"}
    client.internal_kv_put(b"CLUSTER_METADATA", json.dumps(other).encode(), True, namespace=b"cluster")
    try:
        log = tmp_path / "job.log"
        job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", no_cpu_head, log=log)
        status, lines, _ = finish(job, log, timeout_s=60)
    finally:
        client.internal_kv_put(b"CLUSTER_METADATA", saved, True, namespace=b"cluster")
    import platform

    import ray
    ours = ".".join(platform.python_version().split(".")[:2])
    assert (status, user_lines(lines)) == (1, [
        f"error: ray_address: the Ray cluster at {no_cpu_head} runs Ray 2.59.0 on Python 3.10, this job Ray "
        f"{ray.__version__} on Python {ours}: they must match"]), lines


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_an_address_that_is_not_a_ray_gcs_is_one_line(silent, tiny, tmp_path):
    log = tmp_path / "job.log"
    clock = time.monotonic()
    job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", silent.address, log=log)
    status, lines, _ = finish(job, log, timeout_s=60)
    assert status == 1 and time.monotonic() - clock < 15, lines
    (line,) = user_lines(lines)
    assert line.startswith(f"error: ray_address: nothing at {silent.address} answered as a Ray GCS in 10 s "
                           "(is it a Ray head's GCS port, 6379 by default?)"), lines


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_sigterm_while_connecting(silent, tiny, tmp_path):
    log = tmp_path / "job.log"
    job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", silent.address, log=log)
    wait_for(lambda: silent.accepted >= 2, "the job's connection to the address", job)  # the check, then the probe
    status, lines, seconds = stop_with(job, log)
    assert (status, user_lines(lines)[-1:]) == (143, ["interrupted before decoding began (while finding and listing "
                                                      "the data); nothing to keep"]), lines
    assert seconds < 5


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_a_cluster_that_schedules_nothing_is_named_then_stops(no_cpu_head, tiny, tmp_path):
    """Its tasks are never scheduled: lines say what is outstanding, then one error names the
    cause and --ray-address local."""
    log = tmp_path / "job.log"
    job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", no_cpu_head,
                    "--stall-timeout-s", "6", log=log)
    status, lines, _ = finish(job, log, timeout_s=120)
    text = "\n".join(lines)
    assert status == 1, text
    assert f"Ray: {no_cpu_head} (--ray-address): 1 node, 0 CPUs, 0 GPUs" in text
    assert f"list: 0/4 class folders done, 4 tasks pending for 2 s; the cluster at {no_cpu_head} shows 0 of 0 " \
           "CPUs free" in text
    assert outcome(lines) == [
        f"error: list: 0/4 class folders done, 4 tasks pending and none finished in 6 s (stall_timeout_s); the "
        f"cluster at {no_cpu_head} shows 0 of 0 CPUs free: it has no CPUs for tasks; this job joined a cluster it "
        "did not start (--ray-address): --ray-address local runs it on a Ray of its own"], text


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_sigterm_while_waiting_on_tasks(no_cpu_head, tiny, tmp_path):
    log = tmp_path / "job.log"
    job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", no_cpu_head,
                    "--stall-timeout-s", "12", log=log)
    # Its first line about what is outstanding (after a third of the stall limit, 4 s; 8 s before
    # the limit would stop it): the job is waiting inside ray.wait.
    wait_for(lambda: "tasks pending for" in log.read_text(errors="replace"), "a line saying what is pending", job)
    status, lines, seconds = stop_with(job, log)
    assert (status, outcome(lines)) == (143, ["interrupted before decoding began (while finding and listing "
                                                      "the data); nothing to keep"]), lines
    assert seconds < 5


@pytest.fixture(scope="module")
def open_head(tmp_path_factory):
    """A head someone left running with authentication off (RAY_AUTH_MODE=disabled), started
    with no object-store endpoint in its environment: only credentials, as on a node that
    takes them from its own environment."""
    home = tmp_path_factory.mktemp("open-head-home")
    env = clean_env(RAY_AUTH_MODE="disabled", HOME=str(home),
                    **{k: v for k, v in aws_env("http://127.0.0.1:9").items() if k != "AWS_ENDPOINT_URL"})
    with ray_head(home / "head.log", env, num_cpus=1) as address:  # one CPU: a job starts one worker there
        yield address


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_a_job_in_a_clean_environment_on_an_auth_disabled_head_does_not_hang(open_head, tiny, tmp_path):
    log = tmp_path / "job.log"
    job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", open_head, log=log,
                    env=clean_env(HOME=str(tmp_path)))
    status, lines, _ = finish(job, log, timeout_s=240)
    assert status == 0, lines[-10:]  # it runs there
    assert f"Ray: {open_head} (--ray-address): 1 node, 1 CPUs, 0 GPUs" in "\n".join(lines)


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_the_store_settings_travel_with_the_job(open_head, s3, stored, tiny, tmp_path):
    """The endpoint only where the job starts: its tasks, on a head whose environment names
    none, read the same store (without the record they would look for the bucket on AWS)."""
    log = tmp_path / "job.log"
    job = start_job("--data", stored, "--out", str(tmp_path / "out"), "--ray-address", open_head, log=log,
                    env=store_env(s3.endpoint, RAY_AUTH_MODE="disabled", HOME=str(tmp_path)))
    status, lines, _ = finish(job, log, timeout_s=240)
    assert status == 0, lines[-10:]
    assert "56 image files = 56 used + 0 rejected" in "\n".join(lines)


# ---------------------------------------------------------------- Ray's node dying under the job


def in_session(sid: int, name: str = "") -> list[int]:
    """Process ids in the job's session (its own local Ray's among them) whose command line holds `name`."""
    return [pid for pid, command in session_processes(sid).items() if name in command]


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_a_local_ray_that_does_not_start_within_the_limit_is_one_line(tiny, tmp_path):
    """The job's own Ray not started within the stall limit (0.2 s here: Ray takes seconds,
    as a Ray that never comes up would take forever): one line, exit 1, and nothing of that
    Ray left running."""
    log = tmp_path / "job.log"
    job = start_job("--data", str(tiny), "--out", str(tmp_path / "out"), "--ray-address", "local",
                    "--stall-timeout-s", "0.2", log=log)
    status, lines, seconds = finish(job, log, timeout_s=60)
    assert status == 1, lines[-10:]
    (line,) = outcome(lines)
    assert line.startswith("error: a local Ray of the job's own: Ray did not start within 0.2 s (stall_timeout_s); "
                           "Ray's logs: "), line
    deadline = time.monotonic() + 10  # killed, or ending as their raylet went
    while (left := running(in_session(job.pid))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def running(pids: list[int]) -> list[int]:
    """Those of `pids` that run still (not ended, not a zombie waiting to be reaped)."""
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except (OSError, IndexError):
            continue
    return alive


@pytest.mark.ray  # the job as a process, Ray or a store server started
def test_the_raylet_killed_under_a_running_job_is_one_line(tmp_path):
    """The job's own Ray loses its raylet mid-decode: one error line, exit 1; the chunks
    already written are reused by the next run, whose figures are exact."""
    from tests.test_evaluate_job import run_job

    data = make_image_folder(tmp_path / "data", {"train": {"3": 60, "7": 60}, "valid": {"3": 20, "7": 20}})
    chunks, log = tmp_path / "chunks", tmp_path / "job.log"
    # Its Ray offers one CPU (one worker process, as each suite process's share of the session's Ray).
    job = start_job("--data", str(data), "--out", str(tmp_path / "out"), "--shard-size", "4", "--chunk-dir",
                    str(chunks), "--ray-address", "local", log=log,
                    env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                         "RAY_OVERRIDE_RESOURCES": '{"CPU": 1}'})
    try:
        wait_for(lambda: "decode: 1/" in log.read_text(errors="replace"), "decoding", job)
        os.kill(job.pid, signal.SIGSTOP)  # decoding is under way: kill the raylet here
        (raylet,) = in_session(job.pid, "raylet")
        os.kill(raylet, signal.SIGKILL)
        os.kill(job.pid, signal.SIGCONT)
        status, lines, _ = finish(job, log, timeout_s=120)
        left = running(in_session(job.pid, "gcs_server"))  # the job stopped its Ray's other processes
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # whatever of the job's own Ray is left
        # A worker orphaned by its raylet may finish the chunk it was writing: count the chunks
        # once nothing of that Ray runs any more (a full run saw one more chunk reused than counted).
        deadline = time.monotonic() + 30
        while (orphans := running(in_session(job.pid))) and time.monotonic() < deadline:
            for pid in orphans:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
    assert status == 1, lines[-10:]
    (line,) = outcome(lines)
    # decode, as a rule; classify where the last of the 30 tiny decode tasks ended before the SIGSTOP landed
    assert line.startswith(("error: Ray failed under the job during decode (",
                            "error: Ray failed under the job during classify (")), line
    assert f"the raylet of the job's own Ray (pid {raylet}) ended (killed by signal 9)" in line
    assert not left
    assert line.endswith("the chunks already written are kept and reused by the next run")
    kept = len(list(chunks.glob("*/*.arrow")))
    assert kept >= 1  # decoding had begun
    again = run_job("--data", str(data), "--out", str(tmp_path / "again"), "--shard-size", "4",
                    "--chunk-dir", str(chunks))
    assert again.returncode == 0, again.stderr[-2000:]
    import json
    results = json.loads((tmp_path / "again" / "results.json").read_text())
    assert results["shards"]["files_reused"] == 4 * kept and sum(results["counts"]["train"].values()) == 120
