"""The package stands on its own: the wheel and the sdist built from a clean copy of the checkout
hold every module of `mnist37/`, and the wheel installed into a fresh virtual environment that
has the dependencies but no editable install (tests/wheel.py) runs the job with the package's
own defaults, from a folder that is not this repository, on real MNIST exactly.

The same by hand (the commands these tests run):

    git clone <repo> mnist37 && cd mnist37
    pip wheel --no-deps --wheel-dir dist .          # dist/mnist37-0.1.0-py3-none-any.whl
    python3 -m venv /tmp/fresh && /tmp/fresh/bin/pip install torch==2.13.0 dist/mnist37-0.1.0-py3-none-any.whl
    cd /tmp && /tmp/fresh/bin/mnist37-evaluate --data /abs/mnist_sample.tgz --out /tmp/sample --ray-address local
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_image_folder
from tests.test_evaluate_job import FASTBOOK_L1
from tests.wheel import clean_env, fresh_venv, install_wheel, sdist_names, site_packages, tree_modules, wheel_names

# What users run, and nothing else: the benchmark and the studies are lab tools, run from a
# checkout (jobs/benchmark.py, benchmarks/), not installed.
SCRIPTS = ("mnist37-evaluate", "mnist37-convert")


def test_the_wheel_holds_every_module_of_the_tree_and_nothing_else(built):
    source, wheel, _ = built
    names = wheel_names(wheel)
    modules = tree_modules(source)
    assert "mnist37/sources/__init__.py" in modules  # the subpackage a hand list once left out
    assert {n for n in names if n.endswith(".py")} == modules
    assert {n.split("/")[0] for n in names} == {"mnist37", wheel.name.split("-py")[0] + ".dist-info"}


def test_the_sdist_holds_every_module_of_the_tree(built):
    source, _, sdist = built
    names = sdist_names(sdist)
    assert {n for n in names if n.startswith("mnist37/") and n.endswith(".py")} == tree_modules(source)
    assert "pyproject.toml" in names and "README.md" in names


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
    """A fresh virtual environment with the dependencies and the wheel, no editable install:
    (its python, the folder the wheel installed mnist37 into)."""
    _, wheel, _ = built
    python = fresh_venv(tmp_path_factory.mktemp("venv") / "fresh")
    before = subprocess.run([str(python), "-c", "import mnist37"], cwd=python.parent, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert before.returncode == 1 and "ModuleNotFoundError: No module named 'mnist37'" in before.stderr, before.stderr
    install_wheel(python, wheel)
    target = site_packages(python.parent.parent) / "mnist37"
    assert (target / "job.py").is_file() and not target.is_symlink()
    return python, target


def run_installed(python: Path, cwd: Path, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "mnist37.job", *argv], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_the_install_brings_the_console_scripts(venv, tmp_path):
    python, _ = venv
    assert {p.name for p in python.parent.glob("mnist37-*")} == set(SCRIPTS)  # no lab tool among them
    helps = {}
    for script in SCRIPTS:
        path = python.parent / script
        assert path.is_file() and path.read_text().startswith(f"#!{python}\n"), script
        run = subprocess.run([str(path), "--help"], cwd=tmp_path, env=clean_env(),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stdout.startswith(f"usage: {script} "), run.stderr[-3000:]
        helps[script] = run.stdout
    for group in ("data:", "decoding:", "classify:", "Ray:", "output:"):
        assert f"\n{group}\n" in helps["mnist37-evaluate"]
    assert "--to {parquet,webdataset,idx}" in helps["mnist37-convert"] and "--metrics" not in helps["mnist37-convert"]


def test_a_data_problem_from_the_installed_package(venv, tmp_path):
    python, _ = venv
    run = run_installed(python, tmp_path, "--data", "does/not/exist")
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == "error: data: does/not/exist does not exist"


# The job run as `python -m mnist37.job ...`, listing at its end (it ends with os._exit) the file
# of every mnist37 module it imported, itself (`__main__`) included.
WITH_MODULE_LIST = """\
import json, os, runpy, sys
listing = sys.argv.pop(1)
exit_now = os._exit
def _exit(status):
    files = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
             if name == "mnist37" or name.startswith("mnist37.")}
    files["__main__"] = sys.modules["__main__"].__file__
    with open(listing, "w") as f:
        json.dump(files, f)
    exit_now(status)
os._exit = _exit
sys.argv[0] = "mnist37.job"
runpy.run_module("mnist37.job", run_name="__main__", alter_sys=True)
"""


@pytest.mark.ray
def test_the_wheel_runs_the_job_on_mnist_sample_exactly(venv, mnist_sample_tgz, cache_dir, tmp_path):
    python, target = venv
    listing = tmp_path / "modules.json"
    run = subprocess.run([str(python), "-c", WITH_MODULE_LIST, str(listing), "--data", str(mnist_sample_tgz),
                          "--out", str(tmp_path / "out"), "--cache-dir", str(cache_dir), "--ray-address", "local"],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    l1 = results["metrics"]["l1"]["per_class"]
    assert (round(l1["3"], 4), round(l1["7"], 4)) == (FASTBOOK_L1["3"], FASTBOOK_L1["7"])
    files = json.loads(listing.read_text())
    assert files["__main__"] == str(target / "job.py")
    assert files["mnist37.sources"] == str(target / "sources" / "__init__.py")
    assert {"mnist37.sources.archive", "mnist37.on_ray.tasks", "mnist37.evaluation"} <= set(files)
    assert all(Path(f).is_relative_to(target) for f in files.values()), files


@pytest.mark.ray
def test_the_installed_console_script_runs_the_job_with_its_own_defaults(venv, tmp_path):
    python, _ = venv
    data = make_image_folder(tmp_path / "data", {"train": {"3": 10, "7": 10}, "valid": {"3": 4, "7": 4}})
    # The console script itself, not `python -m`: its entry point runs a whole job, with the
    # package's own defaults (splits, classes, a Ray of its own) and nothing else but where.
    run = subprocess.run([str(python.parent / "mnist37-evaluate"), "--data", str(data), "--out", str(tmp_path / "out"),
                          "--chunk-dir", str(tmp_path / "chunks"), "--ray-address", "local"],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (results["config"]["train_split"], results["config"]["eval_split"]) == ("train", "valid")
    assert results["config"]["ray_address"] == "local"
    assert results["classes"] == ["3", "7"] and results["metrics"]["l1"]["total"] == 8
