"""What per-image predictions and top-k cost the classify stage, and how fast `mnist37.load` reads them.

    python benchmarks/predictions/predictions_benchmark.py --data ../shared/data/mnist_png.tgz --repeats 3 \\
        -- --classes all --train-split testing --eval-split training

The job (`python -m mnist37.job`, a process each) runs on one `ray start --head` on loopback
(tests.ray_heads.running_cluster, as jobs/benchmark.py --cluster), its chunks decoded once
before the timed runs, so each timed run decodes nothing and its classify stage
(results.json's `elapsed_s.classify`) is what the variants change. The variants take turns,
`--repeats` rounds:

    none-top0   --predictions none  --top-k 0     (the job before predictions and top-k)
    none        --predictions none  --top-k 5     (top-5 alone)
    brief       --predictions brief --top-k 5     (the default at 10 classes)
    full        --predictions full  --top-k 5

Printed: per variant the median classify seconds, the ratio to `none` (what writing predictions
adds) and to `none-top0`, the predictions' rows and MiB, the median seconds of
`mnist37.load(out).predictions` in this process, and the write share: the classify tasks'
seconds building and publishing the files (results.json's `predictions.write_s`) over their
whole seconds (`classify_elapsed_s`), both measured inside the same tasks, so a loaded
machine moves them together. `--task-repeats N` then times a classify task's steps alone in
this process (CPU seconds, one thread) on each evaluation chunk: classify_images without and
with top-5, and writing the chunk's predictions file, brief and full. `--load-copies K` then times `load` on K
copies of the last brief run's files listed in one results.json (K x the rows: 24 x 60,000 =
1.44M rows), the size the issue names. Figures: this folder's README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout's root: benchmarks, tests, mnist37

from tests.ray_heads import running_cluster  # noqa: E402

VARIANTS = {
    "none-top0": ["--predictions", "none", "--top-k", "0"],
    "none": ["--predictions", "none", "--top-k", "5"],
    "brief": ["--predictions", "brief", "--top-k", "5"],
    "full": ["--predictions", "full", "--top-k", "5"],
}


def run_job(data: str, out: Path, chunk_dir: Path, address: str, flags: list[str]) -> dict:
    argv = [sys.executable, "-m", "mnist37.job", "--data", data, "--out", str(out), "--chunk-dir", str(chunk_dir),
            "--ray-address", address, *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(argv, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the job failed:\n{run.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())


def time_load(out: Path) -> tuple[float, int]:
    import mnist37

    clock = time.perf_counter()
    table = mnist37.load(out).predictions
    return time.perf_counter() - clock, table.num_rows


def copies_of(out: Path, target: Path, copies: int) -> Path:
    """A folder whose results.json lists `copies` copies of `out`'s predictions files."""
    shutil.rmtree(target, ignore_errors=True)
    (target / "predictions").mkdir(parents=True)
    results = json.loads((out / "results.json").read_text())
    files = []
    for name in ["prototypes.npy", *(f"confusion_{m}.npy" for m in results["metrics"])]:
        shutil.copy(out / name, target / name)
    for k in range(copies):
        for f in results["predictions"]["files"]:
            name = f"copy{k:03d}-{f['name']}"
            shutil.copy(out / "predictions" / f["name"], target / "predictions" / name)
            files.append({**f, "name": name})
    results["predictions"] |= {"files": files, "rows": sum(f["rows"] for f in files)}
    (target / "results.json").write_text(json.dumps(results))
    return target


def task_level(chunks: list[Path], prototypes_file: Path, work: Path, repeats: int) -> dict:
    """A classify task's steps alone, in this process on one thread (as a Ray task runs them),
    in CPU seconds of this process (time.process_time: what other processes on a loaded machine
    move far less than wall seconds), per evaluation chunk, `repeats` rounds: classify_images
    without and with top-5, then the chunk's predictions file, brief and full (built and
    published: predictions.write_chunk). Returns step -> median CPU seconds per chunk."""
    import numpy as np
    import torch

    from mnist37.chunks import read_chunk
    from mnist37.classify import classify_images
    from mnist37.predictions import make_request, write_chunk

    torch.set_num_threads(1)
    prototypes = np.load(prototypes_file)
    classes = [str(c) for c in range(len(prototypes))]
    seconds: dict[str, list[float]] = {"classify top-0": [], "classify top-5": [], "write brief": [], "write full": []}
    for round_ in range(repeats):
        for chunk in chunks:
            read = read_chunk(str(chunk))
            for k in ((0, 5) if round_ % 2 == 0 else (5, 0)):
                clock = time.process_time()
                done = classify_images(read.images, read.class_indices, prototypes, ["l1", "l2"], "cpu", k)
                seconds[f"classify top-{k}"].append(time.process_time() - clock)
                if k:
                    found = done
            arrays = [{m: t.numpy() for m, t in kind.items()} for kind in (found.predicted, found.distances, found.top_k)]
            for columns in (("brief", "full") if round_ % 2 == 0 else ("full", "brief")):
                request = make_request(columns, work / "task-out", read.split, classes, ["l1", "l2"], 5, prototypes, True)
                clock = time.process_time()
                write_chunk(request.for_chunk(0), "x", read.paths, np.asarray(read.class_indices), *arrays)
                seconds[f"write {columns}"].append(time.process_time() - clock)
    return {step: statistics.median(t) for step, t in seconds.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="what the job's --data takes")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every variant, taking turns")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--load-copies", type=int, default=0, metavar="K",
                        help="then time load on K copies of the brief run's files")
    parser.add_argument("--task-repeats", type=int, default=0, metavar="N",
                        help="then time classify_chunk alone on each evaluation chunk, N rounds")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-predictions"))
    parser.add_argument("job_args", nargs="*", help="after --: the job's flags for every run")
    args = parser.parse_args(argv)
    work = args.work.absolute()
    if "RAY_AUTH_MODE" not in os.environ:  # the head and every job share a token of this run's own (as tests/conftest.py)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    chunks = work / "chunks"
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    with running_cluster(work / "ray-start.log") as address:
        run_job(args.data, work / "out-warmup", chunks, address, [*args.job_args, *VARIANTS["none"]])
        for round_ in range(args.repeats):
            order = args.variants if round_ % 2 == 0 else args.variants[::-1]
            for variant in order:
                out = work / f"out-{variant}"
                results = run_job(args.data, out, chunks, address, [*args.job_args, *VARIANTS[variant]])
                assert results["shards"]["files_decoded"] == 0, "a timed run decoded: chunks were not reused"
                tasks_s = sum(s.get("classify_elapsed_s", 0) for s in results["shards"]["per_shard"])
                record = {"classify_s": results["elapsed_s"]["classify"], "rows": results["predictions"]["rows"],
                          "num_bytes": results["predictions"]["num_bytes"],
                          # the share of the classify tasks' own seconds spent on the predictions files,
                          # both measured in the same tasks at the same moments: what the machine's
                          # load does to one it does to the other
                          "write_share": results["predictions"]["write_s"] / tasks_s}
                if results["predictions"]["columns"] != "none":
                    record["load_s"], rows = time_load(out)
                    assert rows == record["rows"]
                runs[variant].append(record)
                print(variant, json.dumps(record), flush=True)
    summary = {}
    for variant, records in runs.items():
        if not records:
            continue
        summary[variant] = {key: statistics.median(r[key] for r in records) for key in records[0]}
    base, bare = summary.get("none", {}).get("classify_s"), summary.get("none-top0", {}).get("classify_s")
    print(f"\n{'variant':<10} {'classify s':>10} {'x none':>7} {'x none-top0':>11} {'rows':>9} {'MiB':>7} "
          f"{'load s':>7} {'write share':>11}")
    for variant, s in summary.items():
        ratio = f"{s['classify_s'] / base:.3f}" if base else "-"
        ratio0 = f"{s['classify_s'] / bare:.3f}" if bare else "-"
        load = f"{s['load_s']:.3f}" if "load_s" in s else "-"
        print(f"{variant:<10} {s['classify_s']:>10.2f} {ratio:>7} {ratio0:>11} {s['rows']:>9,.0f} "
              f"{s['num_bytes'] / 2**20:>7.2f} {load:>7} {s['write_share']:>11.4f}")
    report = {"runs": runs, "summary": summary, "job_args": args.job_args, "repeats": args.repeats}
    if args.load_copies and "brief" in runs:
        many = copies_of(work / "out-brief", work / f"load-x{args.load_copies}", args.load_copies)
        times = []
        for _ in range(3):
            seconds, rows = time_load(many)
            times.append(seconds)
        report["load_copies"] = {"copies": args.load_copies, "rows": rows, "median_s": statistics.median(times),
                                 "times_s": times}
        print(f"\nmnist37.load(...).predictions of {rows:,} rows ({args.load_copies} copies of the brief run's "
              f"files): median {statistics.median(times):.3f} s of {', '.join(f'{t:.3f}' for t in times)}")
    if args.task_repeats:
        split = json.loads((work / "out-warmup" / "results.json").read_text())["config"]["eval_split"]
        chunk_files = sorted((chunks / split).glob("*.arrow"))
        medians = task_level(chunk_files, work / "out-warmup" / "prototypes.npy", work, args.task_repeats)
        report["task_level"] = medians
        base = medians["classify top-5"]
        print(f"\na classify task's steps alone, one thread, median CPU s per chunk ({len(chunk_files)} chunks x "
              f"{args.task_repeats} rounds), and as a share of classify top-5: " + "; ".join(
                  f"{step} {t:.4f} ({t / base:.3f})" for step, t in medians.items()))
    (work / "predictions_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
