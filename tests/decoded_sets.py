"""Data sets decoded without Ray, and classified on a device in one process: what the GPU's
correctness tests (tests/test_gpu_agreement.py, tests/gpu_agreement.py) and jobs/gpu_check.py
check a device on.

A lent GPU machine has PyTorch, PyArrow, Pillow and NumPy, but no Ray and no pyspng: a data set
is planned, decoded into Arrow chunks by the job's own decode stage (`evaluation.decode`, with
`steps.InProcess`, a process pool in place of Ray's decode tasks), reduced to prototypes, and its evaluation chunks
classified by `classify_images`, the function every classify task calls. `synthetic_problem`
makes a data set in memory, for class counts the real data sets lack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist37 import evaluation
from mnist37.chunks import read_chunk
from mnist37.classify import classify_images, resolve_device
from mnist37.config import Config
from mnist37.png import BadFilesError
from mnist37.locate import locate
from mnist37.plan import plan
from mnist37.progress import Status
from mnist37.prototypes import prototypes as mean_images
from mnist37.steps import InProcess
from mnist37.sources.keys import combine_digests


@dataclass
class DecodedSet:
    """A data set decoded into Arrow chunks, and its prototypes."""

    name: str  # its role: "mnist" or "mnist_sample"
    cfg: Config
    fingerprint: str  # 32 hex digits, as results.json's data.fingerprint
    classes: list[str]
    prototypes: np.ndarray  # float32 [C, H, W]
    counts: dict[str, int]  # images per split
    eval_chunks: list[str]  # paths of the evaluation split's chunks, in shard order
    train_chunks: list[str]  # the training split's, likewise (the NumPy reference's own means)
    num_shards: int
    workers: int
    scan_s: float  # finding the data (an archive is extracted once, into the cache) and listing it
    decode_s: float


@dataclass
class EvalSplit:
    """A split's images in chunk order, as the classify tasks see them (the evaluation split;
    the training split too, for the reference)."""

    images: np.ndarray  # uint8 [N, H, W], or [N, 3, H, W] for color
    class_indices: np.ndarray  # int64 [N]
    paths: list[str]


@dataclass
class Outcome:
    """One device's pass over a data set's evaluation chunks."""

    device: str
    confusions: dict[str, np.ndarray]  # metric -> int64 [C, C]
    predicted: dict[str, np.ndarray]  # metric -> int64 [N]
    distances: dict[str, np.ndarray]  # metric -> float32 [N, C]
    elapsed_s: float


def decode_set(name: str, cfg: Config, workers: int) -> DecodedSet:
    """Plan `cfg`'s data, decode every shard into `cfg.chunk_dir` through the evaluation's own
    decode stage, its steps in up to `workers` processes (`steps.InProcess`, forked: call this
    with several workers before anything touches CUDA), and reduce the training sums to
    prototypes."""
    planned = plan(locate(cfg))
    cfg = planned.cfg  # with the data set's splits and classes filled in
    clock = time.perf_counter()
    workers = max(1, min(workers, len(planned.shards)))
    decoded = evaluation.decode(planned, InProcess(workers), Status())  # shards sorted by (split, index)
    if decoded.rejected:
        raise BadFilesError(decoded.rejected, sum(d.num_files for d in decoded.shards))
    prototypes = decoded.sums.prototypes(planned.classes, cfg.train_split)
    chunks = {split: [d.chunk_path for d in decoded.shards if d.split == split and d.num_images]
              for split in (cfg.train_split, cfg.eval_split)}
    fingerprint = f"{combine_digests(*(d.digest for d in decoded.shards)):032x}"
    return DecodedSet(name, cfg, fingerprint, planned.classes, prototypes,
                      {split: int(c.sum()) for split, c in decoded.counts.items()}, chunks[cfg.eval_split],
                      chunks[cfg.train_split], len(decoded.shards), workers, planned.scan_s,
                      time.perf_counter() - clock)


def color_copy(sample_root: Path, dest: Path, per_class: int = 600) -> Path:
    """A color data set made at run time from mnist_sample's images (never kept): each gray
    image x becomes the RGB image (x, x moved one pixel right, 255 - x), saved as a PNG; the
    first `per_class` images of each class of each split. The check classifies it in three
    channels ([N, 3, 28, 28]) on each device, as it does the gray sets."""
    from PIL import Image

    for split in ("train", "valid"):
        for name in ("3", "7"):
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted((sample_root / split / name).iterdir())[:per_class]:
                with Image.open(path) as image:
                    x = np.asarray(image.convert("L"))
                rgb = np.stack([x, np.roll(x, 1, axis=1), 255 - x], axis=-1)
                Image.fromarray(rgb).save(folder / path.name, format="PNG")
    return dest


def eval_split(data: DecodedSet) -> EvalSplit:
    """The evaluation chunks' images, labels and paths, concatenated in chunk order."""
    return read_split(data.eval_chunks)


def read_split(chunks: list[str]) -> EvalSplit:
    """Chunks' images, labels and paths, concatenated in the order given."""
    read = [read_chunk(path) for path in chunks]
    return EvalSplit(np.concatenate([r.images for r in read]),
                     np.concatenate([r.class_indices for r in read]).astype(np.int64),
                     [p for r in read for p in r.paths])


def classify_set(data: DecodedSet, device: str) -> Outcome:
    """Classify the evaluation chunks one by one, as the classify tasks do, on `device`."""
    chunks = (read_chunk(path) for path in data.eval_chunks)
    return classify_pieces(((r.images, r.class_indices) for r in chunks), data.prototypes, data.cfg.metrics, device)


def classify_split(split: EvalSplit, prototypes: np.ndarray, metrics: list[str], device: str,
                   chunk_images: int = 8192) -> Outcome:
    """Classify a split held in memory, in pieces of a chunk's size, on `device`."""
    pieces = ((split.images[i:i + chunk_images], split.class_indices[i:i + chunk_images])
              for i in range(0, len(split.images), chunk_images))
    return classify_pieces(pieces, prototypes, metrics, device)


def classify_pieces(pieces, prototypes: np.ndarray, metrics: list[str], device: str) -> Outcome:
    """`classify_images` on each (images, class indices) piece in turn; the results joined."""
    size = len(prototypes)
    confusions = {m: np.zeros((size, size), dtype=np.int64) for m in metrics}
    predicted, distances = {m: [] for m in metrics}, {m: [] for m in metrics}
    clock = time.perf_counter()
    for images, class_indices in pieces:
        done = classify_images(images, class_indices, prototypes, metrics, device)
        for m in metrics:
            confusions[m] += done.confusions[m]
            predicted[m].append(done.predicted[m].cpu().numpy())
            distances[m].append(done.distances[m].cpu().numpy())
    return Outcome(str(resolve_device(device)), confusions, {m: np.concatenate(p) for m, p in predicted.items()},
                   {m: np.concatenate(d) for m, d in distances.items()}, time.perf_counter() - clock)


def synthetic_split(num_classes: int, per_class: int, shape: tuple[int, ...], seed: int) -> EvalSplit:
    """`per_class` images of each of `num_classes` classes: a random pattern per class (from
    `seed`) plus noise, clipped to uint8 [N, *shape]; labels in class order."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(num_classes).integers(0, 256, (num_classes, *shape))
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    images = np.clip(patterns[labels] + rng.normal(0, 60, (len(labels), *shape)), 0, 255).astype(np.uint8)
    return EvalSplit(images, labels, [f"synthetic/{c}/{i}" for i, c in enumerate(labels.tolist())])


def synthetic_problem(num_classes: int, train_per_class: int = 8, eval_per_class: int | None = None,
                      shape: tuple[int, ...] = (28, 28)) -> tuple[EvalSplit, EvalSplit, np.ndarray]:
    """A data set of `num_classes` classes made in memory (train, evaluation, and mnist37's
    float32 prototypes of the training split, by `mnist37.prototypes`): the hook for a case the
    real data sets lack, such as 1,000 classes (jobs/gpu_check.py --synthetic-classes 1000).
    `eval_per_class` defaults to 4, fewer for many classes (about 1,000 images in all, at least
    one per class): every image costs a distance to every class, on each device and in NumPy."""
    if eval_per_class is None:
        eval_per_class = max(1, min(4, 1000 // num_classes))
    train = synthetic_split(num_classes, train_per_class, shape, seed=1)
    evaluation = synthetic_split(num_classes, eval_per_class, shape, seed=2)
    sums = np.zeros((num_classes, *shape), dtype=np.int64)
    np.add.at(sums, train.class_indices, train.images)
    counts = np.bincount(train.class_indices, minlength=num_classes)
    return train, evaluation, mean_images(sums, counts, [str(c) for c in range(num_classes)], "synthetic")
