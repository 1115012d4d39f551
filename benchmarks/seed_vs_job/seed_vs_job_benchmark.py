"""Side-by-side timing of fastbook's single-process baseline and the mnist37 job.

    python benchmarks/seed_vs_job/seed_vs_job_benchmark.py --data ../shared/data/mnist_sample.tgz --copies 1 10 100
    python jobs/benchmark.py --data ../shared/data/mnist_sample.tgz --copies 1 10 100   # the same, README's command

Each variant runs as its own process, alternating, so every figure comes from the same
machine state: (a) `seed` — mnist37.fastbook, the book's code; (b) `cold` — mnist37.job (jobs/evaluate.py) with
its chunk folder emptied first; (c) `warm` — the same again, reusing (b)'s chunks.
Wall time is the whole process, `ray.init` and shutdown included: these two start and stop a
local Ray inside the job, as on a laptop.

With `cluster=True` two more variants run the same job the way it runs on a cluster, where
Ray is already up: `cluster-cold` and `cluster-warm` connect (`--ray-address`) to a
`ray start --head` that the benchmark starts before them and stops after them, in each round
(`tests.ray_heads.running_cluster`, the test suite's own head: lab tools may import the test
support, benchmarks/README.md). Their wall time is still the whole driver process, connecting
included; starting the cluster is not.

With `formats`, the same images also run cold from each container format (`tar-cold`,
`parquet-cold`, `idx-cold`): the scaled folder is converted once (mnist37.convert, timed and
reported apart, not part of any run) and every round empties that format's chunk folder first.

A lab tool, not the product (not installed with mnist37): it runs from a checkout, putting the
checkout's root on sys.path, and times that checkout's mnist37. Findings: this folder's README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's root: benchmarks, tests, mnist37

import mnist37  # noqa: E402
from benchmarks.support.cli import exit_status  # noqa: E402
from benchmarks.support.processes import fresh_process  # noqa: E402
from benchmarks.support.replicate import replicate  # noqa: E402
from mnist37 import sources  # noqa: E402
from mnist37.locate import find_root  # noqa: E402
from tests.ray_heads import running_cluster  # noqa: E402

log = logging.getLogger(__name__)

# The folder that holds the mnist37 package this benchmark imported (a checkout or site-packages):
# the runs below start `python -m mnist37.job` / `-m mnist37.fastbook` with it on their path.
PACKAGE_PARENT = Path(mnist37.__file__).resolve().parent.parent


def _module_env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{PACKAGE_PARENT}{os.pathsep}{path}" if path else str(PACKAGE_PARENT)}


VARIANTS = ("seed", "cold", "warm")
CLUSTER_VARIANTS = ("cluster-cold", "cluster-warm")
# Container formats the benchmark converts the scaled folder to: variant prefix -> converter
# target, from the sources table.
FORMATS = {f.short: name for name, f in sources.FORMATS.items() if name in sources.TARGETS}


def run_seed(data: Path, classes: list[str]) -> dict:
    # Output goes to files, not pipes: wait4 (for the child's own peak RSS) must not wait on a
    # child blocked writing to a full pipe.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        clock = time.perf_counter()
        proc = subprocess.Popen(fresh_process([sys.executable, "-m", "mnist37.fastbook", "--data", str(data),
                                               "--classes", *classes]),
                                env=_module_env(), stdout=out, stderr=err, text=True)
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
    argv = [sys.executable, "-m", "mnist37.job", "--data", str(data), "--out", str(out),
            "--chunk-dir", str(chunk_dir), *extra]
    clock = time.perf_counter()
    run = subprocess.run(fresh_process(argv), env=_module_env(), capture_output=True, text=True)
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


def converted(data: Path, work: Path, fmt: str, classes: list[str], shard_size: int) -> tuple[Path, float | None]:
    """The ImageFolder at `data` as format `fmt` (a FORMATS key) under `work`, converted once:
    (its folder, conversion seconds, or None when an earlier benchmark's copy was reused)."""
    from mnist37.config import load
    from mnist37.convert import convert

    dest = work / f"data-{fmt}"
    marker = work / f".data-{fmt}.done"
    stamp = f"{data.resolve()}\n{(data / '.mnist37-replica').read_text() if (data / '.mnist37-replica').exists() else ''}" \
            f"{','.join(classes)}\n{shard_size}\n"
    if dest.is_dir() and marker.is_file() and marker.read_text() == stamp:
        return dest, None
    shutil.rmtree(dest, ignore_errors=True)
    clock = time.perf_counter()
    convert(load(data=str(data), classes=classes, shard_size=shard_size, chunk_dir=str(work / "convert-chunks")),
            dest, FORMATS[fmt])
    seconds = time.perf_counter() - clock
    marker.write_text(stamp)
    return dest, seconds


def benchmark(data: Path, work: Path, repeats: int, classes: list[str], extra: list[str],
              cluster: bool = False, formats: list[str] = (), shard_size: int = 8192,
              unverified: bool = False, seed: bool = True, shard_cpu_shards: int = 0) -> dict:
    """Alternate seed, cold, warm (and, with `cluster`, cluster-cold and cluster-warm; with
    `formats`, <format>-cold for each; with `unverified`, warm-unverified: the warm run with
    verify_chunks = false, right after warm) `repeats` times over the ImageFolder at `data`;
    then, with `shard_cpu_shards`, `shard_cpu` over the folder and each format."""
    num_images = sum(len(os.listdir(data / split / c)) for split in ("train", "valid") for c in classes)
    variants = (VARIANTS[VARIANTS.index("seed") + (0 if seed else 1):] + (("warm-unverified",) if unverified else ()) + (CLUSTER_VARIANTS if cluster else ())
                + tuple(f"{f}-cold" for f in formats))
    runs = {v: [] for v in variants}
    addresses = []
    sources, conversion_s = {}, {}
    for fmt in formats:
        sources[fmt], conversion_s[fmt] = converted(data, work, fmt, classes, shard_size)

    def cold_then_warm(prefix: str, address: str, round_: int) -> None:
        chunk_dir = work / f"{prefix}chunks"
        shutil.rmtree(chunk_dir, ignore_errors=True)
        warm = ["warm", "warm-unverified"] if unverified and not prefix else ["warm"]
        if round_ % 2:  # the run right after cold pays for its leftovers: take turns
            warm.reverse()
        for variant in ["cold", *warm]:
            flags = ["--verify-chunks", "false"] if variant == "warm-unverified" else []
            runs[prefix + variant].append(run_mnist37(data, work / f"out-{prefix}{variant}", chunk_dir,
                                                      [*extra, "--ray-address", address, *flags]))

    for round_ in range(repeats):
        if seed:
            runs["seed"].append(run_seed(data, classes))
        # `local`: the job's own Ray. The head is up only for the cluster runs: with another
        # Ray on the machine a local ray.init() takes ~7.6 s here instead of ~2.7 s.
        cold_then_warm("", "local", round_)
        for fmt in formats:
            chunk_dir = work / f"{fmt}-chunks"
            shutil.rmtree(chunk_dir, ignore_errors=True)
            runs[f"{fmt}-cold"].append(run_mnist37(sources[fmt], work / f"out-{fmt}-cold", chunk_dir,
                                                   [*extra, "--ray-address", "local"]))
        if cluster:
            with running_cluster(work / "ray-start.log") as address:
                addresses.append(address)
                cold_then_warm("cluster-", address, round_)
    per_image = shard_cpu({"folder": data, **sources}, work, classes, shard_size, shard_cpu_shards) \
        if shard_cpu_shards else {}
    return {"data": str(data), "num_images": num_images, "ray_addresses": addresses, "runs": runs,
            "conversion_s": conversion_s, "summary": summarize(runs, num_images), "shard_cpu_us_per_image": per_image}


def shard_cpu(sources: dict[str, Path], work: Path, classes: list[str], shard_size: int, shards: int) -> dict:
    """CPU time of `shards.decode_shard` alone, in this process, per image: `shards` shards of
    each source (the folder and each format), taking turns, after one shard each to warm up
    (imports, first allocations). No Ray, no other process: what a decode task itself costs,
    apart from the machine's noise around whole jobs. {source: median µs an image}."""
    from mnist37.config import load
    from mnist37.locate import locate
    from mnist37.plan import plan
    from mnist37.shards import decode_shard

    plans = {name: plan(locate(load(data=str(data), classes=classes, shard_size=shard_size,
                                    chunk_dir=str(work / f"shard-cpu-chunks/{name}"))))
             for name, data in sources.items()}
    shutil.rmtree(work / "shard-cpu-chunks", ignore_errors=True)
    seconds = {name: [] for name in plans}
    for turn in range(shards + 1):
        for name, planned in plans.items():
            shard = planned.shards[turn % len(planned.shards)]
            clock = time.process_time()
            done = decode_shard(shard, planned.root, planned.chunk_dir, dataclasses.replace(planned.decoding, reuse=False), True)
            if turn:
                seconds[name].append((time.process_time() - clock) / max(done.num_files, 1))
    shutil.rmtree(work / "shard-cpu-chunks", ignore_errors=True)
    return {name: statistics.median(values) * 1e6 for name, values in seconds.items()}


def summarize(runs: dict, num_images: int) -> dict:
    def median(variant, key):
        values = [r[key] for r in runs.get(variant, []) if r.get(key) is not None]
        return statistics.median(values) if values else None

    seed_wall = median("seed", "wall_s")
    summary = {}
    for variant in [v for v in runs if runs[v]]:  # none with --repeats 0 (--shard-cpu alone)
        wall = median(variant, "wall_s")
        summary[variant] = {
            "median_wall_s": wall,
            "images_per_s": num_images / wall,
            "ratio_to_seed": wall / seed_wall if seed_wall else None,
            "driver_peak_rss_bytes": max(r["driver_peak_rss_bytes"] for r in runs[variant]),
            "worker_peak_rss_bytes": max((r["worker_peak_rss_bytes"] or 0 for r in runs[variant]), default=0) or None,
            "median_decode_images_per_s": median(variant, "decode_images_per_s"),
            "median_ray_init_s": statistics.median([r["elapsed_s"]["ray_init"] for r in runs[variant]])
            if variant != "seed" else None,
            "median_stage_s": {stage: statistics.median(_stage_s(r, stage) for r in runs[variant])
                               for stage in STAGES} if variant != "seed" else None,
        }
    return summary


# Where a job's wall time goes, in order (docs/fixed-costs.md): `start` is the interpreter and
# the imports before the job's first line; then results.json's `elapsed_s` stages, `other`
# being the rest of its `total` (planning, the results); `exit` is what follows: the outputs
# written, Ray stopped (a Ray of the job's own: every process of it), the interpreter's exit.
STAGES = ("start", "ray_init", "scan", "decode", "prototypes", "classify", "other", "exit")
_NAMED_IN_TOTAL = STAGES[1:-2]  # ray_init .. classify


def _stage_s(run: dict, stage: str) -> float:
    elapsed = run["elapsed_s"]
    if stage == "other":  # what `total` holds beyond the stages it names
        return elapsed["total"] - sum(elapsed.get(s, 0.0) for s in _NAMED_IN_TOTAL)
    if stage == "exit":
        return run["wall_s"] - elapsed.get("start", 0.0) - elapsed["total"]
    return elapsed.get(stage, 0.0)


def format_fixed_costs(summary: dict) -> str:
    """The median seconds of each stage per variant, beside the seed's whole wall time."""
    head = f"{'variant':<15} {'wall':>6} " + " ".join(f"{stage:>8}" for stage in STAGES)
    lines = ["where the wall time goes (median s)", head]
    for variant, s in summary.items():
        stages = s.get("median_stage_s")
        cells = " ".join(f"{stages[stage]:>8.2f}" if stages else f"{'-':>8}" for stage in STAGES)
        lines.append(f"{variant:<15} {s['median_wall_s']:>6.2f} {cells}")
    return "\n".join(lines)


def format_summary(num_images: int, summary: dict) -> str:
    mib = 1 << 20
    lines = [f"{num_images:,} images",
             f"{'variant':<15} {'median wall s':>13} {'images/s':>10} {'x seed':>7} {'decode img/s':>12} "
             f"{'ray.init s':>10} {'driver RSS MiB':>14} {'worker RSS MiB':>14}"]
    for variant, s in summary.items():
        decode = f"{s['median_decode_images_per_s']:,.0f}" if s["median_decode_images_per_s"] else "-"
        init = f"{s['median_ray_init_s']:.2f}" if s["median_ray_init_s"] is not None else "-"
        ratio = f"{s['ratio_to_seed']:.3f}" if s["ratio_to_seed"] is not None else "-"
        worker = f"{s['worker_peak_rss_bytes'] / mib:.0f}" if s["worker_peak_rss_bytes"] else "-"
        lines.append(f"{variant:<15} {s['median_wall_s']:>13.2f} {s['images_per_s']:>10,.0f} "
                     f"{ratio:>7} {decode:>12} {init:>10} "
                     f"{s['driver_peak_rss_bytes'] / mib:>14.0f} {worker:>14}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags, grouped as --help lists them, each with its default."""
    from mnist37.config import HelpFormatter

    parser = argparse.ArgumentParser(
        description="fastbook's single-process baseline against mnist37 cold and warm, side by side",
        formatter_class=HelpFormatter, epilog="Flags after -- go to every mnist37 run: -- --shard-size 4096.")
    data = parser.add_argument_group("data", "the images, and how many times they are replicated")
    data.add_argument("--data", required=True, help="ImageFolder folder or .tgz, as for the job (required)")
    data.add_argument("--classes", nargs="+", default=["3", "7"], metavar="CLASS", help="class folders")
    data.add_argument("--copies", type=int, nargs="+", default=[10], metavar="N",
                      help="replication factors: one scale of the data set each")
    runs = parser.add_argument_group("runs", "what runs, and how often, taking turns")
    runs.add_argument("--repeats", type=int, default=3, metavar="N",
                      help="runs of each variant per scale (at least 1; 0 only with --shard-cpu)")
    runs.add_argument("--no-seed", dest="seed", action="store_false",
                      help="leave out fastbook's single-process run (minutes at N = 100) when comparing mnist37 runs")
    runs.add_argument("--unverified", action="store_true",
                      help="also run warm with verify_chunks = false: what checking chunks costs")
    runs.add_argument("--cluster", action="store_true",
                      help="also run cold and warm against a `ray start --head` on loopback")
    runs.add_argument("--formats", nargs="*", default=[], choices=sorted(FORMATS),
                      help="also run cold from these formats, the scaled folder converted once (default: none)")
    runs.add_argument("--shard-size", type=int, default=8192, metavar="IMAGES",
                      help="images per converted file (with --formats)")
    runs.add_argument("--shard-cpu", type=int, default=0, metavar="SHARDS",
                      help="also time decode_shard alone (CPU per image, no Ray) on this many shards of "
                           "the folder and of each format, taking turns (default: 0, not timed)")
    output = parser.add_argument_group("output", "where the scaled data, the runs and the figures go")
    output.add_argument("--work", type=Path, default=Path("runs/bench"), metavar="DIR",
                        help="scaled data sets, chunks, each run's output")
    output.add_argument("--json", type=Path, default=Path("runs/bench/benchmark.json"), metavar="FILE",
                        help="every figure, written after each scale")
    parser.add_argument("evaluate_args", nargs="*", metavar="-- FLAG", help="after --: extra job flags")
    args = parser.parse_args(argv)
    if args.repeats < (0 if args.shard_cpu else 1) or min(args.copies) < 1:
        parser.error("--copies must be positive, and --repeats too unless --shard-cpu is all that is asked for")
    return args


def main(args: argparse.Namespace) -> dict:
    source = find_root(args.data, "train")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "evaluate_args": args.evaluate_args, "cluster": args.cluster, "scales": {}}
    for copies in args.copies:
        data = args.work / f"data-x{copies}"
        made = replicate(source, data, copies, ["train", "valid"], args.classes)
        log.info("N=%d: %s", copies, made)
        scale = benchmark(data, args.work / f"x{copies}", args.repeats, args.classes, args.evaluate_args,
                          cluster=args.cluster, formats=args.formats, shard_size=args.shard_size,
                          unverified=args.unverified, seed=args.seed, shard_cpu_shards=args.shard_cpu)
        scale["copies"] = copies
        report["scales"][str(copies)] = scale
        print(f"\nN = {copies}: " + format_summary(scale["num_images"], scale["summary"]), flush=True)
        print(format_fixed_costs(scale["summary"]), flush=True)
        if scale["shard_cpu_us_per_image"]:
            folder_us = scale["shard_cpu_us_per_image"]["folder"]
            print("decode_shard alone, CPU per image (one process, no Ray): " + "; ".join(
                f"{name} {us:.2f} µs ({folder_us / us:.2f}x the folder's images/s)"
                for name, us in scale["shard_cpu_us_per_image"].items()))
        for fmt, seconds in scale["conversion_s"].items():
            print(f"{fmt}: converted from the folder in " + (f"{seconds:.1f} s" if seconds is not None
                                                            else "an earlier run (reused)"))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not args.repeats:  # --shard-cpu alone: no runs to check
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures in {args.json}")
        return report
    hashes = {n: {r["prototypes_sha256"] for v, rs in s["runs"].items() if v != "seed" for r in rs}
              for n, s in report["scales"].items()}
    accuracies = {n: {json.dumps(r["metrics"]) for v, rs in s["runs"].items() if v != "seed" for r in rs}
                  for n, s in report["scales"].items()}
    agree = {n: len({json.dumps(r["correct"]) for rs in s["runs"].values() for r in rs}) == 1
             for n, s in report["scales"].items()}
    report["checks"] = {
        "prototypes_identical_across_scales_and_runs": len(set().union(*hashes.values())) == 1,
        "accuracies_identical_across_scales_and_runs": len(set().union(*accuracies.values())) == 1,
        "seed_and_mnist37_agree_per_scale": agree,
    }
    for check, value in report["checks"].items():
        print(f"{check}: {value}")
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures in {args.json}")
    return report


def run(argv: list[str] | None = None) -> int:
    """The command line: returns the exit status (1 with one line for a data problem)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return exit_status(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run())
