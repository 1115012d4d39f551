"""mnist37 as a user installs it, away from this checkout: the wheel and the sdist built from a
clean copy of the checkout, and a fresh virtual environment that holds this environment's
dependencies but no mnist37.

The test environment itself cannot show whether an installed mnist37 is whole: its editable
install (`pip install -e .`) puts an import hook on `sys.meta_path` that fills any module
missing from an installed copy from the checkout (an installed mnist37 without
`mnist37/sources/` still imported). A fresh environment made here has no such hook: its
site-packages links every entry of this environment's site-packages (torch, ray, ... as
installed) except mnist37's own (`__editable__*`, `mnist37-*.dist-info`), so `import mnist37`
fails there until a wheel is installed into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from tests.conftest import PROJECT_ROOT

PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def clean_copy(dest: Path) -> Path:
    """Copy into `dest` what a fresh clone of this checkout holds (`git ls-files`: the tracked
    files, and new files git does not ignore), nothing built or cached; returns `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT_ROOT, capture_output=True, timeout=60)
    assert listed.returncode == 0, f"a clean copy is what `git ls-files` lists: {listed.stderr.decode()}"
    for name in filter(None, listed.stdout.split(b"\0")):
        source = PROJECT_ROOT / os.fsdecode(name)
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def build_wheel(source: Path, dist: Path) -> Path:
    """`pip wheel --no-deps` of `source` into `dist` (this environment's setuptools, no build
    isolation: no package index needed); returns the wheel."""
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--quiet", "--wheel-dir", str(dist), str(source)],
                         cwd=source, capture_output=True, text=True, timeout=300, env={**os.environ, **PIP_ENV})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = dist.glob("mnist37-*.whl")
    return wheel


def build_sdist(source: Path, dist: Path) -> Path:
    """The sdist of `source` in `dist`, through the PEP 517 hook pip and `python -m build` call."""
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=source, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return dist / run.stdout.strip().splitlines()[-1]


def tree_modules(root: Path) -> set[str]:
    """Every module file of the package under `root`: 'mnist37/x.py', 'mnist37/sources/y.py'."""
    return {path.relative_to(root).as_posix() for path in (root / "mnist37").rglob("*.py")
            if "__pycache__" not in path.parts}


def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def sdist_names(sdist: Path) -> list[str]:
    """The sdist's members without its top folder (`mnist37-0.1.0/`)."""
    with tarfile.open(sdist) as archive:
        return [str(PurePosixPath(*PurePosixPath(name).parts[1:])) for name in archive.getnames()
                if len(PurePosixPath(name).parts) > 1]


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def is_mnist37_own(name: str) -> bool:
    """mnist37's own entries in a site-packages: its editable install's hook and its metadata."""
    return name.startswith("__editable__") or name.lower().startswith("mnist37")


def fresh_venv(venv: Path) -> Path:
    """A new virtual environment at `venv` with this environment's dependencies (linked) and no
    mnist37; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    ours, theirs = Path(sysconfig.get_paths()["purelib"]), site_packages(venv)
    assert theirs.is_dir(), theirs
    for entry in sorted(ours.iterdir()):
        if not is_mnist37_own(entry.name) and not (theirs / entry.name).exists():
            (theirs / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return venv / "bin" / "python"


def install_wheel(python: Path, wheel: Path) -> None:
    """`pip install --no-deps` of the wheel into the environment of `python` (its own site-packages
    and bin/), with the pip it holds."""
    run = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                         capture_output=True, text=True, timeout=300, env={**clean_env(), **PIP_ENV})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment (its Ray token included) without what would point a process
    at this checkout or at a running Ray: no PYTHONPATH, no RAY_ADDRESS, no VIRTUAL_ENV, and
    PATH without this environment's bin/."""
    ours = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != ours)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    return {**env, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0", **extra}
