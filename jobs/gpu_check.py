"""Check the distance classifier on a GPU against the CPU, image by image, and measure its throughput.

One process, no Ray (a lent GPU machine has none): decodes full MNIST and mnist_sample into
Arrow chunks with mnist37's own decode step, classifies each evaluation split with
`classify_images` (what every classify task calls) on the CPU and on CUDA, compares every
prediction (a difference passes only as a proven float32 tie, mnist37/gpu_check.py), checks
the accuracies (fastbook's L1 figures on mnist_sample), then times classification from host
memory (pinned for the GPU, so the copy is included and overlapped) for a range of batch sizes.

    python3 jobs/gpu_check.py --data .devdata/mnist_png.tgz --sample .devdata/mnist_sample.tgz

(README, "GPU check", says how to send the data along to a lent device.) Without CUDA it says
so in one line, runs the CPU half and exits 0. Exit status 1 when a prediction differs beyond a
proven tie, a distance is further from the exact one than float32's error bound, or an
accuracy is off; `error: ...` and 1 for bad input.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script, mnist37 need not be installed

import torch  # noqa: E402

from mnist37 import Mnist37Error  # noqa: E402
from mnist37 import gpu_check as check  # noqa: E402
from mnist37.config import load  # noqa: E402
from mnist37.metrics import accuracy_report  # noqa: E402
from mnist37.report import format_table  # noqa: E402

GPU_BATCHES = [8192, 32768, 131072, 524288, 1048576]
CPU_BATCHES = [8192, 32768, 131072]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="full MNIST: mnist_png.tgz (or its folder)")
    parser.add_argument("--sample", required=True, help="fastai's mnist_sample.tgz (or its folder)")
    parser.add_argument("--cache-dir", default="", help="where archives are extracted (default: mnist37's cache)")
    parser.add_argument("--batches", type=int, nargs="+", default=GPU_BATCHES, help="GPU throughput batch sizes")
    parser.add_argument("--cpu-batches", type=int, nargs="+", default=CPU_BATCHES, help="CPU throughput batch sizes")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per batch size (the median is shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes")
    args = parser.parse_args(argv)
    for name in ("batches", "cpu_batches"):
        if any(b < 1 for b in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')}: expected positive numbers of images")
    if args.reps < 1 or args.warmup < 0 or args.workers < 1:
        parser.error("--reps and --workers: expected at least 1; --warmup: at least 0")
    return args


def main(args: argparse.Namespace) -> int:
    clock = time.perf_counter()
    print(f"mnist37 GPU check: Python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, no Ray; PNG decoder: {check.decoder_name()}", flush=True)
    failures = []
    with check.temporary_chunk_dir() as chunk_dir:
        common = {"cache_dir": args.cache_dir, "reuse_chunks": False}
        configs = {"mnist": load(PROJECT_ROOT / "configs" / "mnist.toml", data=args.data,
                                 chunk_dir=f"{chunk_dir}/mnist", **common),
                   "mnist_sample": load(None, data=args.sample, chunk_dir=f"{chunk_dir}/mnist_sample", **common)}
        # Decoding forks worker processes: it runs before anything touches CUDA.
        sets = {name: check.decode_set(name, cfg, args.workers) for name, cfg in configs.items()}
        for data in sets.values():
            print(f"{data.name}: decoded {' + '.join(f'{s} {n:,}' for s, n in data.counts.items())} images "
                  f"({len(data.classes)} classes, {data.num_shards} shards) in {data.decode_s:.2f} s "
                  f"on {data.workers} processes", flush=True)
        cuda = torch.cuda.is_available()
        if cuda:
            props = torch.cuda.get_device_properties(0)
            print(f"CUDA device: {props.name}, {props.multi_processor_count} SMs, "
                  f"{props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}")
        else:
            print(f"no CUDA device visible to torch {torch.__version__}: GPU half skipped, CPU half only")
        devices = ["cpu", "cuda"] if cuda else ["cpu"]
        for data in sets.values():
            split = check.eval_split(data)
            outcomes = {device: check.classify_set(data, device) for device in devices}
            cfg = data.cfg
            print(f"\n{data.name}: {cfg.eval_split} split, {len(split.images):,} images, "
                  + ", ".join(f"{o.device} {o.elapsed_s:.3f} s" for o in outcomes.values()))
            for device, outcome in outcomes.items():
                results = {"classes": data.classes, "config": {"eval_split": cfg.eval_split},
                           "counts": {cfg.eval_split: dict(zip(data.classes, outcome.confusions[cfg.metrics[0]].sum(axis=1).tolist()))},
                           "metrics": {m: accuracy_report(c, data.classes) for m, c in outcome.confusions.items()}}
                print(f"[{device}]\n{format_table(results)}")
                for what, found, expected in check.accuracy_checks(data.name, data.classes, outcome.confusions):
                    verdict = "ok" if found == expected else "WRONG"
                    print(f"  {device} {what}: {found:.4f}, expected {expected:.4f}: {verdict}")
                    if found != expected:
                        failures.append(f"{data.name} {device} {what} is {found:.4f}, expected {expected:.4f}")
            exact = {m: check.exact_distances(split.images, data.prototypes, m) for m in cfg.metrics}
            for outcome in outcomes.values():
                for e in check.exactness(outcome, exact, split.images[0].size):
                    print("  " + check.format_exactness(e))
                    if not e.ok:
                        failures.append(f"{data.name} {e.device} {e.metric} distances off by {e.worst:.2f} "
                                        "times float32's error bound")
            if cuda:
                comparison = check.compare(outcomes["cpu"], outcomes["cuda"], split, exact)
                for metric, ulps in comparison.max_ulps.items():
                    differing = [d for d in comparison.differences if d.metric == metric]
                    print(f"  cpu vs cuda, {metric}: {'predictions identical' if not differing else f'{len(differing)} predictions differ'} "
                          f"on {comparison.num_images:,} images; distances at most {ulps} ulps apart")
                for d in comparison.differences:
                    print("    " + check.format_difference(d, data.classes))
                if not comparison.ok:
                    failures.append(f"{data.name}: {sum(not d.tie for d in comparison.differences)} predictions "
                                    "differ between cpu and cuda beyond a proven float32 tie")

        data = sets["mnist"]
        split = check.eval_split(data)
        shape = split.images.shape[1:]
        print(f"\nthroughput: classify_images, {len(data.classes)} classes, {' + '.join(data.cfg.metrics)}, "
              f"{shape[0]}x{shape[1]} uint8 images ({data.cfg.eval_split} split repeated), host memory to "
              f"confusion matrices on the host; median of {args.reps} after {args.warmup} warm-up", flush=True)
        plans = [("cpu", b) for b in args.cpu_batches] + ([("cuda", b) for b in args.batches] if cuda else [])
        largest = max(b for _, b in plans)
        images, labels = check.tiled(split, largest, pinned=cuda)
        timings = []
        print(check.format_timings([], images[0].nbytes))
        for device, batch in plans:
            timings.append(check.throughput(images, labels, data.prototypes, data.cfg.metrics, device, batch,
                                            args.reps, args.warmup))
            print(check.format_timings(timings[-1:], images[0].nbytes).splitlines()[-1], flush=True)
        if cuda:
            print(f"host-to-device copy alone, {largest:,} pinned images: "
                  f"{check.copy_gbps(images[:largest], args.reps):.1f} GB/s")
            best = max(t.images_per_s for t in timings if t.device == "cuda")
            goal = 10_000_000
            print(f"best GPU throughput {best:,.0f} images/s: {'meets' if best >= goal else 'BELOW'} "
                  f"the goal of {goal:,} images/s, copy included")
    print(f"\n{'GPU check FAILED: ' + '; '.join(failures) if failures else 'GPU check passed' if cuda else 'CPU half passed'} "
          f"in {time.perf_counter() - clock:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    arguments = parse_args()
    try:
        sys.exit(main(arguments))
    except Mnist37Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
