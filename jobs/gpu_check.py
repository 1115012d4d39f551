"""Check the distance classifier on a GPU against the CPU, image by image, and measure its throughput.

One process, no Ray (a lent GPU machine has none): decodes full MNIST and mnist_sample into
Arrow chunks with mnist37's own decode step (and a color copy of mnist_sample's images, made at
run time, in three channels), classifies each evaluation split with
`classify_images` (what every classify task calls) on the CPU and on CUDA, compares every
prediction (a difference passes only as a proven float32 tie, tests/gpu_agreement.py), checks
each device's predictions, hence its accuracies, against an independent NumPy float64
computation on the same decoded images, then times classification from host memory (pinned for
the GPU, so the copy is included and overlapped) for a range of batch sizes
(benchmarks/gpu_throughput/).

    python3 jobs/gpu_check.py --data .devdata/mnist_png.tgz --sample .devdata/mnist_sample.tgz

(docs/gpu-check.md says how to send the data along to a lent device.) Without a CUDA device it
cannot check what it is for: one line, `error: no CUDA device visible ...`, and exit status 1,
unless `--cpu-only` asks for the CPU half alone. Exit status 1 when a prediction differs beyond
a proven tie (between the devices, or from the NumPy reference), or a distance is further from
the exact one than float32's error bound; `error: ...` and 1 for bad input.
`--synthetic-classes 1000` adds a data set of that many classes made in memory (the check's
hook for class counts the real data sets lack).

A lab tool, not installed with mnist37: its correctness half is the test support
tests/decoded_sets.py and tests/gpu_agreement.py (the CUDA tests run the same checks:
tests/test_gpu_agreement.py), its throughput half the study benchmarks/gpu_throughput/.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script, mnist37 need not be installed
# torch.cuda.is_available() asks NVML rather than initializing CUDA: the decode pool forks after it.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402

from benchmarks.gpu_throughput import gpu_throughput  # noqa: E402
from benchmarks.support.cli import exit_status  # noqa: E402
from mnist37 import png  # noqa: E402
from mnist37.accuracy import accuracy_report  # noqa: E402
from mnist37.config import HelpFormatter, load  # noqa: E402
from mnist37.locate import locate  # noqa: E402
from mnist37.report import format_table  # noqa: E402
from tests import decoded_sets  # noqa: E402
from tests.gpu_agreement import verify  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, help="full MNIST: mnist_png.tgz (or its folder) (required)")
    parser.add_argument("--sample", required=True, help="fastai's mnist_sample.tgz (or its folder) (required)")
    parser.add_argument("--cache-dir", default="", help="where archives are extracted (default: mnist37's cache)")
    gpu_throughput.add_flags(parser)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes")
    parser.add_argument("--cpu-only", action="store_true",
                        help="run the CPU half alone, also where CUDA is (without CUDA and this flag: exit 1)")
    parser.add_argument("--synthetic-classes", type=int, nargs="*", default=[], metavar="C",
                        help="add a data set made in memory of C classes, for each C (e.g. 1000), checked the same way")
    args = parser.parse_args(argv)
    gpu_throughput.check_flags(parser, args)
    if any(c < 2 for c in args.synthetic_classes):
        parser.error("--synthetic-classes: expected at least 2 classes")
    if args.workers < 1:
        parser.error("--workers: expected at least 1")
    return args


def check_data_set(data: decoded_sets.DecodedSet, devices: list[str]) -> tuple[list[str], dict, dict]:
    """Classify the data set's evaluation chunks on each device, print the accuracies, how each
    device's predictions compare with the NumPy float64 reference, how far its distances are
    from the exact ones and (with two devices) every prediction that differs; return the
    failures, each device's predictions (metric -> int64 [N]) and the images at float32 ties
    (metric -> bool [N])."""
    cfg = data.cfg
    split = decoded_sets.eval_split(data)
    outcomes = {device: decoded_sets.classify_set(data, device) for device in devices}
    print(f"\n{data.name}: {cfg.eval_split} split, {len(split.images):,} images, "
          + ", ".join(f"{o.device} {o.elapsed_s:.3f} s" for o in outcomes.values()))
    for device, outcome in outcomes.items():
        counts = outcome.confusions[cfg.metrics[0]].sum(axis=1).tolist()
        print(f"[{device}]\n" + format_table({
            "classes": data.classes, "config": {"eval_split": cfg.eval_split},
            "counts": {cfg.eval_split: dict(zip(data.classes, counts))},
            "metrics": {m: accuracy_report(c, data.classes) for m, c in outcome.confusions.items()}}))
    verdict = verify(data.name, data.classes, cfg.metrics, data.prototypes,
                     decoded_sets.read_split(data.train_chunks), split, outcomes)
    print("\n".join("  " + line for line in verdict.findings))
    return verdict.failures, {device: o.predicted for device, o in outcomes.items()}, verdict.near


def check_synthetic(num_classes: int, metrics: list[str], devices: list[str]) -> list[str]:
    """A data set of `num_classes` classes made in memory, classified on each device and
    checked as the decoded ones are; return the failures."""
    train, split, prototypes = decoded_sets.synthetic_problem(num_classes)
    outcomes = {device: decoded_sets.classify_split(split, prototypes, metrics, device) for device in devices}
    name = f"synthetic {num_classes} classes"
    print(f"\n{name}: train {len(train.images):,}, evaluation {len(split.images):,} images "
          f"{'x'.join(map(str, split.images.shape[1:]))}, " + ", ".join(f"{o.device} {o.elapsed_s:.3f} s"
                                                                         for o in outcomes.values()))
    verdict = verify(name, [str(c) for c in range(num_classes)], metrics, prototypes, train, split, outcomes)
    print("\n".join("  " + line for line in verdict.findings))
    return verdict.failures


def decoder_name() -> str:
    return "libspng (pyspng) for 8-bit grayscale, else Pillow" if png.pyspng else "Pillow (no pyspng)"


def main(args: argparse.Namespace) -> int:
    clock = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_only
    if not cuda and not args.cpu_only:
        # Nothing this check is for can be checked here: saying so is a failure, not a pass.
        print(f"error: no CUDA device visible to torch {torch.__version__}: the GPU check cannot check the CUDA "
              "path here (--cpu-only runs its CPU half alone)", file=sys.stderr)
        return 1
    print(f"mnist37 GPU check: Python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, no Ray; PNG decoder: {decoder_name()}", flush=True)
    # Chunks are decoded afresh into a folder removed at the end: the check measures decoding.
    with tempfile.TemporaryDirectory(prefix="mnist37-gpu-check-") as chunk_dir:
        common = {"cache_dir": args.cache_dir, "reuse_chunks": False}
        sample = load(None, data=args.sample, chunk_dir=f"{chunk_dir}/mnist_sample", **common)
        # Decoding forks worker processes: it runs before anything touches CUDA. The real data
        # sets first, so that bad input stops the check before the color copy is made.
        sets = {name: decoded_sets.decode_set(name, cfg, args.workers) for name, cfg in (
            ("mnist", load(PROJECT_ROOT / "configs" / "mnist.toml", data=args.data, chunk_dir=f"{chunk_dir}/mnist",
                           **common)),
            ("mnist_sample", sample))}
        color = decoded_sets.color_copy(Path(locate(sample).root), Path(chunk_dir) / "color-data")
        sets["color"] = decoded_sets.decode_set(
            "color", load(None, data=str(color), channels="rgb", chunk_dir=f"{chunk_dir}/color", **common), args.workers)
        for data in sets.values():
            print(f"{data.name}: decoded {' + '.join(f'{s} {n:,}' for s, n in data.counts.items())} images "
                  f"({len(data.classes)} classes, {data.num_shards} shards) in {data.decode_s:.2f} s "
                  f"on {data.workers} processes (found and listed in {data.scan_s:.2f} s); "
                  f"fingerprint {data.fingerprint}", flush=True)
        if cuda:
            props = torch.cuda.get_device_properties(0)
            print(f"CUDA device: {props.name}, {props.multi_processor_count} SMs, "
                  f"{props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}")
        else:
            print(f"--cpu-only: the CPU half alone (torch {torch.__version__}, CUDA "
                  f"{'present, not used' if torch.cuda.is_available() else 'not visible'})")
        devices = ["cpu", "cuda"] if cuda else ["cpu"]
        failures, predictions, near = [], {}, {}
        for name, data in sets.items():
            found, predictions[name], near[name] = check_data_set(data, devices)
            failures += found
        for num_classes in args.synthetic_classes:
            failures += check_synthetic(num_classes, sets["mnist"].cfg.metrics, devices)
        failures += gpu_throughput.measure_throughput(args, sets["mnist"], predictions["mnist"], near["mnist"])
    verdict = "GPU check" if cuda else "CPU half"
    print(f"\n{verdict} {'FAILED: ' + '; '.join(failures) if failures else 'passed'} "
          f"in {time.perf_counter() - clock:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(exit_status(lambda: main(arguments)))
