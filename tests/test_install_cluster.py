"""A cluster gets the package without the checkout: `ray job submit` with
configs/runtime_env_wheel.yaml, from a folder that holds the built wheel and no mnist37/, runs
the job on a head whose Python has no mnist37 (a fresh virtual environment with the
dependencies only: tests/wheel.py); and the KubeRay image (configs/rayjob.yaml,
configs/Dockerfile) names the wheel and every dependency of pyproject.toml."""

import json
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from mnist37 import __version__
from tests.conftest import PROJECT_ROOT, ray_cpus_each
from tests.test_cluster import RAY, free_port, stop_group
from tests.test_evaluate_job import FASTBOOK_L1
from tests.wheel import clean_env, fresh_venv

CONFIGS = PROJECT_ROOT / "configs"
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
WHEEL_NAME = f"{PYPROJECT['name']}-{PYPROJECT['version']}-py3-none-any.whl"


def test_the_wheel_runtime_env_names_the_wheel_pip_builds():
    runtime_env = yaml.safe_load((CONFIGS / "runtime_env_wheel.yaml").read_text())
    assert PYPROJECT["version"] == __version__
    assert runtime_env["working_dir"] == "dist"
    assert runtime_env["pip"] == [f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/{WHEEL_NAME}"]
    assert "py_modules" not in runtime_env  # Ray installs a py_modules wheel with its dependencies, torch included


def test_the_kuberay_image_holds_the_wheel_and_every_dependency():
    """rayjob.yaml lists every requirement of pyproject.toml as written there; the Dockerfile
    builds its image from the Ray image rayjob.yaml declares and installs the wheel with its
    dependencies."""
    text = (CONFIGS / "rayjob.yaml").read_text()
    missing = [req for req in PYPROJECT["dependencies"] if not re.search(rf"^#\s+{re.escape(req)}(\s|$)", text, re.M)]
    assert not missing, f"configs/rayjob.yaml does not name {missing}"
    manifest = yaml.safe_load(text)
    version = manifest["spec"]["rayClusterSpec"]["rayVersion"]
    dockerfile = (CONFIGS / "Dockerfile").read_text()
    assert f"\nFROM rayproject/ray:{version}-py311\n" in dockerfile and f"rayproject/ray:{version}-py311" in text
    assert f"\nCOPY dist/{WHEEL_NAME} /tmp/\n" in dockerfile
    (install,) = [line for line in dockerfile.splitlines() if line.startswith("RUN ") and WHEEL_NAME in line]
    assert install.startswith(f"RUN pip install --no-cache-dir /tmp/{WHEEL_NAME} ") and "--no-deps" not in install
    cluster = manifest["spec"]["rayClusterSpec"]
    images = {c["image"] for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"])
              for c in group["template"]["spec"]["containers"]}
    assert images == {f"<registry>/mnist37:{__version__}"}
    assert manifest["spec"]["entrypoint"].startswith("python -m mnist37.job ")
    assert "working_dir" not in yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])  # the image holds the package


@pytest.fixture(scope="module")
def bare_head(tmp_path_factory):
    """`ray start --head --block` on loopback, run by the Python of a fresh virtual environment
    that holds the dependencies and no mnist37, from a folder without mnist37/ and with that
    environment's bin/ first on PATH (so a job's `python` is it): (job API address, its python,
    its temp dir). Stopped by its process group; its temp dir (short: Ray's socket paths must
    fit 107 bytes) removed afterwards."""
    from ray.job_submission import JobSubmissionClient

    python = fresh_venv(tmp_path_factory.mktemp("venv") / "bare")
    temp = Path(tempfile.mkdtemp(prefix="mnist37-whl-"))
    dashboard, log = free_port(), temp / "ray-start.log"
    env = clean_env(PATH=f"{python.parent}:{clean_env()['PATH']}")
    with open(log, "w") as output:
        process = subprocess.Popen(
            [str(python), "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(free_port()),
             "--num-cpus", str(ray_cpus_each()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
             "--temp-dir", str(temp), "--disable-usage-stats"],
            cwd=temp, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert process.poll() is None and time.monotonic() < deadline, \
                    f"the head did not start: {log.read_text(errors='replace')[-2000:]}"
                time.sleep(0.5)
        yield address, python, temp
    finally:
        stop_group(process)  # --block: ray start stops what it started, and only that
        shutil.rmtree(temp, ignore_errors=True)


def submit(address: str, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """`ray job submit` (this environment's Ray client) from `cwd`; follows the job to its end."""
    return subprocess.run([RAY, "job", "submit", "--address", address, *argv], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.ray
def test_ray_job_submit_ships_the_wheel_to_a_cluster_without_mnist37(bare_head, built, mnist_sample_tgz, cache_dir,
                                                                    tmp_path):
    address, _, temp = bare_head
    folder = tmp_path / "submit"  # what the user submits from: dist/ with the wheel, no mnist37/
    (folder / "dist").mkdir(parents=True)
    wheel = Path(shutil.copy2(built[1], folder / "dist"))  # `pip wheel` of a clean copy (tests/conftest.py)
    assert wheel.name == WHEEL_NAME and not (folder / "mnist37").exists()

    without = submit(address, folder, "--", "python", "-c", "import mnist37")
    assert without.returncode != 0 and "No module named 'mnist37'" in without.stdout + without.stderr

    out = tmp_path / "out"
    runtime_env = str(CONFIGS / "runtime_env_wheel.yaml")
    run = submit(address, folder, "--runtime-env", runtime_env, "--", "python", "-m", "mnist37.job",
                 "--data", str(mnist_sample_tgz), "--out", str(out), "--cache-dir", str(cache_dir))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    l1 = results["metrics"]["l1"]["per_class"]
    assert (round(l1["3"], 4), round(l1["7"], 4)) == (FASTBOOK_L1["3"], FASTBOOK_L1["7"])
    joined = re.search(r"Ray: (\S+) \(([^)]*)\): 1 node,", run.stdout)
    assert joined and joined[2] != "started by this job", run.stdout[-3000:]  # the head's Ray, not one of its own

    # The mnist37 that ran: the wheel, installed by Ray on the node (its pip environment, kept
    # for the next job with the same runtime environment).
    where = submit(address, folder, "--runtime-env", runtime_env, "--", "python", "-c",
                   "import mnist37.sources; print('mnist37.sources:', mnist37.sources.__file__)")
    assert where.returncode == 0, where.stdout[-3000:] + where.stderr[-3000:]
    (line,) = [line for line in where.stdout.splitlines() if line.startswith("mnist37.sources: ")]
    installed = Path(line.removeprefix("mnist37.sources: "))
    assert installed.is_relative_to(temp) and "/runtime_resources/pip/" in installed.as_posix()
    assert installed.as_posix().endswith("/site-packages/mnist37/sources/__init__.py")
