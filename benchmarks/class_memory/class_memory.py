"""Peak memory of a decode worker and of the driver at 1,000 classes x 224x224x3.

    python benchmarks/class_memory/class_memory.py --work /tmp/class-memory \
        --code . --code /tmp/mnist37-0af93a2

Builds a synthetic ImageFolder (1,000 class folders of tiny RGB PNGs, resized by the job's
--image-size 224x224, --channels rgb, --classes all), then, for each mnist37 source tree given
with --code (the current tree, and e.g. an export of an older commit: `git archive 0af93a2 |
tar -x -C /tmp/mnist37-0af93a2`), runs in fresh processes, so each peak is its own:

- worker: `shards.decode_shard` (the decode task's body) on every training shard in turn, then its result
  pickled as Ray returns it to the driver; once decoding (fresh), once reusing the chunks it
  wrote (the footer read and verified);
- driver (when every training shard was decoded): `evaluation.decode` and the prototypes, as the job runs them, with the executor's
  decode map replaced by the workers' pickled results read from disk (one at a time, as they finish).

Peak RSS is the process's VmHWM (/proc/self/status). Every figure is printed per tree, side by
side. Needs Linux and the tree's dependencies (this venv's); runs without Ray's cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_data(root: Path, num_classes: int, per_class: int, side: int) -> None:
    """train/ and valid/ with `per_class` tiny RGB PNGs per class folder."""
    from PIL import Image

    if (root / "done").exists():
        return
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for c in range(num_classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "done").write_text("")


def planned(data: Path, chunk_dir: Path, shard_size: int, size: int):
    from mnist37.config import load
    from mnist37.locate import locate
    from mnist37.plan import plan

    return plan(locate(load(data=str(data), classes=["all"], channels="rgb", image_size=[size, size],
                            shard_size=shard_size, chunk_dir=str(chunk_dir), train_split="train",
                            eval_split="valid", chunk_transport="filesystem")))


def worker(args) -> dict:
    """Decode the training shards (the first `--shards`, or all) in this process, as one worker
    would in turn; write each result as Ray would send it to the driver."""
    from mnist37.shards import decode_shard

    plan = planned(args.data, args.chunks, args.shard_size, args.size)
    train = [s for s in plan.shards if s.split == "train"][:args.shards or None]
    out, sizes, classes = Path(args.results), [], []
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    for shard in train:
        done = decode_shard(shard, plan.root, plan.chunk_dir, plan.decoding, True)
        classes.append(int(np.count_nonzero(done.counts)))
        with open(out / f"{shard.index:06d}.pickle", "wb") as f:
            sizes.append(f.write(pickle.dumps(done, protocol=5)))
        reused = done.reused
    return {"peak_rss_bytes": vm_hwm_bytes(), "shards": len(train), "reused": reused,
            "classes_per_shard": max(classes), "result_bytes": max(sizes),
            "chunk_bytes": max(os.path.getsize(p) for p in Path(args.chunks).rglob("*.arrow")),
            "elapsed_s": time.perf_counter() - clock}


def driver(args) -> dict:
    """The job's driver stages decode (the reduce) and prototypes, fed the pickled results."""
    from mnist37 import evaluation
    from mnist37.progress import Status

    plan = planned(args.data, args.chunks, args.shard_size, args.size)
    files = sorted(Path(args.results).glob("*.pickle"))

    def results(*_, **__):
        for path in files:
            with open(path, "rb") as f:
                yield pickle.load(f)

    try:
        from mnist37.steps import Placement
    except ImportError:  # a tree from before mnist37.steps: its Ray map was distributed.decode_shards
        from mnist37 import distributed

        distributed.decode_shards = results  # the Ray map, replaced by what the workers sent
        clock = time.perf_counter()
        decoding = evaluation.decode(plan, 2, Status())
    else:
        class Replayed:  # the executor's decode map, replaced by what the workers sent
            def num_nodes(self) -> int:
                return 1

            def decode(self, requests, ship_split):
                return ((done, Placement()) for done in results())

        clock = time.perf_counter()
        decoding = evaluation.decode(plan, Replayed(), Status())
    prototypes = decoding.sums.prototypes(plan.names, "train")
    return {"peak_rss_bytes": vm_hwm_bytes(), "shards": len(files), "prototypes_bytes": prototypes.nbytes,
            "elapsed_s": time.perf_counter() - clock}


def run_child(code: Path, role: str, args, results: Path, chunks: Path) -> dict:
    """This script as `role`, importing mnist37 from `code`, in a fresh process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--data", str(args.data),
               "--chunks", str(chunks), "--results", str(results), "--shard-size", str(args.shard_size),
               "--size", str(args.size), "--shards", str(args.shards)]
    env = {**os.environ, "PYTHONPATH": str(code.resolve()), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True)  # cwd: not this tree
    if done.returncode:
        raise SystemExit(f"{role} under {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/class-memory"))
    parser.add_argument("--code", type=Path, action="append", help="an mnist37 source tree (repeatable)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1, help="images per class folder and split")
    parser.add_argument("--shard-size", type=int, default=250, help="images per shard")
    parser.add_argument("--shards", type=int, default=0,
                        help="training shards the worker decodes (default all); the driver runs only with all")
    parser.add_argument("--size", type=int, default=224, help="--image-size SIZExSIZE")
    parser.add_argument("--side", type=int, default=8, help="side of the PNGs written")
    parser.add_argument("--role", choices=["worker", "driver"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps((worker if args.role == "worker" else driver)(args)))
        return
    args.data = args.work / f"data-{args.classes}x{args.per_class}"
    make_data(args.data, args.classes, args.per_class, args.side)
    print(f"{args.classes} classes x {args.per_class} images a split, {args.size}x{args.size}x3, shard_size "
          f"{args.shard_size}: {-(-args.classes * args.per_class // args.shard_size)} training shards")
    rows = []
    for code in args.code or [Path(__file__).resolve().parents[2]]:
        scratch = args.work / "runs" / str(code.resolve()).strip("/").replace("/", "_")
        shutil.rmtree(scratch, ignore_errors=True)
        chunks, results = scratch / "chunks", scratch / "results"
        fresh = run_child(code, "worker", args, results, chunks)
        reused = run_child(code, "worker", args, results, chunks)
        assert reused["reused"], "the second worker run did not reuse the chunks"
        drive = run_child(code, "driver", args, results, chunks) if not args.shards else None
        rows.append((code, fresh, reused, drive))
        shutil.rmtree(scratch, ignore_errors=True)
    mib = lambda n: f"{n / 2**20:,.1f} MiB" if n is not None else "-"
    print(f"{'code':40} {'classes/shard':>13} {'worker fresh':>13} {'worker reuse':>13} {'driver':>11} "
          f"{'result':>12} {'chunk':>12}")
    for code, fresh, reused, drive in rows:
        print(f"{str(code):40} {fresh['classes_per_shard']:>13} {mib(fresh['peak_rss_bytes']):>13} "
              f"{mib(reused['peak_rss_bytes']):>13} {mib(drive and drive['peak_rss_bytes']):>11} "
              f"{mib(fresh['result_bytes']):>12} {mib(fresh['chunk_bytes']):>12}")


if __name__ == "__main__":
    main()
