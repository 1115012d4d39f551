"""The distance step side by side in one process: the previous `classify.distances` (a float32
pass per class, kept here as the baseline), torch.cdist p=1 and p=2, and the new exact nearest
prototypes (`classify.nearest_with_distances`: fast sums with proven bounds, near candidates
rechecked in float64 and exact integers), and l1's fast sums alone, on the CPU's kernel
(mnist37.l1_kernel, numba) and on torch.cdist slabs. Rounds alternate between the methods; medians, and
ratios against the baseline of the same run (the machine is shared).

    python benchmarks/distances/distances_benchmark.py                      # 1024 x 1000 x 64x64x3, then 1024 x 10 x 28x28
    python benchmarks/distances/distances_benchmark.py --repeats 5 --images 2048
    python benchmarks/distances/distances_benchmark.py --threads 1   # one thread: steadier on a busy machine
    python benchmarks/distances/distances_benchmark.py --cuda-check          # CUDA = CPU predictions at 1,000 classes

Images are synthetic but shaped like class data: each class a smooth random template, each
image 0.6 x its class's template + 0.4 x uniform noise, the prototypes the class means
(0.6 x template + 0.2), so each image is nearer its class and the classes compete as real ones do.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
from mnist37.classify import classify_images  # noqa: E402
from mnist37.distances import l1_sums, nearest_with_distances, scaled_pixels  # noqa: E402


def old_distances(images: torch.Tensor, prototypes: torch.Tensor, metrics) -> dict[str, torch.Tensor]:
    """mnist37.classify.distances as it was (0af93a2), its CPU path: one class at a time."""
    x = scaled_pixels(images)
    protos = prototypes.reshape(len(prototypes), -1).to(x.device, torch.float32)
    out = {m: torch.empty(len(x), len(protos), dtype=torch.float32, device=x.device) for m in metrics}
    for c, proto in enumerate(protos):
        diff = x - proto
        if "l1" in out:
            out["l1"][:, c] = diff.abs().mean(dim=1)
        if "l2" in out:
            out["l2"][:, c] = diff.square_().mean(dim=1).sqrt_()
    return out


def synthetic(num_images: int, num_classes: int, shape: tuple[int, ...], seed: int = 0):
    """uint8 [N, *shape] images, int64 [N] labels, float32 [C, *shape] prototypes."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((num_classes, *(-(-s // 8) for s in shape[:2]), *shape[2:]), dtype=np.float32)
    templates = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :shape[0], :shape[1]]
    labels = rng.integers(0, num_classes, num_images)
    noise = rng.random((num_images, *shape), dtype=np.float32)
    images = np.rint(255 * (0.6 * templates[labels] + 0.4 * noise)).astype(np.uint8)
    prototypes = (0.6 * templates + 0.2).astype(np.float32)
    return images, labels, prototypes


def run(num_images: int, num_classes: int, shape: tuple[int, ...], repeats: int) -> None:
    images, labels, prototypes = synthetic(num_images, num_classes, shape)
    u, p = torch.from_numpy(images), torch.from_numpy(prototypes)
    true = torch.from_numpy(labels)
    x, flat = scaled_pixels(u), p.reshape(len(p), -1)
    methods = {
        "old classify.distances l1+l2": lambda: old_distances(u, p, ["l1", "l2"]),
        "torch.cdist p=1": lambda: torch.cdist(x, flat, p=1),
        "torch.cdist p=2": lambda: torch.cdist(x, flat, p=2),
        "l1 sums, cdist slabs": lambda: l1_sums(u.reshape(len(u), -1), flat, via="cdist"),
        "l1 sums, CPU kernel": lambda: l1_sums(u.reshape(len(u), -1), flat, via="kernel"),
        "new l1 (exact nearest)": lambda: nearest_with_distances(u, p, true, "l1"),
        "new l2 (exact nearest)": lambda: nearest_with_distances(u, p, true, "l2"),
    }
    times = {name: [] for name in methods}
    results = {}
    for _ in range(repeats):
        for name, f in methods.items():
            clock = time.perf_counter()
            results[name] = f()
            times[name].append(time.perf_counter() - clock)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["old classify.distances l1+l2"]
    print(f"\n{num_images} images x {num_classes} classes x {'x'.join(map(str, shape))} "
          f"({math.prod(shape)} values), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"medians of {repeats} alternating rounds")
    for name, m in median.items():
        print(f"  {name:32s} {m:8.3f} s   {base / m:6.2f}x the old   ({', '.join(f'{t:.2f}' for t in times[name])})")
    new = median["new l1 (exact nearest)"] + median["new l2 (exact nearest)"]
    print(f"  {'new l1 + l2':32s} {new:8.3f} s   {base / new:6.2f}x the old")
    # Within a round the methods ran back to back, under about the same load: their ratios are
    # steadier than ratios of medians.
    rounds = [o / (a + b) for o, a, b in zip(times["old classify.distances l1+l2"], times["new l1 (exact nearest)"],
                                              times["new l2 (exact nearest)"])]
    cdist = [c / a for c, a in zip(times["torch.cdist p=1"], times["new l1 (exact nearest)"])]
    kernel = [c / k for c, k in zip(times["l1 sums, cdist slabs"], times["l1 sums, CPU kernel"])]
    print(f"  per round: old / new l1+l2 = {', '.join(f'{r:.2f}' for r in rounds)} (median "
          f"{statistics.median(rounds):.2f}); cdist p=1 / new l1 = {', '.join(f'{r:.2f}' for r in cdist)} "
          f"(median {statistics.median(cdist):.2f}); l1 sums, cdist slabs / CPU kernel = "
          f"{', '.join(f'{r:.2f}' for r in kernel)} (median {statistics.median(kernel):.2f})")
    old = results["old classify.distances l1+l2"]
    for metric in ("l1", "l2"):
        got = results[f"new {metric} (exact nearest)"][0]
        was = old[metric].argmin(dim=1)
        rows = torch.nonzero(got != was).flatten()
        decided = ""
        if len(rows):  # which side the float64 definition takes, for the images that differ
            d = images[rows.numpy()].reshape(len(rows), -1).astype(np.float64)[:, None] / 255 - \
                prototypes.reshape(num_classes, -1).astype(np.float64)[None]
            ref = (np.abs(d) if metric == "l1" else d ** 2).sum(-1).argmin(axis=1)
            decided = (f" (float64 agrees with the new on {int((ref == got[rows].numpy()).sum())}, "
                       f"with the old on {int((ref == was[rows].numpy()).sum())})")
        print(f"  {metric}: predictions differing from the old float32 argmin: {len(rows)}{decided}")


def cuda_check(num_images: int = 2048, num_classes: int = 1000, shape: tuple[int, ...] = (64, 64, 3)) -> dict:
    """CUDA's predictions against the CPU's at 1,000 classes, image by image, through
    `classify_images` (what a classify task runs): {metric: number of images that differ},
    all 0 when right (both are the exact argmin). What jobs/gpu_check.py's 1,000-class case
    can call: `cuda_check()` or with the shape it evaluates."""
    images, labels, prototypes = synthetic(num_images, num_classes, shape, seed=1)
    cpu = classify_images(images, labels, prototypes, ["l1", "l2"], "cpu")
    cuda = classify_images(images, labels, prototypes, ["l1", "l2"], "cuda")
    return {m: int((cuda.predicted[m].cpu() != cpu.predicted[m]).sum()) for m in ("l1", "l2")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="images at 1,000 classes x 64x64x3")
    parser.add_argument("--mnist-images", type=int, default=1024, help="images at 10 classes x 28x28")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cuda-check", action="store_true", help="compare CUDA's predictions with the CPU's and stop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_check:
        differ = cuda_check()
        print(f"CUDA vs CPU predictions at 1,000 classes x 64x64x3: {differ} images differ")
        sys.exit(1 if any(differ.values()) else 0)
    run(args.images, 1000, (64, 64, 3), args.repeats)
    run(args.mnist_images, 10, (28, 28), max(args.repeats, 5))


if __name__ == "__main__":
    main()
