"""Lab tools stay out of the product: the package imports none of benchmarks/, tests/ or jobs/,
and each study under benchmarks/ has its README of findings and a script that starts from
there (benchmarks/README.md: what may import what)."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

STUDIES = sorted(p for p in (PROJECT_ROOT / "benchmarks").iterdir() if p.is_dir() and p.name != "__pycache__")


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_package_imports_no_lab_tool_test_support_or_entry_point():
    for path in sorted((PROJECT_ROOT / "mnist37").rglob("*.py")):
        reached = {name for name in imported_modules(path) if name.split(".")[0] in ("benchmarks", "tests", "jobs")}
        assert not reached, f"{path.relative_to(PROJECT_ROOT)} imports {sorted(reached)}"


def test_every_study_has_its_readme_and_a_script():
    assert {"chunk_checksums", "chunk_writes", "formats_from_store", "object_requests", "jpeg_decode"} <= {
        p.name for p in STUDIES}
    for study in STUDIES:
        assert "## Findings" in (study / "README.md").read_text(), study.name
        assert list(study.glob("*.py")), study.name


@pytest.mark.parametrize("script", sorted((PROJECT_ROOT / "benchmarks").glob("*/*.py")), ids=lambda p: p.parent.name)
def test_each_probe_runs_from_its_study_folder(script, tmp_path):
    """--help from another folder: the script finds the checkout's mnist37 (and tests/) itself."""
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]
    assert f"python benchmarks/{script.parent.name}/{script.name}" in script.read_text()  # its command, as documented
