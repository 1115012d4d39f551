"""Side-by-side timing of fastbook's single-process baseline and the mnist37 job.

Each variant runs as its own process, alternating, so every figure comes from the same
machine state: (a) `seed` — jobs/seed.py, the book's code; (b) `cold` — jobs/evaluate.py with
its chunk folder emptied first; (c) `warm` — jobs/evaluate.py again, reusing (b)'s chunks.
Wall time is the whole process, `ray.init` and shutdown included.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("seed", "cold", "warm")


def run_seed(data: Path, classes: list[str]) -> dict:
    # Output goes to files, not pipes: wait4 (for the child's own peak RSS) must not wait on a
    # child blocked writing to a full pipe.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        clock = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "jobs/seed.py", "--data", str(data), "--classes", *classes],
                                cwd=PROJECT_ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - clock
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"seed failed:\n{stderr[-2000:]}")
    out = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "driver_peak_rss_bytes": usage.ru_maxrss * 1024, "worker_peak_rss_bytes": None,
            "correct": out["correct"]}


def run_mnist37(data: Path, out: Path, chunk_dir: Path, extra: list[str]) -> dict:
    argv = [sys.executable, "jobs/evaluate.py", "--data", str(data), "--out", str(out),
            "--chunk-dir", str(chunk_dir), *extra]
    clock = time.perf_counter()
    run = subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - clock
    if run.returncode != 0:
        raise RuntimeError(f"mnist37 failed:\n{run.stderr[-2000:]}")
    results = json.loads((out / "results.json").read_text())
    confusion = results["metrics"]["l1"]["confusion"]
    return {
        "wall_s": wall,
        "driver_peak_rss_bytes": results["memory"]["driver_peak_rss_bytes"],
        "worker_peak_rss_bytes": results["memory"]["worker_peak_rss_bytes"],
        "correct": {name: confusion[i][i] for i, name in enumerate(results["classes"])},
        "elapsed_s": results["elapsed_s"],
        "decode_images_per_s": results["throughput"]["decode_files_per_s"],
        "files_reused": results["shards"]["files_reused"],
        "prototypes_sha256": results["prototypes_sha256"],
        # Accuracies only: counts grow with N, accuracies must not.
        "metrics": {m: {k: r[k] for k in ("per_class", "mean_class_accuracy", "overall_accuracy")}
                    for m, r in results["metrics"].items()},
    }


def benchmark(data: Path, work: Path, repeats: int, classes: list[str], extra: list[str]) -> dict:
    """Alternate seed, cold, warm `repeats` times over the ImageFolder at `data`."""
    num_images = sum(len(os.listdir(data / split / c)) for split in ("train", "valid") for c in classes)
    chunk_dir, runs = work / "chunks", {v: [] for v in VARIANTS}
    for _ in range(repeats):
        runs["seed"].append(run_seed(data, classes))
        shutil.rmtree(chunk_dir, ignore_errors=True)
        runs["cold"].append(run_mnist37(data, work / "out-cold", chunk_dir, extra))
        runs["warm"].append(run_mnist37(data, work / "out-warm", chunk_dir, extra))
    return {"data": str(data), "num_images": num_images, "runs": runs, "summary": summarize(runs, num_images)}


def summarize(runs: dict, num_images: int) -> dict:
    def median(variant, key):
        values = [r[key] for r in runs[variant] if r.get(key) is not None]
        return statistics.median(values) if values else None

    seed_wall = median("seed", "wall_s")
    summary = {}
    for variant in VARIANTS:
        wall = median(variant, "wall_s")
        summary[variant] = {
            "median_wall_s": wall,
            "images_per_s": num_images / wall,
            "ratio_to_seed": wall / seed_wall,
            "driver_peak_rss_bytes": max(r["driver_peak_rss_bytes"] for r in runs[variant]),
            "worker_peak_rss_bytes": max((r["worker_peak_rss_bytes"] or 0 for r in runs[variant]), default=0) or None,
            "median_decode_images_per_s": median(variant, "decode_images_per_s"),
            "median_ray_init_s": statistics.median([r["elapsed_s"]["ray_init"] for r in runs[variant]])
            if variant != "seed" else None,
        }
    return summary


def format_summary(num_images: int, summary: dict) -> str:
    mib = 1 << 20
    lines = [f"{num_images:,} images",
             f"{'variant':<8} {'median wall s':>13} {'images/s':>10} {'x seed':>7} {'decode img/s':>12} "
             f"{'ray.init s':>10} {'driver RSS MiB':>14} {'worker RSS MiB':>14}"]
    for variant, s in summary.items():
        decode = f"{s['median_decode_images_per_s']:,.0f}" if s["median_decode_images_per_s"] else "-"
        init = f"{s['median_ray_init_s']:.2f}" if s["median_ray_init_s"] is not None else "-"
        worker = f"{s['worker_peak_rss_bytes'] / mib:.0f}" if s["worker_peak_rss_bytes"] else "-"
        lines.append(f"{variant:<8} {s['median_wall_s']:>13.2f} {s['images_per_s']:>10,.0f} "
                     f"{s['ratio_to_seed']:>7.3f} {decode:>12} {init:>10} "
                     f"{s['driver_peak_rss_bytes'] / mib:>14.0f} {worker:>14}")
    return "\n".join(lines)
