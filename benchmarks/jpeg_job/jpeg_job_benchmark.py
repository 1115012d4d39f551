"""The whole job on a replicated folder of color JPEGs, against a single-process Pillow loop
(the seed's way) and against Ray Data (`read_images` + `map_batches`) doing the same sums.

    python benchmarks/jpeg_job/jpeg_job_benchmark.py --copies 84 --work /dev/shm/jpeg-job

The corpus is made here with Pillow: two classes of 32x32 color images (a warm and a cool
colour field with noise and a class-dependent stripe), quality-90 4:2:0 JPEGs, `--unique`
images per class in train and a fifth of that in valid; replicated `--copies` times by hard
links (benchmarks/support/replicate.py), so every copy has the same pixels and every variant
must give the same accuracy. Each variant runs once per round as its own process, in turn, cold: the job's
chunk folder is emptied first; Ray Data has no cache. Wall time is the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[2]
CLASSES = ["cool", "warm"]


def make_corpus(root: Path, unique: int, size: int, seed: int = 37) -> int:
    """`unique` train and `unique // 5` valid JPEGs per class under root/<split>/<class>/."""
    from PIL import Image

    marker = root / ".corpus"
    stamp = f"{unique} {size} {seed}\n"
    if marker.is_file() and marker.read_text() == stamp:
        return sum(1 for _ in root.glob("*/*/*.jpg"))
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    count = 0
    for split, n in (("train", unique), ("valid", max(1, unique // 5))):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            base = np.array([[40, 90, 200], [210, 110, 40]][c], dtype=np.float64)
            for i in range(n):
                pixels = base + rng.normal(0, 45, (size, size, 3))
                column = (c * size // 2 + rng.integers(0, size // 2)) % size
                pixels[:, column: column + 3] = 255 - base
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
                image.save(folder / f"{i:06d}.jpg", quality=90)
                count += 1
    marker.write_text(stamp)
    return count


LOOP = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
root, classes = Path(sys.argv[1]), sys.argv[2].split(",")
def image(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)
sums = {}
for c in classes:
    total, n = None, 0
    for path in sorted((root / "train" / c).iterdir()):
        x = image(path)
        total = x if total is None else total + x
        n += 1
    sums[c] = total / n
protos = np.stack([sums[c] for c in classes])
correct = {}
for i, c in enumerate(classes):
    ok = 0
    for path in sorted((root / "valid" / c).iterdir()):
        d = np.abs(image(path)[None] - protos).mean(axis=(1, 2, 3))
        ok += int(d.argmin() == i)
    correct[c] = ok
print(json.dumps({"correct": correct}))
"""

RAY_DATA = r"""
import json, sys
import numpy as np
import ray
root, classes = sys.argv[1], sys.argv[2].split(",")
ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
def sums(batch):
    images = batch["image"].astype(np.float64)
    return {"sum": [images.sum(axis=0)], "n": [len(images)]}
protos = []
for c in classes:
    ds = ray.data.read_images(f"{root}/train/{c}", mode="RGB").map_batches(sums, batch_size=4096)
    parts = ds.take_all()
    protos.append(sum(p["sum"] for p in parts) / sum(p["n"] for p in parts))
protos = np.stack(protos).astype(np.float32)
correct = {}
for i, c in enumerate(classes):
    def hits(batch, i=i):
        d = np.abs(batch["image"].astype(np.float32)[:, None] - protos[None]).mean(axis=(2, 3, 4))
        return {"ok": [int((d.argmin(axis=1) == i).sum())]}
    ds = ray.data.read_images(f"{root}/valid/{c}", mode="RGB").map_batches(hits, batch_size=4096)
    correct[c] = sum(p["ok"] for p in ds.take_all())
ray.shutdown()
print(json.dumps({"correct": correct}))
"""


def timed(argv: list[str], env: dict | None = None) -> tuple[float, str]:
    clock = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=PROJECT)
    wall = time.perf_counter() - clock
    if run.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed:\n{run.stderr[-3000:]}")
    return wall, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unique", type=int, default=5000, help="unique train JPEGs per class (valid: a fifth)")
    parser.add_argument("--size", type=int, default=32, help="image side, pixels")
    parser.add_argument("--copies", type=int, default=84, help="replicas of the corpus (84: ~1.0M images)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds, each variant once per round")
    parser.add_argument("--variants", nargs="+", default=["loop", "job", "ray-data"])
    parser.add_argument("--work", type=Path, default=Path("runs/jpeg-job"))
    parser.add_argument("--json", type=Path, default=None, help="figures (default: WORK/jpeg_job.json)")
    args = parser.parse_args()

    sys.path.insert(0, str(PROJECT))
    from benchmarks.support.replicate import replicate

    corpus = args.work / "corpus"
    clock = time.perf_counter()
    unique = make_corpus(corpus, args.unique, args.size)
    made_s = time.perf_counter() - clock
    data = args.work / f"x{args.copies}"
    clock = time.perf_counter()
    files = replicate(corpus, data, args.copies, ["train", "valid"], CLASSES)["files"]
    print(f"{unique:,} unique {args.size}x{args.size} JPEGs (made in {made_s:.1f} s), x{args.copies} = "
          f"{files:,} files (replicated in {time.perf_counter() - clock:.1f} s) in {data}", flush=True)

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(PROJECT)}
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for round_ in range(args.repeats):
        for variant in args.variants:
            if variant == "loop":
                wall, out = timed([sys.executable, "-c", LOOP, str(data), ",".join(CLASSES)], env)
                correct = json.loads(out.strip().splitlines()[-1])["correct"]
            elif variant == "job":
                chunks, out_dir = args.work / "chunks", args.work / "out"
                shutil.rmtree(chunks, ignore_errors=True)
                wall, _ = timed([sys.executable, "-m", "mnist37.job", "--data", str(data), "--classes", *CLASSES,
                                 "--channels", "rgb", "--metrics", "l1", "--ray-address", "local",
                                 "--chunk-dir", str(chunks), "--out", str(out_dir)], env)
                results = json.loads((out_dir / "results.json").read_text())
                confusion = results["metrics"]["l1"]["confusion"]
                correct = {c: confusion[i][i] for i, c in enumerate(results["classes"])}
            elif variant == "ray-data":
                wall, out = timed([sys.executable, "-c", RAY_DATA, str(data), ",".join(CLASSES)], env)
                correct = json.loads(out.strip().splitlines()[-1])["correct"]
            else:
                raise SystemExit(f"unknown variant {variant}")
            runs[variant].append({"wall_s": wall, "correct": correct})
            print(f"round {round_ + 1} {variant:<9} {wall:8.1f} s  {files / wall:10,.0f} images/s  correct {correct}",
                  flush=True)

    loop = statistics.median(r["wall_s"] for r in runs["loop"]) if runs.get("loop") else None
    print(f"\n{files:,} color JPEGs, {args.size}x{args.size}; medians of {args.repeats}")
    print(f"{'variant':<10} {'wall s':>8} {'images/s':>10} {'x loop':>7}")
    for variant, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        ratio = f"{wall / loop:.3f}" if loop else "-"
        print(f"{variant:<10} {wall:>8.1f} {files / wall:>10,.0f} {ratio:>7}")
    agree = len({json.dumps(r["correct"], sort_keys=True) for rs in runs.values() for r in rs}) == 1
    print(f"every variant and round counts the same correct images: {agree}")
    path = args.json or args.work / "jpeg_job.json"
    path.write_text(json.dumps({"files": files, "unique": unique, "size": args.size, "copies": args.copies,
                                "runs": runs, "agree": agree}, indent=2))


if __name__ == "__main__":
    main()
