"""CI never skips silently (tests/conftest.py): under CI a test that would skip for want of what
CI must provide fails with its reason; device tests (`cuda`, `no_cuda`) skip everywhere and
are counted on a line of their own. Checked on a small test file run by pytest in a
subprocess, with this project's settings and conftest."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from tests.conftest import PROJECT_ROOT, in_ci

CASES = '''
import pytest

def test_a_runtime_skip():
    pytest.skip("cannot mount a tmpfs here (needs root)")

@pytest.fixture
def hosts():
    pytest.skip("test hosts need `nsenter`, not found on PATH")

def test_a_fixture_skip(hosts):
    pass

@pytest.mark.skipif(True, reason="no Chromium here")
def test_a_skipif_mark():
    pass

@pytest.mark.cuda
def test_needs_cuda():
    pass

@pytest.mark.no_cuda
def test_without_cuda():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_an_xfail():
    assert False

def test_passes():
    pass
'''


def run_cases(tmp_path, ci: str | None) -> tuple[dict[str, tuple[str, str]], str]:
    """Each case's outcome ('passed', 'failed', 'skipped') and message, and pytest's output."""
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    junit = tmp_path / "junit.xml"
    # This project's pytest settings (pyproject.toml: -ra, strict markers) and conftest, loaded as a plugin.
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(PROJECT_ROOT / "pyproject.toml"), "-p", "tests.conftest",
                          "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-n", "0", f"--junitxml={junit}",
                          str(tmp_path / "test_cases.py")], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        verdict = next(iter(case), None)
        kind = "passed" if verdict is None else {"failure": "failed", "error": "failed"}.get(verdict.tag, verdict.tag)
        outcomes[case.get("name")] = (kind, "" if verdict is None else verdict.get("message", ""))
    return outcomes, run.stdout + run.stderr


def test_under_ci_a_skip_fails_with_its_reason(tmp_path):
    outcomes, output = run_cases(tmp_path, "true")
    prefix = "CI must provide what this test needs, or the test must not skip: "
    for case, reason in (("test_a_runtime_skip", "cannot mount a tmpfs here (needs root)"),
                         ("test_a_fixture_skip", "test hosts need `nsenter`, not found on PATH"),  # an error in setup
                         ("test_a_skipif_mark", "no Chromium here")):
        kind, message = outcomes[case]
        assert kind == "failed" and prefix + reason in message, (case, message, output)
    assert outcomes["test_an_xfail"][0] == "skipped" and outcomes["test_passes"] == ("passed", "")
    # The device tests: one of the two runs, the other skips, CI or not.
    cuda = torch.cuda.is_available()
    skipped = "test_without_cuda" if cuda else "test_needs_cuda"
    reason = "without CUDA only: a CUDA device is visible" if cuda else "CUDA only: no CUDA device visible"
    assert outcomes[skipped] == ("skipped", reason)
    assert outcomes["test_needs_cuda" if cuda else "test_without_cuda"] == ("passed", "")
    assert f"device tests skipped (allowed, CI included): 1 ({reason})" in output


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_the_same_tests_skip(tmp_path, ci):
    outcomes, output = run_cases(tmp_path, ci)
    assert outcomes["test_a_runtime_skip"] == ("skipped", "cannot mount a tmpfs here (needs root)"), output
    assert outcomes["test_a_fixture_skip"] == ("skipped", "test hosts need `nsenter`, not found on PATH")
    assert outcomes["test_a_skipif_mark"] == ("skipped", "no Chromium here")
    assert "device tests skipped (allowed, CI included): 1 (" in output


def test_what_counts_as_ci(monkeypatch):
    for value, expected in (("true", True), ("1", True), ("yes", True), ("", False), ("false", False),
                            ("0", False), ("No", False)):
        monkeypatch.setenv("CI", value)
        assert in_ci() is expected, value
    monkeypatch.delenv("CI")
    assert in_ci() is False
