"""The package stands on its own: a plain (non-editable) `pip install .` runs the job with the
package's own defaults, from a folder that is not this repository."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT, make_image_folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """mnist37 built and installed (no dependencies: they are this environment's) into a folder
    of its own; returns that folder, for PYTHONPATH."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("source")  # what an sdist holds: no jobs/, no configs/
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    shutil.copytree(PROJECT_ROOT / "mnist37", source / "mnist37", ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(source)],
                         cwd=source, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (target / "mnist37" / "job.py").is_file() and not (target / "jobs").exists()
    return target


SCRIPTS = ("mnist37-evaluate", "mnist37-convert", "mnist37-benchmark")


def test_the_install_brings_the_console_scripts(installed, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")},
           "PYTHONPATH": str(installed)}
    helps = {}
    for script in SCRIPTS:
        assert (installed / "bin" / script).is_file(), sorted(p.name for p in (installed / "bin").iterdir())
        run = subprocess.run([str(installed / "bin" / script), "--help"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stdout.startswith(f"usage: {script} "), run.stderr[-3000:]
        helps[script] = run.stdout
    for group in ("data:", "decoding:", "classify:", "Ray:", "output:"):
        assert f"\n{group}\n" in helps["mnist37-evaluate"]
    assert "--to {parquet,webdataset,idx}" in helps["mnist37-convert"] and "--metrics" not in helps["mnist37-convert"]


def run_installed(installed, cwd, *argv, timeout=300):
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")},
           "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, "-m", "mnist37.job", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_not_this_checkout(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    run = subprocess.run([sys.executable, "-c", "import mnist37, sys; print(mnist37.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.stdout.strip() == str(installed / "mnist37" / "__init__.py")


def test_a_data_problem_from_the_installed_package(installed, tmp_path):
    run = run_installed(installed, tmp_path, "--data", "does/not/exist")
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == "error: data: does/not/exist does not exist"


@pytest.mark.ray
def test_the_installed_package_runs_the_benchmark_and_the_job_with_its_own_defaults(installed, tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": {"3": 10, "7": 10}, "valid": {"3": 4, "7": 4}})
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")},
           "PYTHONPATH": str(installed)}
    run = subprocess.run([sys.executable, "-m", "mnist37.benchmark", "--data", str(data), "--copies", "1",
                          "--repeats", "1", "--work", str(tmp_path / "bench"), "--json", str(tmp_path / "b.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["checks"]["seed_and_mnist37_agree_per_scale"] == {"1": True}
    assert "x seed" in run.stdout
    # Its cold run was the installed job with the package's own defaults (`python -m mnist37.job
    # --data D --out O --chunk-dir C --ray-address local`, nothing else): splits, classes, a Ray of its own.
    results = json.loads((tmp_path / "bench" / "x1" / "out-cold" / "results.json").read_text())
    assert (results["config"]["train_split"], results["config"]["eval_split"]) == ("train", "valid")
    assert results["config"]["ray_address"] == "local"
    assert results["classes"] == ["3", "7"] and results["metrics"]["l1"]["total"] == 8
