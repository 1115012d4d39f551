"""report.html: self-contained, and what a real headless browser shows of it."""

import json
import re
import shutil
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import mnist37
from mnist37.report import write_outputs
from tests.conftest import PROJECT_ROOT, make_image_folder
from tests.many_classes import synthesize
from tests.test_evaluate_job import run_job

pytestmark = pytest.mark.ray  # the job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Screenshots are kept where a person can look at them after the run.
ARTIFACTS = PROJECT_ROOT / "runs" / "test-output"


@pytest.fixture(scope="module")
def report(ray_local, tmp_path_factory):
    """The job on three classes with sure misclassifications, in this process on the session's
    Ray (mnist37.evaluate runs the job's main): (its --out folder, results.json)."""
    data = make_image_folder(tmp_path_factory.mktemp("r") / "data",
                             {"train": {"3": 40, "5": 40, "7": 40}, "valid": {"3": 15, "5": 15, "7": 15}},
                             shape=(28, 28), seed=3)
    # Noisy copies of another class's pattern: sure misclassifications to show.
    for i, (src, dst) in enumerate([("7", "3"), ("5", "3"), ("3", "7")]):
        for j in range(3):
            shutil.copy(data / "train" / src / f"{j}.png", data / "valid" / dst / f"x{i}{j}.png")
    out = tmp_path_factory.mktemp("out")
    ran = mnist37.evaluate(data, out=out, classes="3 5 7", report_examples=2, chunk_dir=str(out / "chunks"))
    return out, ran.results


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


def test_a_job_writes_every_file_results_json_names_and_docs_name_every_key(report):
    out, results = report
    assert all((out / name).is_file() for name in results["outputs"])
    docs = (PROJECT_ROOT / "docs" / "output.md").read_text()
    for key in results:
        assert f"| `{key}" in docs or f"`{key}." in docs, key
    for metric, m in results["metrics"].items():
        for key in m:
            assert f"`metrics.<metric>.{key}`" in docs or f"`.{key}`" in docs or f"metrics.<l1\\|l2>.{key}" in docs, key
        np.testing.assert_array_equal(np.load(out / m["confusion_file"]), np.array(m["confusion"]))
        rows = pq.read_table(out / m["examples_file"]).to_pylist()
        inline = [dict(e, side=side) for sides in results["examples"][metric].values()
                  for side, kept in sides.items() for e in kept]
        assert [(r["path"], r["side"], r["predicted"]) for r in rows] == [
            (e["path"], e["side"], e["predicted"]) for e in inline]


@pytest.fixture(scope="module")
def many_classes_job(tmp_path_factory):
    """A real job beyond report.INLINE_CLASSES: 60 classes of 8x8 images."""
    names = [f"c{i:02d}" for i in range(60)]
    data = make_image_folder(tmp_path_factory.mktemp("m") / "data",
                             {"train": dict.fromkeys(names, 3), "valid": dict.fromkeys(names, 2)}, seed=5)
    out = tmp_path_factory.mktemp("out")
    run = run_job("--data", str(data), "--out", str(out), "--classes", "all", "--chunk-dir", str(out / "chunks"))
    assert run.returncode == 0, run.stderr
    return out, json.loads((out / "results.json").read_text()), run.stdout


def test_a_job_beyond_50_classes_prints_a_short_table_and_puts_the_arrays_in_files(many_classes_job):
    out, results, printed = many_classes_job
    assert len(results["classes"]) == 60 and "examples" not in results
    assert "the 15 worst of 60 classes by l1:" in printed and "c59  (n=2)" in (out / "table.txt").read_text()
    assert len(printed.splitlines()) < 60
    for metric, m in results["metrics"].items():
        assert "confusion" not in m
        confusion = np.load(out / m["confusion_file"])
        assert confusion.shape == (60, 60) and confusion.sum() == m["total"] == 120
        assert np.trace(confusion) == m["correct"]
        assert pq.read_table(out / m["examples_file"]).num_rows > 0
    page = (out / "report.html").read_text()
    assert page.count('<img class="confusion"') == 2 and "<table class='confusion'>" not in page


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def render(page, tmp_path, height: int) -> tuple[str, np.ndarray, float]:
    """Chromium's DOM of `page` and a screenshot 1200 wide; the seconds the DOM dump took."""
    shot = tmp_path / "report.png"
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    clock = time.perf_counter()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    elapsed_s = time.perf_counter() - clock
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", f"--window-size=1200,{height}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        assert image.size == (1200, height)
        pixels = np.asarray(image.convert("L"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / f"{page.parent.name}.png")
    print(f"screenshot: {ARTIFACTS / f'{page.parent.name}.png'}")
    return dom.stdout, pixels, elapsed_s


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, results = report
    dom, pixels, elapsed_s = render(out / "report.html", tmp_path, 1800)
    print(f"3-class report.html: Chromium's DOM dump (start included) took {elapsed_s:.2f} s")
    assert "mean of classes" in dom and "Confusion, l2" in dom
    assert pixels.std() > 10  # a page was drawn, not a blank one


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
def test_a_1000_class_report_renders_in_headless_chromium(tmp_path_factory, tmp_path):
    outcome = synthesize(1000)
    out = tmp_path_factory.mktemp("report-1000-classes")
    write_outputs(out, outcome.results, outcome.prototypes, outcome.examples, outcome.confusions)
    dom, pixels, elapsed_s = render(out / "report.html", tmp_path, 3000)
    size_mb = (out / "report.html").stat().st_size / (1 << 20)
    print(f"1,000-class report.html ({size_mb:.2f} MB): Chromium's DOM dump (start included) took {elapsed_s:.2f} s")
    assert "The 15 worst classes by l1" in dom and "Most confused, l2" in dom and "Confusion, l2" in dom
    assert dom.count("<img") >= 2 + 30  # the two matrices and the prototypes of the worst and best
    assert pixels.std() > 10
