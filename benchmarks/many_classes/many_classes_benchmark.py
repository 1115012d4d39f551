"""The job on an ImageNet-shaped set (1,000 classes of photo-sized JPEGs), beside a
single-process Pillow + NumPy (float64) loop and beside Ray Data (`read_images` +
`map_batches`), all on the same images, with exact figures and wall times side by side.

    python benchmarks/many_classes/many_classes_benchmark.py --work /dev/shm/many-classes \
        --classes 1000 --train 8 --val 2 --image-size 64 --repeats 1

The set is made once by imagenet_like.py (same flags; ImageNet's layout train/<wnid>/*.JPEG,
val/<wnid>/*.JPEG). Variants, each its own process, cold (the job's chunk folder emptied
first; Ray Data and the loop keep nothing), in turn, `--repeats` rounds, medians:

- `job`: `python jobs/evaluate.py --data D --classes all --channels rgb --image-size HxW
  --train-split train --eval-split val --ray-address local` (its own Ray);
- `job-draft`: the same with `--jpeg-draft true`;
- `job-base`: `job` run from another checkout (`--baseline PATH`, e.g. `git archive` of the
  commit compared against): before and after in the same run, alternating;
- `loop`: every file opened with Pillow, `convert("RGB")`, `resize((W, H), BILINEAR)`, summed
  per class in float64; prototypes `(sums / counts / 255)` as float32 (the job's); each val
  image's l1 (mean |x/255 - p|) and l2 (root mean square) to every prototype in float64;
- `loop-draft`: the loop with Pillow's `draft("RGB", (W, H))` first, resized with draft's box
  (what `--jpeg-draft` is defined as);
- `ray-data`: `ray.data.read_images(train/ and val/, mode="RGB", include_paths=True)`, resized
  with Pillow in `map_batches` (read_images' own `size=` resizes before converting: other
  pixels), per-class float64 sums reduced on the driver, val predicted in `map_batches`.

Each variant prints its correct images per metric; the same decode must give the same counts
per class (the job's float32 distances against the loop's float64 may only move near-ties).
For the job: results.json's stage times, the sizes of report.html, results.json and the whole
output folder, and the driver's peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet_like  # noqa: E402

PROJECT = Path(__file__).resolve().parents[2]
VARIANTS = ("loop", "job", "ray-data", "loop-draft", "job-draft", "job-base")

LOOP = r"""
import json, os, sys
from pathlib import Path
import numpy as np
from PIL import Image
root, H, W, draft = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
classes = sorted(os.listdir(root / "train"))
def load(path):
    with Image.open(path) as image:
        box = None
        if draft and (drafted := image.draft("RGB", (W, H))):
            box = drafted[1]
        image = image.convert("RGB") if image.mode != "RGB" else image
        if image.size != (W, H) or box is not None:
            image = image.resize((W, H), Image.Resampling.BILINEAR, box=box)
        return np.asarray(image, dtype=np.float64)
sums, counts = np.zeros((len(classes), H, W, 3)), np.zeros(len(classes))
for c, name in enumerate(classes):
    for f in sorted(os.listdir(root / "train" / name)):
        sums[c] += load(root / "train" / name / f)
        counts[c] += 1
prototypes = (sums / counts[:, None, None, None] / 255.0).astype(np.float32).reshape(len(classes), -1).astype(np.float64)
correct = {"l1": [0] * len(classes), "l2": [0] * len(classes)}
for c, name in enumerate(classes):
    for f in sorted(os.listdir(root / "val" / name)):
        d = np.abs(load(root / "val" / name / f).reshape(1, -1) / 255.0 - prototypes)
        correct["l1"][c] += int(d.mean(axis=1).argmin() == c)
        correct["l2"][c] += int(np.sqrt((d * d).mean(axis=1)).argmin() == c)
print(json.dumps({"correct": correct}))
"""

RAY_DATA = r"""
import json, os, sys
import numpy as np
import ray
from PIL import Image
root, H, W = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
classes = sorted(os.listdir(f"{root}/train"))
index = {name: c for c, name in enumerate(classes)}
ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
def resized(batch):
    images = np.stack([np.asarray(Image.fromarray(x).resize((W, H), Image.Resampling.BILINEAR))
                       for x in batch["image"]])
    return images, np.array([index[p.rsplit("/", 2)[-2]] for p in batch["path"]])
def sums(batch):
    images, labels = resized(batch)
    present = np.unique(labels)
    return {"label": present, "n": np.array([(labels == c).sum() for c in present]),
            "sum": np.stack([images[labels == c].astype(np.float64).sum(axis=0) for c in present])}
total, counts = np.zeros((len(classes), H, W, 3)), np.zeros(len(classes))
train = ray.data.read_images(f"{root}/train", mode="RGB", include_paths=True)
for part in train.map_batches(sums, batch_size=256).iter_batches(batch_size=None, batch_format="numpy"):
    np.add.at(total, part["label"], part["sum"])
    np.add.at(counts, part["label"], part["n"])
prototypes = (total / counts[:, None, None, None] / 255.0).astype(np.float32).reshape(len(classes), -1)
ref = ray.put(prototypes)
def predict(batch):
    p = ray.get(ref).astype(np.float64)
    images, labels = resized(batch)
    x = images.reshape(len(images), -1) / 255.0
    l1, l2 = [], []
    for row in x:
        d = np.abs(row[None] - p)
        l1.append(d.mean(axis=1).argmin())
        l2.append(np.sqrt((d * d).mean(axis=1)).argmin())
    return {"label": labels, "l1": np.array(l1), "l2": np.array(l2)}
correct = {"l1": [0] * len(classes), "l2": [0] * len(classes)}
val = ray.data.read_images(f"{root}/val", mode="RGB", include_paths=True)
for part in val.map_batches(predict, batch_size=64).iter_batches(batch_size=None, batch_format="numpy"):
    for m in ("l1", "l2"):
        for c in part["label"][part[m] == part["label"]].tolist():
            correct[m][c] += 1
ray.shutdown()
print(json.dumps({"correct": correct}))
"""


CPUACCT = Path("/sys/fs/cgroup/cpuacct")  # cgroup v1: the CPU time of every process a run starts


def timed(argv: list[str], env: dict, cwd: Path = PROJECT) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of the run, and the run; its CPU-seconds in `run.cpu_s` (None where this
    process cannot make a cgroup: it needs root and cgroup v1's cpuacct)."""
    group = CPUACCT / f"mnist37-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpuacct.usage").write_text("0")
    except OSError:
        group = None
    # The child joins the cgroup before it execs: Ray's processes, the job's workers, are counted too.
    join = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
    clock = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, preexec_fn=join)
    wall = time.perf_counter() - clock
    run.cpu_s = None
    if group:
        time.sleep(1)  # the run's last processes (a Ray's, stopped as it ends) leave the cgroup
        run.cpu_s = int((group / "cpuacct.usage").read_text()) / 1e9
        for pid in (group / "cgroup.procs").read_text().split():  # stragglers go back to the root group
            with contextlib.suppress(OSError):
                (CPUACCT / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            group.rmdir()
    return wall, run


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def job(args, root: Path, env: dict, draft: bool, checkout: Path | None = None) -> tuple[float, dict]:
    """The job from this checkout, or from `checkout` (its code first on PYTHONPATH)."""
    name = "job-base" if checkout else "job-draft" if draft else "job"
    if checkout:
        env = {**env, "PYTHONPATH": str(checkout)}
    chunks, out = args.work / f"chunks-{name}", args.work / f"out-{name}"
    shutil.rmtree(chunks, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "jobs/evaluate.py", "--data", str(root), "--classes", "all", "--channels", "rgb",
            "--image-size", f"{args.image_size}x{args.image_size}", "--train-split", "train", "--eval-split", "val",
            "--ray-address", "local", "--chunk-dir", str(chunks), "--out", str(out)]
    wall, run = timed(argv + (["--jpeg-draft", "true"] if draft else []), env, checkout or PROJECT)
    if run.returncode != 0:
        raise RuntimeError(f"{name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    classes, val = results["classes"], results["counts"]["val"]
    correct = {m: [round(r["per_class"][c] * val[c]) if r["per_class"][c] is not None else 0 for c in classes]
               for m, r in results["metrics"].items()}
    report = out / "report.html"
    return wall, {"correct": correct, "elapsed_s": results.get("elapsed_s", {}), "cpu_s": run.cpu_s,
                  "results_json_bytes": (out / "results.json").stat().st_size,
                  "report_html_bytes": report.stat().st_size if report.exists() else None,
                  "out_bytes": folder_bytes(out), "table_printed_lines": run.stdout.count("\n"),
                  "driver_peak_rss_bytes": results.get("memory", {}).get("driver_peak_rss_bytes"),
                  "worker_peak_rss_bytes": results.get("memory", {}).get("worker_peak_rss_bytes")}


def script(code: str, name: str, argv: list[str], env: dict) -> tuple[float, dict]:
    wall, run = timed([sys.executable, "-c", code, *argv], env)
    if run.returncode != 0:
        raise RuntimeError(f"{name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return wall, {**json.loads(run.stdout.strip().splitlines()[-1]), "cpu_s": run.cpu_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    imagenet_like.add_arguments(parser)
    parser.add_argument("--image-size", type=int, default=64, help="side every image is resized to")
    parser.add_argument("--repeats", type=int, default=1, help="rounds, each variant once per round")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--work", type=Path, default=Path("/dev/shm/many-classes"))
    parser.add_argument("--json", type=Path, default=None, help="figures (default: WORK/many_classes.json)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of the code to compare with: the job-base variant")
    args = parser.parse_args()
    if "job-base" in args.variants and args.baseline is None:
        parser.error("job-base runs the job of --baseline PATH (a checkout); give it")

    spec = imagenet_like.spec_from(args)
    clock = time.perf_counter()
    root = imagenet_like.make(args.work, spec)
    files = spec.classes * (spec.train + spec.val)
    print(f"{files:,} JPEGs, {spec.classes} classes x ({spec.train} train + {spec.val} val), "
          f"{int((root / '.bytes').read_text()) / 1e6:.0f} MB in {root} (ready in {time.perf_counter() - clock:.1f} s); "
          f"to {args.image_size}x{args.image_size}", flush=True)

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(PROJECT)}
    env.pop("RAY_ADDRESS", None)
    size = str(args.image_size)
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for round_ in range(args.repeats):
        for variant in args.variants:
            load = os.getloadavg()[0]
            if variant in ("job", "job-draft", "job-base"):
                wall, figures = job(args, root, env, variant == "job-draft",
                                    args.baseline.resolve() if variant == "job-base" else None)
            elif variant in ("loop", "loop-draft"):
                wall, figures = script(LOOP, variant, [str(root), size, size, "1" if variant == "loop-draft" else "0"],
                                       env)
            else:
                wall, figures = script(RAY_DATA, variant, [str(root), size, size], env)
            runs[variant].append({"wall_s": wall, "load_average_1min": load, **figures})
            correct = {m: sum(v) for m, v in figures["correct"].items()}
            stages = ", ".join(f"{k} {v:.1f}" for k, v in figures.get("elapsed_s", {}).items()
                               if isinstance(v, (int, float)))
            cpu = f"{figures['cpu_s']:7.1f} CPU-s" if figures.get("cpu_s") is not None else ""
            print(f"round {round_ + 1} {variant:<10} {wall:8.1f} s {cpu} correct {correct} of {spec.classes * spec.val}"
                  f"  (load average {load:.1f} before){'  stages (s): ' + stages if stages else ''}", flush=True)

    loop = statistics.median(r["wall_s"] for r in runs["loop"]) if runs.get("loop") else None
    print(f"\n{files:,} JPEGs, {spec.classes} classes, to {args.image_size}x{args.image_size}; "
          f"medians of {args.repeats} (wall s: the whole process)")
    print(f"{'variant':<11} {'wall s':>8} {'x loop':>7} {'CPU-s':>7} {'l1 correct':>11} {'l2 correct':>11}")
    for variant, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        cpus = [r["cpu_s"] for r in rs if r.get("cpu_s") is not None]
        last = rs[-1]["correct"]
        print(f"{variant:<11} {wall:>8.1f} {f'{wall / loop:.3f}' if loop else '-':>7} "
              f"{f'{statistics.median(cpus):.1f}' if cpus else '-':>7} {sum(last['l1']):>11} {sum(last['l2']):>11}")
    if "job" in runs and "job-base" in runs:
        for what in ("wall_s", "cpu_s"):
            pairs = [(a[what], b[what]) for a, b in zip(runs["job"], runs["job-base"]) if a.get(what) and b.get(what)]
            if pairs:
                ratios = [b / a for a, b in pairs]
                print(f"job-base / job per round, {what}: {', '.join(f'{r:.2f}' for r in ratios)} "
                      f"(median {statistics.median(ratios):.2f})")
    for group in (("loop", "job", "ray-data", "job-base"), ("loop-draft", "job-draft")):
        present = [v for v in group if v in runs]
        if len(present) > 1:
            same = len({json.dumps(r["correct"]) for v in present for r in runs[v]}) == 1
            print(f"{' = '.join(present)}: the same correct images per class and metric: {same}")
    for variant in ("job", "job-draft", "job-base"):
        if variant in runs:
            r = runs[variant][-1]
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["elapsed_s"].items() if isinstance(v, (int, float)))
            print(f"{variant}: results.json {r['results_json_bytes'] / 1e6:.2f} MB, report.html "
                  f"{(r['report_html_bytes'] or 0) / 1e6:.2f} MB, output folder {r['out_bytes'] / 1e6:.2f} MB, "
                  f"{r['table_printed_lines']} lines printed, driver peak RSS "
                  f"{(r['driver_peak_rss_bytes'] or 0) / 2**30:.2f} GiB; stages (s): {stages}")
    path = args.json or args.work / "many_classes.json"
    path.write_text(json.dumps({"spec": imagenet_like.asdict(spec), "image_size": args.image_size, "runs": runs},
                               indent=1))
    print(f"figures in {path}")


if __name__ == "__main__":
    main()
