"""How fast `classify_images` classifies from host memory, on the CPU and on CUDA: images per
second for a range of batch sizes, each call's predictions checked.

The throughput half of the GPU check (jobs/gpu_check.py calls `measure_throughput` after its
correctness half, docs/gpu-check.md); run alone it decodes full MNIST without Ray
(tests/decoded_sets.py), classifies its evaluation split once per device for the predictions
every timed call must repeat (or differ from only at a proven float32 tie,
tests/gpu_agreement.py), then times:

    python benchmarks/gpu_throughput/gpu_throughput.py --data ../shared/data/mnist_png.tgz

Each row: `classify_images` on the evaluation split repeated to the batch size, from host
memory to confusion matrices on the host (the copy to the device included, overlapped on a
side stream; pinned memory, or pageable staged through pinned buffers), the median of --reps
calls after --warmup. The goal (issue 14): at least 10,000,000 images/s on one H100.
Imports the test support named above (benchmarks/README.md: what may import what).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT))  # the checkout's mnist37 and tests/, from any folder
# torch.cuda.is_available() asks NVML rather than initializing CUDA: the decode pool forks after it.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import numpy as np   # noqa: E402
import torch   # noqa: E402

from mnist37.classify import classify_images  # noqa: E402
from mnist37.config import HelpFormatter, load   # noqa: E402
from tests.decoded_sets import DecodedSet, EvalSplit, classify_set, decode_set, eval_split   # noqa: E402
from tests.gpu_agreement import exact_distances, near_ties   # noqa: E402

GPU_BATCHES = [8192, 32768, 131072, 524288, 1048576]
CPU_BATCHES = [8192, 32768, 131072]
PAGEABLE_BATCHES = [131072]
GOAL = 10_000_000  # images/s on one H100, copy included (issue 14)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The study's flags (jobs/gpu_check.py has them too): batch sizes, repetitions."""
    parser.add_argument("--batches", type=int, nargs="+", default=GPU_BATCHES, help="GPU throughput batch sizes")
    parser.add_argument("--cpu-batches", type=int, nargs="+", default=CPU_BATCHES, help="CPU throughput batch sizes")
    parser.add_argument("--pageable-batches", type=int, nargs="*", default=PAGEABLE_BATCHES,
                        help="GPU throughput batch sizes from pageable host memory (staged through pinned buffers)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per batch size (the median is shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them")


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batches", "cpu_batches", "pageable_batches"):
        if any(b < 1 for b in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')}: expected positive numbers of images")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps: expected at least 1; --warmup: at least 0")


@dataclass
class Timing:
    device: str
    memory: str  # where the host images lie: "pinned", "pageable"
    batch: int  # images per call
    seconds: list[float]  # one per timed call
    wrong_calls: int  # calls (timed or not) with a prediction that differs from the expected one, not at a tie
    tie_flips: int  # most predictions one call made otherwise than expected, at ties

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s


def tiled(split: EvalSplit, size: int, pinned: bool) -> tuple[np.ndarray, np.ndarray]:
    """`size` images (uint8 [size, H, W]) and labels (int64 [size]): the split repeated, in
    page-locked memory when `pinned`, so a host-to-device copy runs at full speed, asynchronously."""
    images = torch.empty((size, *split.images.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
    source = torch.from_numpy(split.images)
    for start in range(0, size, len(source)):
        n = min(len(source), size - start)
        images[start:start + n] = source[:n]
    return images.numpy(), np.resize(split.class_indices, size)


def throughput(images: np.ndarray, labels: np.ndarray, prototypes: np.ndarray, device: str, batch: int,
               reps: int, warmup: int, expected: dict[str, np.ndarray], near: dict[str, np.ndarray]) -> Timing:
    """Wall time of `classify_images` on the first `batch` images of `tiled`'s repetition of a
    split, from host memory to the confusion matrices back on the host (so the copy to the
    device is included): `warmup` untimed calls, then `reps` timed ones. After each call (not
    timed) its predictions are checked against `expected` (metric -> int64 [N], the device's
    predictions of the split's N images): they may differ only at `near` ties (metric -> bool [N])."""
    cuda = torch.device(device).type == "cuda"
    memory = "pinned" if cuda and torch.from_numpy(images).is_pinned() else "pageable"
    seconds, wrong, ties = [], 0, 0
    for i in range(warmup + reps):
        if cuda:
            torch.cuda.synchronize()
        clock = time.perf_counter()
        done = classify_images(images[:batch], labels[:batch], prototypes, list(expected), device)
        if cuda:
            torch.cuda.synchronize()  # classify_images already waited for its results; nothing is left queued
        if i >= warmup:
            seconds.append(time.perf_counter() - clock)
        differing = {m: np.flatnonzero(done.predicted[m].cpu().numpy() != np.resize(want, batch)) % len(want)
                     for m, want in expected.items()}
        wrong += any(not near[m][rows].all() for m, rows in differing.items())
        ties = max(ties, sum(len(rows) for rows in differing.values()))
    return Timing(device, memory, batch, seconds, wrong, ties)


def copy_gbps(images: np.ndarray, reps: int) -> float:
    """Host-to-device copy speed of pinned `images` alone (GB/s, median of reps), timed by CUDA events."""
    source = torch.from_numpy(images)
    target = torch.empty_like(source, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(reps + 1):
        start.record()
        target.copy_(source, non_blocking=True)
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end) / 1000)
    return source.numel() / statistics.median(times) / 1e9


def format_timings(timings: list[Timing], image_bytes: int) -> str:
    """The throughput table (just its header for no timings)."""
    lines = [f"{'batch':>10}  {'device':<6}  {'host':<8}  {'images/s':>13}  {'input GB/s':>10}  "
             f"{'median s':>9}  {'reps':>4}  predictions"]
    for t in timings:
        lines.append(f"{t.batch:>10,}  {t.device:<6}  {t.memory:<8}  {t.images_per_s:>13,.0f}  "
                     f"{t.images_per_s * image_bytes / 1e9:>10.3f}  {t.median_s:>9.4f}  {len(t.seconds):>4}  "
                     + (f"WRONG in {t.wrong_calls} calls" if t.wrong_calls else
                        f"as expected but {t.tie_flips} proven ties" if t.tie_flips else "as expected"))
    return "\n".join(lines)


def measure_throughput(args: argparse.Namespace, data: DecodedSet, predictions: dict, near: dict) -> list[str]:
    """Time classify_images on the data set's evaluation split repeated to each batch size, on
    the CPU and (when `predictions` has it) CUDA; print the table; return the failures."""
    split, failures, cuda = eval_split(data), [], "cuda" in predictions
    height, width = split.images.shape[1:]
    print(f"\nthroughput: classify_images, {len(data.classes)} classes, {' + '.join(data.cfg.metrics)}, "
          f"{height}x{width} uint8 images ({data.cfg.eval_split} split repeated), host memory to confusion "
          f"matrices on the host; each call's predictions checked against the device's above; median of "
          f"{args.reps} after {args.warmup} warm-up", flush=True)
    plans = [("cpu", "pageable", b) for b in args.cpu_batches]
    if cuda:
        plans += [("cuda", "pinned", b) for b in args.batches]
        plans += [("cuda", "pageable", b) for b in args.pageable_batches]
    images = {memory: tiled(split, max(b for _, m, b in plans if m == memory), pinned=memory == "pinned")
              for memory in {m for _, m, _ in plans}}
    print(format_timings([], height * width))
    timings = []
    for device, memory, batch in plans:
        pixels, labels = images[memory]
        timings.append(throughput(pixels, labels, data.prototypes, device, batch, args.reps, args.warmup,
                                        predictions[device], near))
        print(format_timings(timings[-1:], height * width).splitlines()[-1], flush=True)
        if timings[-1].wrong_calls:
            failures.append(f"throughput {device} {memory} {batch:,}: predictions wrong in "
                            f"{timings[-1].wrong_calls} calls")
    if cuda:
        pinned = images["pinned"][0]
        print(f"host-to-device copy alone, {len(pinned):,} pinned images: "
              f"{copy_gbps(pinned, args.reps):.1f} GB/s")
        best = max(t.images_per_s for t in timings if t.device == "cuda")
        print(f"best GPU throughput {best:,.0f} images/s: {'meets' if best >= GOAL else 'BELOW'} "
              f"the goal of {GOAL:,} images/s, copy included")
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, help="full MNIST: mnist_png.tgz (or its folder) (required)")
    parser.add_argument("--cache-dir", default="", help="where archives are extracted (default: mnist37's cache)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes")
    parser.add_argument("--cpu-only", action="store_true", help="the CPU rows alone, also where CUDA is")
    add_flags(parser)
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.workers < 1:
        parser.error("--workers: expected at least 1")
    return args


def main(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available() and not args.cpu_only
    with tempfile.TemporaryDirectory(prefix="mnist37-gpu-throughput-") as chunk_dir:
        cfg = load(PROJECT_ROOT / "configs" / "mnist.toml", data=args.data, cache_dir=args.cache_dir,
                   chunk_dir=chunk_dir, reuse_chunks=False)
        data = decode_set("mnist", cfg, args.workers)  # forks: before anything touches CUDA
        split = eval_split(data)
        exact = {m: exact_distances(split.images, data.prototypes, m) for m in data.cfg.metrics}
        near = {m: near_ties(e, split.images[0].size) for m, e in exact.items()}
        predictions = {device: classify_set(data, device).predicted for device in (["cpu", "cuda"] if cuda else ["cpu"])}
        failures = measure_throughput(args, data, predictions, near)
    print(f"throughput {'FAILED: ' + '; '.join(failures) if failures else 'as expected'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
