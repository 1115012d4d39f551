"""jobs/benchmark.py end to end on a tiny data set: it runs all three variants and its checks hold."""

import json
import subprocess
import sys

from tests.conftest import PROJECT_ROOT


def test_benchmark_runs_seed_cold_and_warm_side_by_side(image_folder, tmp_path):
    run = subprocess.run(
        [sys.executable, "jobs/benchmark.py", "--data", str(image_folder), "--copies", "1", "2",
         "--repeats", "1", "--work", str(tmp_path / "bench"), "--json", str(tmp_path / "bench.json"),
         "--", "--shard-size", "16"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["evaluate_args"] == ["--shard-size", "16"]
    assert set(report["scales"]) == {"1", "2"}
    assert report["scales"]["2"]["num_images"] == 2 * 152
    for scale in report["scales"].values():
        summary = scale["summary"]
        assert set(summary) == {"seed", "cold", "warm"}
        assert summary["seed"]["ratio_to_seed"] == 1.0
        assert summary["warm"]["worker_peak_rss_bytes"] > 0 and summary["seed"]["worker_peak_rss_bytes"] is None
        assert scale["runs"]["cold"][0]["files_reused"] == 0
        assert scale["runs"]["warm"][0]["files_reused"] == scale["num_images"]
    assert report["checks"] == {
        "prototypes_identical_across_scales_and_runs": True,
        "accuracies_identical_across_scales_and_runs": True,
        "seed_and_mnist37_agree_per_scale": {"1": True, "2": True},
    }
    for line in ("N = 1: 152 images", "N = 2: 304 images", "x seed", "warm"):
        assert line in run.stdout
