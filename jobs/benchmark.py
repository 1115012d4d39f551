"""Benchmark: fastbook's single-process baseline against mnist37 cold and warm, side by side.

    python jobs/benchmark.py --data ../shared/data/mnist_sample.tgz --copies 1 10 100 --repeats 3
    python jobs/benchmark.py --data ../shared/data/mnist_sample.tgz --copies 100 --formats tar parquet idx

For each N in --copies it builds the data set replicated N times (hard links) under --work,
then alternates seed / cold / warm --repeats times and prints median wall seconds, images/s,
ratios to the seed, decode throughput, peak RSS of the driver and of the largest Ray worker.
--formats tar parquet idx adds cold runs from the same images converted (once, timed apart) to
WebDataset tar shards, Parquet and IDX.
cold and warm start their own Ray (`ray.init()`), as on a laptop; --cluster adds cluster-cold
and cluster-warm, the same job connecting to a Ray head already running on loopback, as under
`ray job submit`. Everything is also written to --json. Flags after `--` go to
jobs/evaluate.py (--shard-size 4096).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37 import Mnist37Error  # noqa: E402
from mnist37.benchmark import FORMATS, benchmark, format_summary  # noqa: E402
from mnist37.folder import find_root  # noqa: E402
from mnist37.replicate import replicate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ImageFolder folder or .tgz (as for jobs/evaluate.py)")
    parser.add_argument("--copies", type=int, nargs="+", default=[10], help="replication factors N")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant per N (at least 3)")
    parser.add_argument("--classes", nargs="+", default=["3", "7"])
    parser.add_argument("--work", type=Path, default=Path("runs/bench"), help="scaled data, chunks, outputs")
    parser.add_argument("--json", type=Path, default=Path("runs/bench/benchmark.json"))
    parser.add_argument("--cluster", action="store_true",
                        help="also run cold and warm against a `ray start --head` on loopback")
    parser.add_argument("--formats", nargs="*", default=[], choices=sorted(FORMATS),
                        help="also run cold from these formats (the scaled folder converted once): tar parquet idx")
    parser.add_argument("--shard-size", type=int, default=8192, help="images per converted file (tar, parquet)")
    parser.add_argument("evaluate_args", nargs="*", help="after --: extra jobs/evaluate.py flags")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.copies) < 1:
        parser.error("--repeats and --copies must be positive")
    return args


def main(args: argparse.Namespace) -> dict:
    source = find_root(args.data, "train")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "evaluate_args": args.evaluate_args, "cluster": args.cluster, "scales": {}}
    for copies in args.copies:
        data = args.work / f"data-x{copies}"
        made = replicate(source, data, copies, ["train", "valid"], args.classes)
        logging.info("N=%d: %s", copies, made)
        scale = benchmark(data, args.work / f"x{copies}", args.repeats, args.classes, args.evaluate_args,
                          cluster=args.cluster, formats=args.formats, shard_size=args.shard_size)
        scale["copies"] = copies
        report["scales"][str(copies)] = scale
        print(f"\nN = {copies}: " + format_summary(scale["num_images"], scale["summary"]), flush=True)
        for fmt, seconds in scale["conversion_s"].items():
            print(f"{fmt}: converted from the folder in " + (f"{seconds:.1f} s" if seconds is not None
                                                            else "an earlier run (reused)"))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        main(parse_args())
    except Mnist37Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
