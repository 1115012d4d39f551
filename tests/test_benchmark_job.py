"""jobs/benchmark.py (benchmarks/seed_vs_job/, a lab tool) end to end on a tiny data set: it runs
every variant and its checks hold; its --help lists its own flags. One of the two test modules
that may import a lab tool (tests/test_lab_tools.py checks that the others do not)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.seed_vs_job.seed_vs_job_benchmark import STAGES, parse_args
from tests.conftest import PROJECT_ROOT
from tests.test_cli import flat, help_of


def test_the_benchmarks_help_lists_its_own_groups_choices_and_defaults(capsys):
    text = help_of(parse_args, capsys)
    for group in ("data:", "runs:", "output:"):
        assert f"\n{group}\n" in text
    assert "--formats [{idx,parquet,tar} ...]" in flat(text)
    for default in ("(default: 3)", "(default: 3 7)", "(default: runs/bench/benchmark.json)"):
        assert default in flat(text)
    assert "--ray-address" not in text and "--metrics" not in text


@pytest.mark.ray  # the job, several times
def test_benchmark_runs_seed_cold_and_warm_side_by_side(image_folder, tmp_path):
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.exists() else None
    run = subprocess.run(
        [sys.executable, "jobs/benchmark.py", "--data", str(image_folder), "--copies", "2",
         "--repeats", "1", "--work", str(tmp_path / "bench"), "--json", str(tmp_path / "bench.json"),
         "--cluster", "--unverified", "--formats", "tar", "--shard-size", "100",
         "--shard-cpu", "2", "--", "--shard-size", "16"],
        # Each Ray it starts (the runs' own, its head) offers one CPU, as each suite process's
        # share of the session's Ray does (tests/conftest.py, ray_cpus_each): a run starts one
        # worker process, not one per core (each imports torch, ~1-2 CPU-seconds).
        cwd=PROJECT_ROOT, env={**os.environ, "RAY_OVERRIDE_RESOURCES": '{"CPU": 1}'},
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["evaluate_args"] == ["--shard-size", "16"] and report["cluster"] is True
    assert set(report["scales"]) == {"2"}  # one scale: replication itself is tests/test_lab_tools.py's
    assert report["scales"]["2"]["num_images"] == 2 * 152
    for scale in report["scales"].values():
        summary = scale["summary"]
        # One format: the others take the same path through the benchmark (each format's
        # conversion and job are tests/test_convert.py's and tests/test_formats_mnist.py's).
        assert set(summary) == {"seed", "cold", "warm", "warm-unverified", "cluster-cold", "cluster-warm", "tar-cold"}
        assert summary["seed"]["ratio_to_seed"] == 1.0
        assert summary["warm"]["worker_peak_rss_bytes"] > 0 and summary["seed"]["worker_peak_rss_bytes"] is None
        for prefix in ("", "cluster-"):
            assert scale["runs"][prefix + "cold"][0]["files_reused"] == 0
            assert scale["runs"][prefix + "warm"][0]["files_reused"] == scale["num_images"]
        assert scale["runs"]["warm-unverified"][0]["files_reused"] == scale["num_images"]
        assert set(scale["conversion_s"]) == {"tar"}
        # decode_shard alone, per image, for the folder and each converted format.
        assert set(scale["shard_cpu_us_per_image"]) == {"folder", "tar"}
        assert all(0 < us < 10_000 for us in scale["shard_cpu_us_per_image"].values())
        assert scale["runs"]["tar-cold"][0]["files_reused"] == 0
        # Connecting to the running head is not starting Ray: a fraction of a local start.
        assert summary["cluster-warm"]["median_ray_init_s"] < summary["warm"]["median_ray_init_s"]
        # Where each run's wall time went: every stage, none negative, adding up to the wall
        # (one run per variant: its medians are that run's figures).
        assert summary["seed"]["median_stage_s"] is None
        for variant in set(summary) - {"seed"}:
            stages = summary[variant]["median_stage_s"]
            assert list(stages) == list(STAGES) and min(stages.values()) >= 0, (variant, stages)
            assert sum(stages.values()) == pytest.approx(summary[variant]["median_wall_s"])
            assert 0 < stages["start"] < stages["ray_init"] + stages["exit"]
    assert report["checks"] == {
        "prototypes_identical_across_scales_and_runs": True,
        "accuracies_identical_across_scales_and_runs": True,
        "seed_and_mnist37_agree_per_scale": {"2": True},
    }
    assert sorted(p.name for p in (tmp_path / "bench" / "x2" / "data-tar").glob("*.tar")) == \
        ["train-000000.tar", "train-000001.tar", "train-000002.tar", "valid-000000.tar"]  # 256 + 48 images
    for line in ("N = 2: 304 images", "x seed", "warm", "cluster-warm", "tar-cold", "tar: converted from the folder in",
                 "decode_shard alone, CPU per image (one process, no Ray): folder ",
                 "where the wall time goes (median s)", " ".join(f"{stage:>8}" for stage in STAGES)):
        assert line in run.stdout
    # Each scale's head is gone with it: nothing listens on its GCS port any more, and it
    # left no "current cluster" behind for a later ray.init() to join (another session's
    # `ray start` on this machine may have written one meanwhile: not naming our heads' ports).
    after = current.read_text() if current.exists() else None
    ports = {address.rpartition(":")[2] for scale in report["scales"].values() for address in scale["ray_addresses"]}
    assert after == before or after.strip().rpartition(":")[2] not in ports, (before, after, ports)
    for scale in report["scales"].values():
        assert len(scale["ray_addresses"]) == 1  # one head per round
        host, port = scale["ray_addresses"][0].split(":")
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect((host, int(port)))
