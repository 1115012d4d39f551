"""Lab tools stay out of the product: the package imports none of benchmarks/, tests/ or jobs/,
the test support imports no lab tool, each study under benchmarks/ has its README of findings
and a script that starts from there (benchmarks/README.md: what may import what), and the
replicator the benchmarks share makes its scaled data sets as promised."""

import ast
import os
import subprocess
import sys

import pytest

from benchmarks.support.replicate import replicate
from mnist37.sources.folder import list_split
from tests.conftest import PROJECT_ROOT

# benchmarks/support/ is what several studies share, not a study.
STUDIES = sorted(p for p in (PROJECT_ROOT / "benchmarks").iterdir()
                 if p.is_dir() and p.name not in ("__pycache__", "support"))
# The tests of the lab tools themselves; no other module of tests/ imports benchmarks/.
LAB_TOOL_TESTS = {"test_lab_tools.py", "test_benchmark_job.py", "test_gpu_check.py"}


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


def test_the_package_holds_no_lab_tool():
    """The benchmark, the replicator and the GPU check moved out: the studies to benchmarks/, the
    GPU check's correctness half and the test helpers to tests/."""
    lab_tools = {"benchmark.py", "replicate.py", "gpu_check.py"}
    assert not lab_tools & {p.name for p in (PROJECT_ROOT / "mnist37").iterdir()}


def test_the_tests_import_lab_tools_only_to_test_them():
    for path in sorted((PROJECT_ROOT / "tests").rglob("*.py")):
        if path.name in LAB_TOOL_TESTS:
            continue
        reached = {name for name in imported_modules(path) if name.split(".")[0] == "benchmarks"}
        assert not reached, f"{path.relative_to(PROJECT_ROOT)} imports {sorted(reached)}"


def test_every_study_has_its_readme_and_a_script():
    assert {"chunk_checksums", "chunk_writes", "formats_from_store", "object_requests", "jpeg_decode",
            "seed_vs_job"} <= {p.name for p in STUDIES}
    for study in STUDIES:
        assert "## Findings" in (study / "README.md").read_text(), study.name
        assert list(study.glob("*.py")), study.name


@pytest.mark.parametrize("script", sorted(p for study in STUDIES for p in study.glob("*.py")),
                         ids=lambda p: p.parent.name)
def test_each_probe_runs_from_its_study_folder(script, tmp_path):
    """--help from another folder: the script finds the checkout's mnist37 (and tests/) itself."""
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]
    assert f"python benchmarks/{script.parent.name}/{script.name}" in script.read_text()  # its command, as documented


# The replicator (benchmarks/support/replicate.py) that the seed-versus-job and JPEG job
# benchmarks scale their data sets with.


def test_replicas_are_hard_links_with_prefixed_names(image_folder, tmp_path):
    made = replicate(image_folder, tmp_path / "x3", 3, ["train", "valid"], ["3", "7"])
    assert made == {"files": 3 * 152, "reused": False, "linked": True}
    listing = list_split(tmp_path / "x3", "valid", ["3", "7"])
    assert listing.counts().tolist() == [36, 36]
    original = image_folder / "valid" / "3" / "4.png"
    for r in range(3):
        copy = tmp_path / "x3" / "valid" / "3" / f"r{r:03d}-4.png"
        assert os.path.samefile(copy, original)


def test_rerun_reuses_and_other_arguments_rebuild(image_folder, tmp_path):
    replicate(image_folder, tmp_path / "x", 2, ["train"], ["3"])
    assert replicate(image_folder, tmp_path / "x", 2, ["train"], ["3"]) == {"files": 128, "reused": True}
    assert replicate(image_folder, tmp_path / "x", 1, ["train"], ["3"])["files"] == 64
    assert len(os.listdir(tmp_path / "x" / "train" / "3")) == 64


def test_copies_must_be_positive(image_folder, tmp_path):
    with pytest.raises(ValueError, match="copies: expected a positive count, got 0"):
        replicate(image_folder, tmp_path / "x", 0, ["train"], ["3"])
