"""Shared fixtures: tiny PNG image folders written at test time, the real MNIST archives from
../shared/data (through MNIST37_DATA_DIR), and one local Ray for the tests that need it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Ray's authentication is pinned here, whatever the caller's environment holds
# (RAY_AUTH_MODE=disabled, a ~/.ray/auth_token or none): token mode with a token of this test
# session's own, which every cluster, job and client the tests start inherits. Nothing under
# ~/.ray is read or written.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
os.environ.pop("RAY_ADDRESS", None)  # tests start the clusters they use
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def groups_of(paths: list[str]) -> list[tuple[str, list[bytes]]]:
    """Consecutive '/'-separated paths that share a folder, as files.Group runs."""
    groups: list[tuple[str, list[bytes]]] = []
    for path in paths:
        folder, _, name = path.rpartition("/")
        if not groups or groups[-1][0] != folder:
            groups.append((folder, []))
        groups[-1][1].append(os.fsencode(name))
    return groups


def decode_files(root, paths: list[str], shape: tuple[int, int], convert: bool = False):
    """sources.folder.decode_files over paths relative to `root`, as a shard's groups would give them."""
    from mnist37.images import Decoding
    from mnist37.sources.folder import decode_files

    return decode_files(root, groups_of(paths), Decoding(tuple(shape), convert))


def write_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path, format="PNG")
    return path


def class_pattern(class_index: int, shape: tuple[int, int]) -> np.ndarray:
    """A distinct bright shape per class (a vertical band at a class-dependent column)."""
    h, w = shape
    pattern = np.zeros(shape, dtype=np.float64)
    col = (class_index * 3 + 1) % w
    pattern[:, col:col + 2] = 200.0
    pattern[class_index % h, :] = 120.0
    return pattern


def make_image_folder(root: Path, counts: dict[str, dict[str, int]], shape=(8, 8), seed: int = 0) -> Path:
    """Write `<root>/<split>/<class>/<i>.png` grayscale images: class pattern plus noise.

    `counts` maps split -> class name -> number of images; returns `root`.
    """
    rng = np.random.default_rng(seed)
    for split, classes in counts.items():
        for class_index, (name, n) in enumerate(classes.items()):
            for i in range(n):
                noisy = class_pattern(class_index, shape) + rng.normal(0, 60, shape)
                write_png(root / split / name / f"{i}.png", np.clip(noisy, 0, 255).astype(np.uint8))
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """train: 64 per class, valid: 12 per class, classes '3' and '7', 8x8 pixels."""
    return make_image_folder(tmp_path / "data",
                             {"train": {"3": 64, "7": 64}, "valid": {"3": 12, "7": 12}})


def _data_dir() -> Path | None:
    given = os.environ.get("MNIST37_DATA_DIR")
    if given:
        return Path(given)
    if in_ci():
        pytest.fail("MNIST37_DATA_DIR is not set: CI must point it at ../shared/data")
    fallback = PROJECT_ROOT.parent / "shared" / "data"
    return fallback if fallback.is_dir() else None


def _archive(name: str) -> Path:
    data_dir = _data_dir()
    if data_dir is None:
        pytest.skip("real MNIST not found: set MNIST37_DATA_DIR to the folder holding mnist_sample.tgz")
    path = data_dir / name
    if not path.is_file():
        pytest.fail(f"{path} not found (MNIST37_DATA_DIR={data_dir})")
    return path


@pytest.fixture(scope="session")
def mnist_sample_tgz() -> Path:
    return _archive("mnist_sample.tgz")


@pytest.fixture(scope="session")
def mnist_png_tgz() -> Path:
    return _archive("mnist_png.tgz")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One extraction and chunk cache for the whole test run, so each archive is extracted, and
    its shards decoded, once: under xdist the suite's processes share it (in the folder that
    holds their temp folders), as jobs on one machine share a cache. Safe as it is for them:
    extractions and chunks are renamed into place whole, and a writer's temporaries are locked
    while it writes (mnist37/storage/partials.py)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def sample_run(mnist_sample_tgz, cache_dir, tmp_path_factory):
    """jobs/evaluate.py on mnist_sample with its defaults, once a session: (the finished
    process, its --out folder, results.json). Its chunks (in the session's cache) are for
    reading or copying only."""
    from tests.test_evaluate_job import run_job

    out = tmp_path_factory.mktemp("sample")
    run = run_job("--data", str(mnist_sample_tgz), "--out", str(out), "--cache-dir", str(cache_dir))
    assert run.returncode == 0, run.stderr
    return run, out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """A clean copy of the checkout, and the wheel and sdist built from it, once a session:
    (copy, wheel, sdist). The install tests share them (tests/test_install.py,
    tests/test_install_cluster.py: one xdist group, INSTALL_GROUP); tests/wheel.py builds them."""
    from tests.wheel import build_sdist, build_wheel, clean_copy

    source = clean_copy(tmp_path_factory.mktemp("clean"))
    dist = tmp_path_factory.mktemp("dist")
    return source, build_wheel(source, dist), build_sdist(source, dist)


_SHARED = contextlib.ExitStack()
_SHARED_ADDRESS: list[str] = []


def ray_cpus_each() -> int:
    """The CPUs each test Ray offers: the machine's, shared among the suite's processes
    (`-n 2` on 2 cores: one each). A job on the test Ray then starts no more worker processes
    than it can keep busy (each starts Python and Ray, and a classifying one imports torch:
    ~1-2 CPU-s), and the suite's processes do not outbid each other for the cores."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def ray_env() -> dict[str, str]:
    """The environment the session's Ray starts with: this process's without its AWS variables,
    plus the S3 test server's credentials and nothing that could send a node to AWS (no
    endpoint, no metadata service, no config files). Like a cluster's nodes, it holds
    credentials only: the jobs that read the S3 test server bring its endpoint in their
    driver's environment, and every task reads the store the driver read (issue 25)."""
    from tests.s3server import aws_credentials

    return {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **aws_credentials()}


def shared_ray_address() -> str:
    """One Ray for the whole test session (`ray start --head` on loopback, its own temp dir),
    started on first use and stopped when the session ends, passed or failed: the jobs tests
    run and the in-process Ray tests join it instead of each starting a Ray (~3-4 s each on 2
    cores), the jobs over the S3 test server among them (ray_env). Tests about the job's
    own Ray (starting it, stopping it) pass --ray-address local."""
    if not _SHARED_ADDRESS:
        from tests.ray_heads import running_cluster  # the `ray start --head` the benchmark's --cluster uses too

        log = Path(tempfile.mkdtemp(prefix="mnist37-tests-")) / "ray-start.log"
        _SHARED_ADDRESS.append(_SHARED.enter_context(
            running_cluster(log, num_cpus=ray_cpus_each(), env=ray_env())))
    return _SHARED_ADDRESS[0]


def ray_start_session(address: str) -> int:
    """The session id of the `ray start --head` serving `address` (started in a session of its
    own, as running_cluster starts it): every process of that Ray is in it, its workers too."""
    port = address.rpartition(":")[2]
    for pid in os.listdir("/proc"):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"start" in words and b"--head" in words and b"--port" in words \
                and words[words.index(b"--port") + 1] == port.encode():
            return int(pid)
    raise LookupError(f"no `ray start --head --port {port}` running")


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line (arguments joined by spaces; a Ray worker's is its title,
    `ray::<task>`) of every process in session `sid` but its leader: a job started in a
    session of its own (its own Ray's processes among them), or a Ray the tests started so."""
    found = {}
    for pid in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and int(pid) != sid:
                found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    _SHARED.close()


# ---------------------------------------------------------------- CI never skips silently
#
# A test skips where this machine lacks what it needs (root for tmpfs mounts and the test
# hosts' namespaces, `ip`/`unshare`/`nsenter`, Chromium, the real MNIST archives). CI must
# provide all of that (.ci/run installs it or fails), so under CI such a skip is a failure with
# its reason. The one exception is the device: CI has no GPU, so tests marked `cuda` (they need
# a CUDA device) or `no_cuda` (they check the path taken without one) skip where the device is
# not as they need, under CI too, and the summary counts them on a line of their own.

DEVICE_MARKERS = ("cuda", "no_cuda")


def in_ci() -> bool:
    """Whether this is a CI run: `CI` set to anything but empty, 0, false or no (CI services set
    CI=true; so does .ci/run)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped where none is visible (CI too: it has no GPU)")
    config.addinivalue_line("markers", "no_cuda: checks the path taken without CUDA; skipped where a CUDA device is visible")


def _mark_device_tests(items) -> None:
    """Skip the `cuda` tests where torch sees no CUDA device, the `no_cuda` ones where it sees one."""
    device_items = [item for item in items if any(item.get_closest_marker(m) for m in DEVICE_MARKERS)]
    if not device_items:
        return
    import torch

    cuda = torch.cuda.is_available()
    for item in device_items:
        if item.get_closest_marker("cuda") and not cuda:
            item.add_marker(pytest.mark.skip(reason="CUDA only: no CUDA device visible"))
        elif item.get_closest_marker("no_cuda") and cuda:
            item.add_marker(pytest.mark.skip(reason="without CUDA only: a CUDA device is visible"))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip (a test's own `pytest.skip`, a fixture's, a `skipif` mark) fails the test
    with its reason, unless the test is a device test (DEVICE_MARKERS); xfails are left alone."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and in_ci() \
            and not any(item.get_closest_marker(m) for m in DEVICE_MARKERS):
        report.outcome = "failed"
        report.longrepr = f"CI must provide what this test needs, or the test must not skip: {_skip_reason(report)}"
    return report


def pytest_terminal_summary(terminalreporter):
    """The device tests skipped, counted apart from any other skip, with their reasons."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if any(m in r.keywords for m in DEVICE_MARKERS) and not hasattr(r, "wasxfail")]
    if skipped:
        reasons = sorted({_skip_reason(r) for r in skipped})
        terminalreporter.write_line(f"device tests skipped (allowed, CI included): {len(skipped)} ({'; '.join(reasons)})")


# The longest units of work, longest first: their summed test durations in a `-n 2 --dist
# loadfile` run (2026-12-06, `--durations=0`, load average 5-8 on 2 cores from other sessions;
# busy CPU-seconds of each module's own processes in brackets): hosts 277 s (102), cluster 249
# (195), object_store 173 (83), never_hang 159 (71), interrupt 123 (98), benchmark_job 91 (65),
# install + install_cluster 76 (53), formats_object_store 64 (37), notebook 44 (29),
# evaluate_job_faults 42 (32), bad_records 25, images 27, bad_input 27; the other 38 modules
# took 291 s together. hosts waits out Ray's default detection (65 s a cut, two cuts at once
# since issue 34) and is first, so it starts at once, with cluster (second) in the other process.
LONGEST_FIRST = ("test_hosts", "test_cluster", "test_object_store", "test_never_hang", "test_interrupt",
                 "test_benchmark_job", "test_install", "test_formats_object_store", "test_notebook",
                 "test_evaluate_job_faults", "test_bad_records", "test_images", "test_bad_input")


# Modules that run in the same suite process, one after the other, as one unit of xdist's work:
# they share a session fixture (`built`, the wheel and sdist). Every other module is a unit of
# its own, as `--dist loadfile` makes it (README's command), so a module's fixtures are made once.
SHARED_GROUPS = {"test_install_cluster": "test_install"}


def group_of(module: str) -> str:
    """The unit of work a test module (`test_x`) belongs to."""
    return SHARED_GROUPS.get(module, module)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the modules of a SHARED_GROUPS group as one unit. (`--dist
    loadgroup` would read groups off `xdist_group` marks, but pytest-xdist 3.8 under pytest 9
    loses them: it renames the items after pytest has fixed their ids.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(Path(super()._split_scope(nodeid)).stem)

    return GroupedFileScheduling(config, log)


def pytest_collection_modifyitems(items):
    """A test that uses the shared local Ray is a `ray` test, marked or not. The longest units
    of work first (LONGEST_FIRST: a module, or a SHARED_GROUPS group), then the other units with
    `ray` tests, then the rest: README's command runs the suite in two processes that take a
    unit at a time (`-n 2 --dist loadfile`, in this order: `--no-loadscope-reorder` in
    pyproject.toml, else xdist sorts them by their number of tests). xdist hands each process
    two units to start with (the first and third to one, the second and fourth to the other),
    then the next whenever one is done, so the longest ones first leave the short ones to even
    out the end (docs/testing.md)."""
    _mark_device_tests(items)
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    ray_groups = {group_of(item.module.__name__.rpartition(".")[2]) for item in items
                  if item.get_closest_marker("ray")}

    def rank(item) -> tuple[int, int]:
        group = group_of(item.module.__name__.rpartition(".")[2])
        if group in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(group)
        return (1 if group in ray_groups else 2), 0

    items.sort(key=rank)  # stable: file order within each


@pytest.fixture(scope="session")
def ray_local():
    """The session's Ray, joined by every in-process test that needs one (tests never assume
    task order)."""
    import ray

    ray.init(address=shared_ray_address(), configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
