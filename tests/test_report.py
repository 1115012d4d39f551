"""report.html: self-contained, and what a real headless browser shows of it."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT_ROOT, make_image_folder
from tests.test_evaluate_job import run_job

pytestmark = pytest.mark.ray  # the job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Screenshots are kept where a person can look at them after the run.
ARTIFACTS = PROJECT_ROOT / "runs" / "test-output"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    data = make_image_folder(tmp_path_factory.mktemp("r") / "data",
                             {"train": {"3": 40, "5": 40, "7": 40}, "valid": {"3": 15, "5": 15, "7": 15}},
                             shape=(28, 28), seed=3)
    # Noisy copies of another class's pattern: sure misclassifications to show.
    for i, (src, dst) in enumerate([("7", "3"), ("5", "3"), ("3", "7")]):
        for j in range(3):
            shutil.copy(data / "train" / src / f"{j}.png", data / "valid" / dst / f"x{i}{j}.png")
    out = tmp_path_factory.mktemp("out")
    run = run_job("--data", str(data), "--out", str(out), "--classes", "3", "5", "7", "--report-examples", "2",
                  "--chunk-dir", str(out / "chunks"))
    assert run.returncode == 0, run.stderr
    return out, json.loads((out / "results.json").read_text())


def test_report_is_self_contained_and_complete(report):
    out, results = report
    page = (out / "report.html").read_text()
    assert "report.html" in results["outputs"]
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing fetched from disk or network
    assert page.count("alt=\"prototype ") == 3
    assert page.count("<table class='confusion'>") == 2
    for metric in ("l1", "l2"):
        for name in ("3", "5", "7"):
            assert f"{results['metrics'][metric]['per_class'][name]:.4f}" in page
    examples = results["examples"]["l1"]
    shown = [e for sides in examples.values() for side in sides.values() for e in side]
    assert shown and all(e["margin"] >= 0 and e["predicted"] != int(c)
                         for c, sides in examples.items() for side in sides.values() for e in side)
    for e in shown:
        assert e["path"] in page
    closest, farthest = examples["0"]["closest"], examples["0"]["farthest"]
    assert [e["margin"] for e in closest] == sorted(e["margin"] for e in closest)
    assert closest[0]["margin"] <= farthest[0]["margin"] and len(closest) <= 2


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, results = report
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "report.html").as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "mean of classes" in dom.stdout and "Confusion, l2" in dom.stdout
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1800", url],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert image.size == (1200, 1800) and pixels.std() > 10  # a page was drawn, not a blank one
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    print(f"screenshot: {ARTIFACTS / 'report.png'}")
