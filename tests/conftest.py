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
    if os.environ.get("CI"):
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
    """One extraction cache for the whole session, so each archive is extracted once."""
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


_SHARED = contextlib.ExitStack()
_SHARED_ADDRESS: list[str] = []


def shared_ray_address() -> str:
    """One Ray for the whole test session (`ray start --head` on loopback, its own temp dir),
    started on first use and stopped when the session ends, passed or failed: the jobs tests
    run and the in-process Ray tests join it instead of each starting a Ray (~3-4 s each on 2
    cores). Tests about the job's own Ray (starting it, stopping it) pass --ray-address local."""
    if not _SHARED_ADDRESS:
        from mnist37.benchmark import running_cluster  # the package's own `ray start --head`, as --cluster uses it

        log = Path(tempfile.mkdtemp(prefix="mnist37-tests-")) / "ray-start.log"
        _SHARED_ADDRESS.append(_SHARED.enter_context(running_cluster(log)))
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


@contextlib.contextmanager
def own_ray(name: str):
    """A one-node Ray like the session's, of a test module's own, for as long as the context
    lasts; yields its address for --ray-address. Its nodes start with this process's
    environment as it is now, so their tasks see it too: a module that points the AWS
    variables at its S3 server starts one, and its jobs join it instead of each starting a Ray
    of their own (~5 s each on 2 cores)."""
    from mnist37.benchmark import running_cluster

    with running_cluster(Path(tempfile.mkdtemp(prefix=f"mnist37-{name}-")) / "ray-start.log") as address:
        yield address


def pytest_sessionfinish(session, exitstatus):
    _SHARED.close()


def pytest_collection_modifyitems(items):
    """A test that uses the shared local Ray is a `ray` test, marked or not. The test hosts'
    module, then every module with `ray` tests, then the rest: README's command runs the suite
    in two processes that take a module at a time (`-n 2 --dist loadfile`), and the longest
    ones first leave the short ones to even out the end (docs/testing.md)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    heavy = {item.module.__name__: 0 if item.get_closest_marker("hosts") else 1
             for item in items if item.get_closest_marker("ray")}
    items.sort(key=lambda item: heavy.get(item.module.__name__, 2))  # stable: file order within each


@pytest.fixture(scope="session")
def ray_local():
    """The session's Ray, joined by every in-process test that needs one (tests never assume
    task order)."""
    import ray

    ray.init(address=shared_ray_address(), configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
