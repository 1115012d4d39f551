"""Where users run the job: `ray job submit` to a real head on loopback, a 3-node cluster,
a node removed and a worker killed mid-job, and GPU requests on a cluster advertising GPUs.

Every cluster here is started by the test with its own ports and temp dir, and stopped by it;
`ray stop` (which stops every Ray process on the machine) is never used.

The module is bound by CPU: each job starts a worker process on every node (one that
classifies imports torch, ~2 CPU-seconds). So there is one cluster besides the session's Ray,
whose head also serves `ray job submit`; tests that check different things of runs with
compatible flags share one run (the module fixtures `submitted`, `stored_out` and `watched`); no node
advertises GPUs until the GPU tests at the end (three_nodes_cluster); and the images are few,
in shards of as few images as give each test the shards it needs (docs/testing.md).
"""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, make_image_folder, ray_start_session, session_processes, shared_ray_address
from tests.ray_heads import free_port  # noqa: F401 - tests/test_install_cluster.py imports it from here
from tests.test_evaluate_job import run_job

pytestmark = pytest.mark.ray  # real Ray clusters

RAY = str(Path(sys.executable).with_name("ray"))
# Node deaths are noticed in ~2 s instead of ~30 s.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                      "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}


def env(**extra) -> dict:
    """The test session's environment (its Ray token included: tests/conftest.py) for a process."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def stop_group(process: subprocess.Popen, timeout: float = 60) -> None:
    """End a process started in its own session and everything it started. SIGTERM goes to the
    leader alone (`ray start --block` then stops its node in ~2 s; a SIGTERM to the whole group
    made it wait 33 s), then SIGKILL to whatever of the group is left. Teardown calls it whether
    the test passed or failed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


SHARD_SIZE = 25  # 12 + 3 shards of `data`: some for every node of three
SMALL_SHARDS = 5  # 60 + 15 shards: many left when a node or a worker is lost early


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """28x28 images: 2 x 150 to train on, 2 x 36 to classify (few: the store test uploads them
    one request each)."""
    return make_image_folder(tmp_path_factory.mktemp("cluster") / "data",
                             {"train": {"3": 150, "7": 150}, "valid": {"3": 36, "7": 36}}, shape=(28, 28))


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """The same job on a plain single-node local Ray: what every other run must equal."""
    out = tmp_path_factory.mktemp("baseline")
    run = run_job("--data", str(data), "--out", str(out), "--shard-size", str(SHARD_SIZE),
                  "--chunk-dir", str(out / "chunks"))
    assert run.returncode == 0, run.stderr
    return json.loads((out / "results.json").read_text())


def same_results(results, baseline):
    for key in ("metrics", "counts", "files", "rejected", "prototypes_sha256", "classes", "image_shape"):
        assert results[key] == baseline[key], key
    assert results["data"]["fingerprint"] == baseline["data"]["fingerprint"]


# ---------------------------------------------------------------- the cluster


class MultiNode:
    """tests/multinode.py in a subprocess: head + N worker nodes, 1 CPU each, the head's
    dashboard on loopback with `dashboard`; `extra_env` reaches every node's tasks (AWS
    variables, for data in an object store)."""

    def __init__(self, workers: int, gpus: float = 0, dashboard: bool = False, **extra_env: str):
        self.removed: list[int] = []  # the workers removed so far
        command = [sys.executable, "tests/multinode.py", str(workers), str(gpus), *(["dashboard"] if dashboard else [])]
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env(**FAST_HEALTH_CHECKS, **extra_env), text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        try:
            self.info = json.loads(self.process.stdout.readline())
        except ValueError:
            stop_group(self.process)
            raise AssertionError("tests/multinode.py did not start its cluster") from None

    def remove(self, index: int) -> set[str]:
        """Kill worker `index`; return once the cluster reports it dead, with the live node ids."""
        self.removed.append(index)
        self.process.stdin.write(f"remove {index}\n")
        self.process.stdin.flush()
        word, _, alive = self.process.stdout.readline().partition(" ")
        assert word == "removed", word
        return set(json.loads(alive))

    def add(self, gpus: float) -> str:
        """Start one more worker node, of 1 CPU advertising `gpus` GPUs; return its node id."""
        self.process.stdin.write(f"add {gpus}\n")
        self.process.stdin.flush()
        word, _, node_id = self.process.stdout.readline().strip().partition(" ")
        assert word == "added", word
        return node_id

    def close(self) -> None:
        try:
            self.process.communicate("quit\n", timeout=120)
        finally:
            stop_group(self.process)


@pytest.fixture(scope="module")
def three_nodes_cluster():
    """One 3-node cluster for the module (~10 s a start here). Its head serves Ray's dashboard
    and job API on loopback, for `ray job submit` (not a head of the submit tests' own). The
    nodes hold the S3 test server's credentials, not its endpoint, as a cluster's nodes would:
    a job over the store brings the endpoint in its driver's environment. The node-removal test
    removes worker 0; the GPU tests after it add a node advertising GPUs. No node advertises
    GPUs before that: where one does, every job's classify tasks ask for a quarter of one (the
    default), and Ray runs them in worker processes of their own (a worker that was given a GPU
    runs no task that asks for none, nor the other way round), started besides the decode
    tasks' on every node (~1 CPU-second each)."""
    from tests.s3server import aws_credentials

    cluster = MultiNode(2, dashboard=True, **aws_credentials())
    yield cluster
    cluster.close()


def whole(cluster: MultiNode) -> MultiNode:
    assert not cluster.removed, "a node was removed before this test: the removal test must run last"
    return cluster


@pytest.fixture
def three_nodes(three_nodes_cluster):
    """The module's cluster with its three nodes, for a test that leaves it as it found it."""
    return whole(three_nodes_cluster)


def job_args(cluster, data, out, *extra, shard_size=SHARD_SIZE) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--ray-address", cluster.info["address"],
            "--shard-size", str(shard_size), "--chunk-dir", str(out / "chunks"), *extra]


def job_on(cluster, data, out, *extra, shard_size=SHARD_SIZE):
    return run_job(*job_args(cluster, data, out, *extra, shard_size=shard_size))


def start_job(cluster, data, out, *extra, shard_size=SHARD_SIZE) -> subprocess.Popen:
    """The job as a process of its own session, for a test that signals it while it runs; its
    output goes to `out`/job.log (a pipe nobody reads while it runs could fill and stall it)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job.log", "wb") as log:
        return subprocess.Popen([sys.executable, "jobs/evaluate.py", *job_args(cluster, data, out, *extra,
                                                                                shard_size=shard_size)],
                                cwd=PROJECT_ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def per_node(results, key):
    counts = {}
    for shard in results["shards"]["per_shard"]:
        if shard.get(key):
            counts[shard[key]] = counts.get(shard[key], 0) + 1
    return counts


def ray_workers(session: int) -> dict[int, str]:
    """pid -> title of the Ray worker processes (`ray::...`) in session `session`: a Ray
    started by the tests is a session of its own (`start_new_session`)."""
    return {pid: command for pid, command in session_processes(session).items() if command.startswith("ray::")}


# ---------------------------------------------------------------- ray job submit


def wait_for(client, job_id, timeout=300):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.5)
    return status


@pytest.fixture(scope="module")
def client(three_nodes_cluster):
    """A JobSubmissionClient of the cluster's head, once its job API answers."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            return JobSubmissionClient(three_nodes_cluster.info["dashboard"])
        except Exception:  # noqa: BLE001 - not up yet
            assert three_nodes_cluster.process.poll() is None and time.monotonic() < deadline, \
                "the head's job API did not come up"
            time.sleep(0.5)


def submit(cluster, *job: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`ray job submit` with the project's runtime env, as README shows it."""
    return subprocess.run(
        [RAY, "job", "submit", "--address", cluster.info["dashboard"], "--runtime-env", "configs/runtime_env.yaml",
         "--", "python", "jobs/evaluate.py", *job],
        cwd=PROJECT_ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted(three_nodes_cluster, client, data, tmp_path_factory):
    """README's `ray job submit` on the 3-node cluster, once, with a local --out and chunk dir
    and no other flag: (the finished `ray job submit`, its folder). The submit test checks the
    submission; the predictions test, its predictions written through the driver. (Not the
    work-sharing test's job: a submitted job's workers start only once their node has set up
    the job's working dir, and in one run of ten here a node decoded no shard of it.)"""
    out = tmp_path_factory.mktemp("submitted")
    clock = time.perf_counter()
    run = submit(whole(three_nodes_cluster), "--data", str(data), "--out", str(out / "out"),
                 "--shard-size", str(SHARD_SIZE), "--chunk-dir", str(out / "chunks"))
    print(f"ray job submit: {time.perf_counter() - clock:.1f} s")
    return run, out


def test_ray_job_submit_as_the_readme_shows(submitted, client, baseline):
    run, out = submitted
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "succeeded" in run.stdout
    results = json.loads((out / "out" / "results.json").read_text())
    same_results(results, baseline)
    assert results["elapsed_s"]["ray_init"] < 2  # joined the running cluster: no new Ray started
    jobs = [j for j in client.list_jobs() if j.entrypoint.endswith("--chunk-dir " + str(out / "chunks"))]
    assert len(jobs) == 1 and "mean of classes" in client.get_job_logs(jobs[0].submission_id)


def test_a_failing_job_fails_submit_with_its_error_in_the_logs(three_nodes, client, tmp_path):
    """`ray job submit` exits non-zero; JobSubmissionClient, which scripts should ask
    (docs/cluster.md), says FAILED, and the job's logs hold its one-line error."""
    from ray.job_submission import JobStatus

    missing = tmp_path / "nowhere.tgz"
    run = submit(three_nodes, "--data", str(missing), "--out", str(tmp_path / "out"))
    assert run.returncode != 0
    jobs = [j for j in client.list_jobs() if j.entrypoint.endswith(f"--data {missing} --out {tmp_path / 'out'}")]
    assert len(jobs) == 1
    assert wait_for(client, jobs[0].submission_id) == JobStatus.FAILED
    logs = client.get_job_logs(jobs[0].submission_id)
    assert f"error: data: {missing} does not exist" in logs and "Traceback" not in logs


# ---------------------------------------------------------------- multi-node


@dataclasses.dataclass
class StoredOut:
    """A job on the 3-node cluster whose --out is an object-store prefix in the S3 test server."""
    run: subprocess.CompletedProcess
    results: dict | None  # results.json, read from the store
    predictions: object  # pyarrow Table of its predictions files, read from the store
    keys: list[str]  # its predictions files' keys


@pytest.fixture(scope="module")
def stored_out(three_nodes_cluster, data, tmp_path_factory):
    """The 3-node job with default flags, its data on disk and its --out an object-store prefix
    (each node's classify tasks write their predictions files there), read back before the S3
    test server stops: the work-sharing test's job and the predictions test's second one."""
    import mnist37
    from tests.s3server import serving

    cluster, tmp = whole(three_nodes_cluster), tmp_path_factory.mktemp("stored-out")
    with serving("mnist37-predictions") as s3:  # this process's AWS variables, the endpoint too, for the driver
        run = run_job("--data", str(data), "--out", "s3://mnist37-predictions/run", "--ray-address",
                      cluster.info["address"], "--shard-size", str(SHARD_SIZE), "--chunk-dir", str(tmp / "chunks"))
        if run.returncode != 0:
            return StoredOut(run, None, None, [])
        stored = mnist37.load("s3://mnist37-predictions/run")
        keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket="mnist37-predictions",
                                                                      Prefix="run/predictions/")["Contents"])
        return StoredOut(run, stored.results, stored.predictions, keys)


def test_three_nodes_share_the_work_and_agree_with_one(stored_out, three_nodes_cluster, baseline):
    """The 3-node job with default flags (stored_out's: where its --out is does not matter here)."""
    assert stored_out.run.returncode == 0, stored_out.run.stderr
    results = stored_out.results
    same_results(results, baseline)
    nodes = {three_nodes_cluster.info["head"], *three_nodes_cluster.info["workers"]}
    decode = per_node(results, "decode_node_id")
    print("decode shards per node:", {n[:8]: c for n, c in decode.items()},
          "classify shards per node:", {n[:8]: c for n, c in per_node(results, "classify_node_id").items()})
    assert set(decode) == nodes  # every node decoded some shards
    assert results["shards"]["transport"] == "object_store" and len(results["ray"]["nodes"]) == 3


def test_three_nodes_with_the_data_only_in_the_store(three_nodes, data, baseline, tmp_path):
    """The data only in the S3 test server, whose endpoint only the driver knows: every node's
    decode tasks read it from there, chunks reach classify tasks through Ray's object store,
    and the figures are those of the same folder on disk on one node (the baseline)."""
    from tests.s3server import serving

    with serving("mnist37-cluster") as s3:  # this process's AWS variables, the endpoint too, for the driver
        s3.upload(data, "mnist37-cluster", "data")
        run = job_on(three_nodes, "s3://mnist37-cluster/data", tmp_path / "three", "--cache-dir", str(tmp_path / "c3"))
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "three" / "results.json").read_text())
    same_results(results, baseline)
    decode_nodes = {shard["decode_node_id"] for shard in results["shards"]["per_shard"]}
    assert decode_nodes == {three_nodes.info["head"], *three_nodes.info["workers"]}  # every node read from the store
    assert results["shards"]["transport"] == "object_store"


def test_predictions_on_three_nodes_are_the_one_node_rows(submitted, stored_out, baseline):
    """Per-image predictions on a cluster: with a local --out (nodes may not reach it: the driver
    writes what each task sends back; the submitted job's) and with an object-store prefix
    (each node's tasks write their files there; stored_out's), the rows of the one-node run,
    file for file, rebuilding its confusion. (Both read the data on disk, as the one-node run
    did: a predictions file's key covers its chunk's source.)"""
    import numpy as np

    import mnist37

    reference = mnist37.load(baseline["config"]["out"])
    run, out = submitted
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    local = mnist37.load(out / "out")
    assert stored_out.run.returncode == 0, stored_out.run.stderr
    table = stored_out.predictions
    assert stored_out.keys == [f"run/predictions/valid-{i:06d}.parquet" for i in range(3)]
    for results in (local.results, stored_out.results):
        assert results["shards"]["transport"] == "object_store"
        assert results["predictions"]["files"] == reference.results["predictions"]["files"]
    assert local.predictions.equals(reference.predictions) and table.equals(reference.predictions)
    for metric in ("l1", "l2"):
        confusion = np.zeros((2, 2), dtype=np.int64)
        np.add.at(confusion, (table["true"].to_numpy(), table[f"{metric}_predicted"].to_numpy()), 1)
        assert confusion.tolist() == baseline["metrics"][metric]["confusion"]


def test_a_worker_process_killed_mid_task(data, baseline, tmp_path):
    """SIGKILL a worker of the session's Ray (never another Ray's: the suite runs in two
    processes) while its process title says it runs a decode task; Ray retries it."""
    killed = []
    session = ray_start_session(shared_ray_address())
    before = ray_workers(session).keys()

    def chaos():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            workers = ray_workers(session)
            for pid, title in workers.items():
                if title.startswith(("ray::_decode_task", "ray::_classify_task")):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(title)
                    return
            if not workers.keys() - before:  # none of the job's workers has started yet
                time.sleep(0.1)

    watcher = threading.Thread(target=chaos)
    watcher.start()
    run = run_job("--data", str(data), "--out", str(tmp_path), "--shard-size", str(SMALL_SHARDS),
                  "--chunk-dir", str(tmp_path / "c"))
    watcher.join()
    assert killed, "no task was caught running"
    assert run.returncode == 0, run.stderr
    same_results(json.loads((tmp_path / "results.json").read_text()), baseline)


# ---------------------------------------------------------------- a node removed (the last test on the three first nodes)


def test_a_worker_node_removed_mid_job(three_nodes_cluster, data, baseline, tmp_path):
    """The node is gone, as the cluster itself reports, while most shards are still to do (the
    module's cluster: this test is the last on its three first nodes).

    To prove that on a machine of any speed, the driver is paused (SIGSTOP) once decoding has
    begun: it submits nothing more, and at most its window of tasks can finish meanwhile. The
    node is removed, the cluster reports it dead, the shards done by then are counted, and
    only then does the job go on."""
    chunks = tmp_path / "chunks"
    job = start_job(three_nodes_cluster, data, tmp_path, shard_size=SMALL_SHARDS)  # 60 + 15 shards
    try:
        deadline = time.monotonic() + 120
        while len(list(chunks.glob("*/*.arrow"))) < 3:  # the job is decoding
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before a node could be removed"
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGSTOP)
        alive = three_nodes_cluster.remove(0)
        done_while_gone = len(list(chunks.glob("*/*.arrow")))
        os.kill(job.pid, signal.SIGCONT)
        job.wait(timeout=600)
    finally:
        stop_group(job)
    removed = three_nodes_cluster.info["workers"][0]
    assert removed not in alive and len(alive) == 2
    assert done_while_gone < 75  # shards remained for the two nodes left
    assert job.returncode == 0, (tmp_path / "job.log").read_text()[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    same_results(results, baseline)
    assert {n["node_id"] for n in results["ray"]["nodes"]} == alive
    assert removed not in per_node(results, "classify_node_id")  # classifying began after it was gone


# ---------------------------------------------------------------- a node advertising GPUs joins (after the removal)


@dataclasses.dataclass
class Watched:
    """A job started from the command line and watched while it ran."""
    returncode: int
    out: Path
    seen: set[int]  # the pids of Ray workers that appeared while it ran
    left: set[int]  # those of them still running 30 s after it ended


@pytest.fixture(scope="module")
def watched(three_nodes_cluster, data, tmp_path_factory):
    """One command-line job for the three tests below, once a node advertising 3 GPUs (that do
    not exist) has joined the module's cluster as the removal test left it (head, worker 1):
    three nodes again. Its chunks go to a store named by URI (the chunk-store test) and its
    classify tasks ask for half a GPU (the GPU-request test); the Ray workers of the cluster's
    session are watched while it runs, and after it ends until none of them is left, 30 s at
    most (the leaving test)."""
    cluster, out = three_nodes_cluster, tmp_path_factory.mktemp("watched")
    cluster.add(gpus=3)
    session = cluster.process.pid
    before = ray_workers(session).keys()
    job, seen = start_job(cluster, data, out, "--chunk-dir", (out / "store").as_uri(), "--gpus-per-task", "0.5"), set()
    while job.poll() is None:  # the job's workers, as the check below sees them
        seen |= ray_workers(session).keys() - before
        time.sleep(0.2)  # a worker lives far longer: its Python and Ray alone take ~1 s to start
    deadline = time.monotonic() + 30
    while (left := ray_workers(session).keys() & seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    return Watched(job.returncode, out, seen, left)


def test_shared_chunk_store_uri(watched, baseline):
    assert watched.returncode == 0, (watched.out / "job.log").read_text()
    results = json.loads((watched.out / "results.json").read_text())
    same_results(results, baseline)
    assert results["shards"]["transport"] == "filesystem" and results["shards"]["chunk_dir"].startswith("file://")
    assert len(list((watched.out / "store" / "valid").glob("*.arrow"))) == 3


def test_a_job_leaves_a_cluster_at_once_and_none_of_its_workers_behind(watched, baseline):
    """The command line leaves a joined cluster without ray.shutdown() once the outputs are
    written (mnist37.on_ray.session.disconnect): its output is whole, and the raylets stop every
    worker they started for the job, as for any driver that exits."""
    assert watched.returncode == 0, (watched.out / "job.log").read_text()
    assert watched.seen, "no worker of the job was seen while it ran"
    same_results(json.loads((watched.out / "results.json").read_text()), baseline)
    log = (watched.out / "job.log").read_text().splitlines()
    assert "image files = " in log[-1]  # the last line, flushed before the process ended
    assert not watched.left, f"workers of the finished job still run 30 s later: {sorted(watched.left)}"


def test_classify_tasks_ask_for_gpus_and_run_on_cpu_without_cuda(watched, baseline):
    import torch

    assert watched.returncode == 0, (watched.out / "job.log").read_text()  # --gpus-per-task 0.5: 3 GPUs that do not exist
    results = json.loads((watched.out / "results.json").read_text())
    same_results(results, baseline)
    assert results["ray"]["cluster_resources"]["GPU"] == 3
    shards = results["shards"]["per_shard"]
    assert all(s["decode_gpu_ids"] == [] for s in shards)  # decode tasks never ask for a GPU
    classified = [s for s in shards if s["split"] == "valid"]
    assert classified and all(len(s["classify_gpu_ids"]) == 1 for s in classified)
    if not torch.cuda.is_available():
        assert {s["classify_device"] for s in classified} == {"cpu"}


# ---------------------------------------------------------------- Kubernetes


def test_kuberay_manifest_matches_the_readme():
    manifest = yaml.safe_load((PROJECT_ROOT / "configs" / "rayjob.yaml").read_text())
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert manifest["kind"] == "RayJob" and manifest["apiVersion"] == "ray.io/v1"
    entrypoint = manifest["spec"]["entrypoint"]
    assert entrypoint.startswith("python -m mnist37.job ") and entrypoint in readme  # its image holds mnist37
    runtime_env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    runtime_env_yaml = yaml.safe_load((PROJECT_ROOT / "configs" / "runtime_env.yaml").read_text())
    assert runtime_env == {"env_vars": runtime_env_yaml["env_vars"]}
    assert "configs/runtime_env.yaml" in readme and "configs/rayjob.yaml" in readme
