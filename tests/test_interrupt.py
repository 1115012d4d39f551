"""Stopping the job (SIGINT as Ctrl-C sends it, SIGTERM as `ray job stop` and Kubernetes do)
at several moments: one line saying what was finished and kept, exit status 130 / 143, no
traceback and no stack dump, the job's own Ray gone, and a next run whose figures equal an
undisturbed run's, reusing what was finished.

The moments are found by watching the job itself (its log lines, its files), and where a
moment passes quickly the job is paused with SIGSTOP the instant it is seen, so the signal
lands there whatever the machine's speed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mnist37
from tests.conftest import PROJECT_ROOT, make_image_folder, session_processes

pytestmark = pytest.mark.ray  # the job, stopped by signals


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """28x28 images: 2 x 300 to train on, 2 x 150 to classify; shards of 10 make 60 + 30 tasks."""
    return make_image_folder(tmp_path_factory.mktemp("interrupt") / "data",
                             {"train": {"3": 300, "7": 300}, "valid": {"3": 150, "7": 150}}, shape=(28, 28))


@pytest.fixture(scope="module")
def undisturbed(ray_local, data, tmp_path_factory):
    """The job undisturbed, in this process on the session's Ray (mnist37.evaluate runs the
    job's main, as the command line does): what the signals' runs are held to."""
    out = tmp_path_factory.mktemp("undisturbed")
    return mnist37.evaluate(data, out=out, shard_size=10, chunk_dir=str(out / "chunks")).results


def start(data, out: Path) -> subprocess.Popen:
    """The job on a Ray of its own, which offers one CPU (as each suite process's share of the
    session's Ray does: tests/conftest.py, ray_cpus_each): it starts one worker process, not
    one per core (each imports torch, ~1-2 CPU-seconds); the moments are as many."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_OVERRIDE_RESOURCES": '{"CPU": 1}'}
    with open(out.parent / f"{out.name}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "jobs/evaluate.py", "--data", str(data), "--out", str(out),
                                 "--shard-size", "10", "--chunk-dir", str(out.parent / "chunks"),
                                 "--ray-address", "local"],
                                cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def log_of(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")


def wait_until(job: subprocess.Popen, seen, what: str, timeout_s: float = 120, poll_s: float = 0.01) -> None:
    """Until seen(), polled every `poll_s`: 10 ms for the moments that last seconds (decoding,
    classifying), 2 ms for those that pass quicker (a process of Ray appearing, the results
    being written). Each poll costs this process CPU while the job runs beside it."""
    deadline = time.monotonic() + timeout_s
    while not seen():
        assert job.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(poll_s)


def assert_stopped_cleanly(job: subprocess.Popen, out: Path, status: int, line: str) -> None:
    job.wait(timeout=120)
    log = log_of(out)
    assert job.returncode == status, log[-3000:]
    assert "Traceback" not in log and "SIGTERM received" not in log and "PC: @" not in log, log[-3000:]
    assert log.rstrip().splitlines()[-1].startswith(line), log[-1500:]
    assert not (out / "results.json").exists()
    assert not list(out.parent.glob("chunks/*/*.partial"))  # a killed task's temporary is never trusted
    deadline = time.monotonic() + 30
    while (left := [command[:80] for command in session_processes(job.pid).values()]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"the job's processes outlived it: {left}"


def assert_next_run_agrees(data, out: Path, undisturbed: dict) -> dict:
    """The next run over the stopped one's output and chunks (in this process, on the session's
    Ray, as `undisturbed`) gives the undisturbed run's figures."""
    results = mnist37.evaluate(data, out=out, shard_size=10, chunk_dir=str(out.parent / "chunks")).results
    assert results == json.loads((out / "results.json").read_text())
    for key in ("metrics", "counts", "files", "prototypes_sha256"):
        assert results[key] == undisturbed[key], key
    assert results["data"]["fingerprint"] == undisturbed["data"]["fingerprint"]
    return results


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stopped_while_decoding(signum, status, data, undisturbed, tmp_path):
    out = tmp_path / "out"
    job = start(data, out)
    chunks = tmp_path / "chunks"
    wait_until(job, lambda: len(list(chunks.glob("*/*.arrow"))) >= 2, "two chunks written")
    os.kill(job.pid, signal.SIGSTOP)  # decoding is under way: land the signal here
    os.kill(job.pid, signum)
    os.kill(job.pid, signal.SIGCONT)
    assert_stopped_cleanly(job, out, status, "interrupted: ")
    line = log_of(out).rstrip().splitlines()[-1]
    assert line.endswith("shards decoded; they are kept and reused by the next run") and " of 90 shards" in line
    kept = len(list(chunks.glob("*/*.arrow")))
    again = assert_next_run_agrees(data, out, undisturbed)
    assert kept >= 2 and again["shards"]["files_reused"] == 10 * kept  # every finished chunk was reused


def test_stopped_while_classifying(data, undisturbed, tmp_path):
    out = tmp_path / "out"
    job = start(data, out)
    wait_until(job, lambda: "classify: 1/" in log_of(out), "a classify line")
    os.kill(job.pid, signal.SIGSTOP)
    os.kill(job.pid, signal.SIGTERM)
    os.kill(job.pid, signal.SIGCONT)
    assert_stopped_cleanly(job, out, 143, "interrupted while classifying (")
    assert "all 90 shards decoded; they are kept and reused by the next run" in log_of(out)
    again = assert_next_run_agrees(data, out, undisturbed)
    assert again["shards"]["files_decoded"] == 0  # every shard came from the stopped run


def test_stopped_before_decoding(data, undisturbed, tmp_path):
    out = tmp_path / "out"
    job = start(data, out)
    # Ray is starting (the line before ray.init; a local Ray takes seconds), then it lists the
    # class folders: the job has decoded nothing.
    wait_until(job, lambda: "connecting to Ray" in log_of(out), "the line before ray.init")
    os.kill(job.pid, signal.SIGSTOP)
    os.kill(job.pid, signal.SIGINT)
    os.kill(job.pid, signal.SIGCONT)
    job.wait(timeout=120)
    if "decode: 1/" in log_of(out):
        pytest.fail("decoding began before the signal landed; the moment was missed")
    assert_stopped_cleanly(job, out, 130, "interrupted before decoding began")
    assert_next_run_agrees(data, out, undisturbed)


def test_stopped_while_writing_results(data, undisturbed, tmp_path):
    """The results are written last, results.json last of all: a job stopped while writing
    them leaves no results.json, and the next run writes them whole."""
    for attempt in range(3):  # the writing lasts milliseconds: catch it, or try again
        out = tmp_path / f"out{attempt}"
        job = start(data, out)
        wait_until(job, lambda: (out / "prototypes.npy").exists(), "the first output file", timeout_s=300, poll_s=0.002)
        os.kill(job.pid, signal.SIGSTOP)
        if not (out / "results.json").exists():
            break
        os.kill(job.pid, signal.SIGCONT)
        job.wait(timeout=120)
    else:
        pytest.fail("the results were written before the job could be paused, three times")
    os.kill(job.pid, signal.SIGTERM)
    os.kill(job.pid, signal.SIGCONT)
    assert_stopped_cleanly(job, out, 143, f"interrupted while writing results to {out}")
    assert_next_run_agrees(data, out, undisturbed)


def running(sid: int) -> dict[int, str]:
    """session_processes(sid) but those already ended (zombies, waiting for a parent to reap them)."""
    alive = {}
    for pid, command in session_processes(sid).items():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive[pid] = command
        except (OSError, IndexError):
            continue
    return alive


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line (as session_processes gives it) of every process below `pid`, found
    through /proc/<pid>/task/*/children: the job's own Ray as it starts (the GCS and the raylet
    are the job's children, the raylet's agents theirs). A fraction of a millisecond, where a
    scan of every process on the machine (session_processes) takes milliseconds: the wait for
    a moment polls every 2 ms and would otherwise keep a core busy while Ray starts."""
    found, below = {}, [pid]
    while below:
        parent = below.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(child) for child in children.read_text().split()]
            except (OSError, ValueError):
                continue
            for child in kids:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                below.append(child)
    return found


# Moments while `ray.init` starts the job's own Ray: the line just before it, and each of Ray's
# processes as it appears (the GCS first, then the raylet, then the raylet's agents).
RAY_STARTING = [(signal.SIGTERM, 143, "the line before ray.init"), (signal.SIGINT, 130, "gcs_server"),
                (signal.SIGTERM, 143, "raylet"), (signal.SIGTERM, 143, "ray::DashboardAgent"),
                (signal.SIGINT, 130, "ray::RuntimeEnvAgent")]


@pytest.mark.parametrize("signum, status, moment", RAY_STARTING, ids=[m for _, _, m in RAY_STARTING])
def test_stopped_while_ray_starts(signum, status, moment, data, tmp_path):
    """A signal while ray.init starts a local Ray (which puts its own SIGTERM handler in place,
    `sys.exit(15)`, and waits in C++ where Python runs no handler): 130 / 143 with the job's
    line, and every process of that Ray gone."""
    out = tmp_path / "out"
    job = start(data, out)
    if moment == "the line before ray.init":
        wait_until(job, lambda: "connecting to Ray" in log_of(out), moment, poll_s=0.002)
    else:
        wait_until(job, lambda: any(moment in command for command in descendants(job.pid).values()), moment,
                   poll_s=0.002)
    os.kill(job.pid, signum)
    job.wait(timeout=120)
    log = log_of(out)
    assert job.returncode == status, log[-3000:]
    assert "Traceback" not in log and "decode: " not in log, log[-3000:]
    assert log.rstrip().splitlines()[-1].startswith("interrupted before decoding began"), log[-1500:]
    deadline = time.monotonic() + 60
    while (left := [command[:80] for command in running(job.pid).values()]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"the job's Ray outlived it: {left}"
