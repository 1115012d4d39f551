"""The distance classifier on a GPU against the CPU: every prediction, the accuracies, throughput.

What jobs/gpu_check.py runs, in one process and without Ray (a lent GPU machine has PyTorch,
PyArrow, Pillow and NumPy, but no Ray and no pyspng): a data set is planned, decoded into Arrow
chunks by the job's own decode stage (`evaluation.decode`, a process pool in place of Ray's
tasks: `steps.InProcess`), reduced to prototypes, and its evaluation chunks classified by
`classify_images`, the function every classify task calls, once per device. The two devices' predictions are compared image by image.

Why predictions may differ at all: both devices start from the same float32 pixel differences
(mnist37.classify.scaled_pixels) but sum them in another order (on a GPU all classes in one
pass, with fused norm reductions), so a distance can differ in its last bits. How far is
proven: a sum of n terms of one sign, in any order, is within gamma(n - 1) = (n - 1)u / (1 -
(n - 1)u) of its exact value, u = 2^-24 (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., section 4.2); the squares, the division by the pixel count and the
square root add at most three roundings (`error_bound`). Every distance each device computes
is checked against that bound around the exact distance (the same float32 differences summed
in float64), and a prediction difference is accepted only as a *proven tie*: the two classes'
exact distances are closer than their bounds together, so a correct float32 computation may
order them either way, and both devices' distances to both lie within the bound. How close
the devices really come is reported in ulps beside it (a few, where the bound is hundreds).

What both devices must agree with, on any data set: an independent computation in NumPy and
float64 (`reference`) on the same decoded images, sharing nothing with mnist37's prototypes or
classifier: its own class means of the training images, its own distances, and argmin with the
same tie rule (the first of equal minima). A device's prediction may differ from it only at a
proven tie (`reference_bound`), so accuracies are checked on every data set the check is given,
with no table of expected figures to fall out of date.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist37 import evaluation, png
from mnist37.chunks import read_chunk
from mnist37.classify import PIXEL_VALUES, classify_images, resolve_device
from mnist37.config import Config
from mnist37.png import BadFilesError
from mnist37.locate import locate
from mnist37.plan import plan
from mnist37.progress import Status
from mnist37.prototypes import prototypes as mean_images
from mnist37.sources.keys import combine_digests
from mnist37.steps import InProcess

# float32's and float64's unit roundoff.
UNIT_ROUNDOFF = {np.float32: 2.0 ** -24, np.float64: 2.0 ** -53}
# float64 working memory per block of images when computing distances in NumPy: 512 images x
# 10 classes x 784 pixels is ~32 MB; 1,000 classes get blocks of 5 images.
REFERENCE_BYTES = 32 << 20


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


@dataclass
class Difference:
    """An image the two devices predict differently under one metric."""

    metric: str
    row: int
    path: str
    true: int
    picks: tuple[int, int]  # (CPU's class, GPU's class)
    cpu: tuple[float, float]  # CPU's float32 distances to (CPU's class, GPU's class)
    gpu: tuple[float, float]  # GPU's, likewise
    exact: tuple[float, float]  # float64 distances of the same float32 pixel differences
    bound: tuple[float, float]  # error_bound of each
    tie: bool


@dataclass
class Exactness:
    """One device's distances under one metric against the exact ones."""

    device: str
    metric: str
    max_ulps: int  # largest gap, in float32 ulps
    worst: float  # largest gap / error_bound: at most 1 for a correct float32 computation

    @property
    def ok(self) -> bool:
        return self.worst <= 1.0


@dataclass
class Comparison:
    num_images: int
    max_ulps: dict[str, int]  # metric -> largest CPU/GPU distance gap over all images and classes
    differences: list[Difference]

    @property
    def ok(self) -> bool:
        return all(d.tie for d in self.differences)


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


def decode_set(name: str, cfg: Config, workers: int) -> DecodedSet:
    """Plan `cfg`'s data, decode every shard into `cfg.chunk_dir` through the evaluation's own
    decode stage, its steps in up to `workers` processes (`steps.InProcess`), and reduce the
    training sums to prototypes.

    The pool forks: call this before anything touches CUDA (a forked child cannot use a CUDA
    context, and these children need none)."""
    if torch.cuda.is_initialized():
        raise RuntimeError("decode_set forks its workers: call it before CUDA is initialized")
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


def ulps_apart(a, b) -> np.ndarray:
    """How many float32 steps lie between float32 values a and b (0 when equal), elementwise."""
    def ordered(v):
        bits = np.asarray(v, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # sign-magnitude to a monotone line
    return np.abs(ordered(a) - ordered(b))


def exact_distances(images: np.ndarray, prototypes: np.ndarray, metric: str) -> np.ndarray:
    """float64 [M, C] distances of `uint8 [M, H, W]` images: the devices' own float32 pixel
    differences (each rounded to float32 as they round it), summed in float64, in blocks."""
    pixels = prototypes[0].size
    values = PIXEL_VALUES.numpy()
    out = np.empty((len(images), len(prototypes)), dtype=np.float64)
    block = block_images(len(prototypes), pixels)
    for start in range(0, len(images), block):
        x = values[images[start:start + block].reshape(-1, 1, pixels)]
        diff = (x - prototypes.reshape(1, len(prototypes), pixels)).astype(np.float64)
        if metric == "l1":
            out[start:start + len(x)] = np.abs(diff).mean(axis=-1)
        elif metric == "l2":
            out[start:start + len(x)] = np.sqrt(np.square(diff).mean(axis=-1))
        else:
            raise ValueError(f"Unknown metric {metric!r}; expected one of l1, l2")
    return out


def gamma(k: int, dtype=np.float32) -> float:
    """Higham's gamma(k) = k u / (1 - k u): the relative error bound of k roundings."""
    ku = k * UNIT_ROUNDOFF[dtype]
    return ku / (1 - ku)


def error_bound(exact: np.ndarray, pixels: int) -> np.ndarray:
    """The most a correct float32 computation of a distance over `pixels` differences may be off
    from `exact` (float64, from exact_distances), for either metric, in any summation order:
    gamma(pixels + 2) of it (pixels - 1 for the sum, one for the squares, at most two for the
    division or the multiplication by the reciprocal, under l2 halved by the square root, which
    adds one), plus float64's own gamma on the exact value."""
    return (gamma(pixels + 2) + gamma(pixels + 2, np.float64)) * np.abs(exact)


def exactness(outcome: Outcome, exact: dict[str, np.ndarray], pixels: int) -> list[Exactness]:
    """Each metric's distances on `outcome`'s device against `exact` (metric -> float64 [N, C])."""
    found = []
    for metric, reference in exact.items():
        computed = outcome.distances[metric]
        gap = np.abs(computed.astype(np.float64) - reference)
        bound = error_bound(reference, pixels)
        worst = float(np.max(np.divide(gap, bound, out=np.where(gap > 0, np.inf, 0.0), where=bound > 0), initial=0))
        found.append(Exactness(outcome.device, metric, int(ulps_apart(computed, reference).max(initial=0)), worst))
    return found


def near_ties(exact: np.ndarray, pixels: int) -> np.ndarray:
    """bool [N]: the images whose two nearest classes (by `exact`, float64 [N, C]) are a float32
    tie, closer than their error bounds together: a correct computation may predict either."""
    if exact.shape[1] < 2:
        return np.zeros(len(exact), dtype=bool)
    two = np.sort(exact, axis=1)[:, :2]
    bound = error_bound(two, pixels)
    return two[:, 1] - two[:, 0] <= bound[:, 0] + bound[:, 1]


def is_tie(cpu: tuple[float, float], gpu: tuple[float, float], exact: tuple[float, float],
           bound: tuple[float, float]) -> bool:
    """Whether two classes are a float32 tie: their exact distances are closer than their error
    bounds together, so a correct float32 computation may order them either way, and both
    devices' distances to each lie within its bound of the exact one."""
    return (abs(exact[0] - exact[1]) <= bound[0] + bound[1]
            and all(abs(device[c] - exact[c]) <= bound[c] for device in (cpu, gpu) for c in (0, 1)))


def compare(cpu: Outcome, gpu: Outcome, split: EvalSplit, exact: dict[str, np.ndarray]) -> Comparison:
    """Every image's prediction under every metric, CPU against GPU; each difference with both
    devices' distances, the exact ones and whether it is a proven tie."""
    differences, max_ulps = [], {}
    pixels = split.images[0].size if len(split.images) else 0
    for metric in cpu.predicted:
        max_ulps[metric] = int(ulps_apart(cpu.distances[metric], gpu.distances[metric]).max(initial=0))
        for row in np.flatnonzero(cpu.predicted[metric] != gpu.predicted[metric]).tolist():
            picks = (int(cpu.predicted[metric][row]), int(gpu.predicted[metric][row]))
            on_cpu = tuple(float(cpu.distances[metric][row, c]) for c in picks)
            on_gpu = tuple(float(gpu.distances[metric][row, c]) for c in picks)
            ref = tuple(float(exact[metric][row, c]) for c in picks)
            bound = tuple(float(b) for b in error_bound(np.array(ref), pixels))
            differences.append(Difference(metric, row, split.paths[row], int(split.class_indices[row]), picks,
                                          on_cpu, on_gpu, ref, bound, is_tie(on_cpu, on_gpu, ref, bound)))
    return Comparison(len(split.images), max_ulps, differences)


def format_difference(d: Difference, classes: list[str]) -> str:
    a, b = (classes[c] for c in d.picks)
    return (f"{d.metric} {d.path} (true {classes[d.true]}): cpu says {a}, gpu says {b}; "
            f"d({a}), d({b}) cpu {d.cpu[0]:.9g}, {d.cpu[1]:.9g} ({ulps_apart(*d.cpu)} ulps apart), "
            f"gpu {d.gpu[0]:.9g}, {d.gpu[1]:.9g} ({ulps_apart(*d.gpu)} ulps apart), "
            f"exact {d.exact[0]:.12g}, {d.exact[1]:.12g} (float32 error bound {d.bound[0]:.2g}): "
            + ("a proven tie" if d.tie else "NOT a tie: a distance is off by more than float32's error bound"))


def format_exactness(e: Exactness) -> str:
    return (f"{e.device} {e.metric} distances vs exact: at most {e.max_ulps} ulps off, "
            f"{e.worst:.3f} of float32's error bound: {'ok' if e.ok else 'WRONG'}")


def block_images(num_classes: int, pixels: int) -> int:
    """Images per block of a float64 [block, C, pixels] working array of about REFERENCE_BYTES."""
    return max(1, REFERENCE_BYTES // (8 * num_classes * pixels))


@dataclass
class Reference:
    """One metric computed in NumPy and float64 from the decoded images alone."""

    metric: str
    distances: np.ndarray  # float64 [N, C]
    predicted: np.ndarray  # int64 [N]: the first class at the smallest distance
    confusion: np.ndarray  # int64 [C, C]: rows true class, columns predicted


def reference(train: EvalSplit, evaluation: EvalSplit, num_classes: int, metrics: list[str]) -> dict[str, Reference]:
    """fastbook's method once more, apart from mnist37's code: each class's mean training image
    in float64 (pixel / 255), each evaluation image's float64 distance to every mean (l1: mean
    absolute difference; l2: root mean square), argmin taking the first of equal minima, as
    torch.argmin does; metric -> Reference."""
    pixels = train.images[0].size
    means = np.empty((num_classes, pixels), dtype=np.float64)
    for c in range(num_classes):
        members = train.images[train.class_indices == c].reshape(-1, pixels)
        if not len(members):
            raise ValueError(f"class {c} has no training images: the reference has no mean for it")
        means[c] = members.sum(axis=0, dtype=np.float64) / len(members) / 255.0
    found = {}
    for metric in metrics:
        out = np.empty((len(evaluation.images), num_classes), dtype=np.float64)
        block = block_images(num_classes, pixels)
        for start in range(0, len(out), block):
            diff = evaluation.images[start:start + block].reshape(-1, 1, pixels) / 255.0 - means
            if metric == "l1":
                out[start:start + len(diff)] = np.abs(diff).mean(axis=-1)
            elif metric == "l2":
                out[start:start + len(diff)] = np.sqrt(np.square(diff).mean(axis=-1))
            else:
                raise ValueError(f"Unknown metric {metric!r}; expected one of l1, l2")
        predicted = out.argmin(axis=1)
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusion, (evaluation.class_indices, predicted), 1)
        found[metric] = Reference(metric, out, predicted, confusion)
    return found


def reference_bound(exact: np.ndarray, pixels: int) -> np.ndarray:
    """The most a correct float32 computation of a distance may be off from the reference's
    float64 one (`exact`): `error_bound` with one rounding more (the float32 difference of each
    pixel), plus the inputs' own roundings: a float32 pixel value and a float32 class mean are
    each within one rounding of values in [0, 1], so each difference, and a mean or root mean
    square of differences, is within 2u of the exact one (3u leaves float64's own room)."""
    return (gamma(pixels + 3) + gamma(pixels + 3, np.float64)) * np.abs(exact) + 3 * UNIT_ROUNDOFF[np.float32]


@dataclass
class Agreement:
    """One device's predictions under one metric against the reference's."""

    device: str
    metric: str
    num_images: int
    ties: list[int]  # rows predicted otherwise than the reference, at a proven tie
    wrong: list[int]  # rows predicted otherwise, not at a tie: the device (or mnist37's prototypes) is wrong
    device_accuracy: float  # mean of per-class accuracies, this device's
    reference_accuracy: float  # the reference's

    @property
    def ok(self) -> bool:
        return not self.wrong


def mean_class_accuracy(confusion: np.ndarray) -> float:
    totals = confusion.sum(axis=1)
    return float(np.mean(np.diag(confusion)[totals > 0] / totals[totals > 0]))


def agree(outcome: Outcome, references: dict[str, Reference], split: EvalSplit) -> list[Agreement]:
    """Each metric's predictions on `outcome`'s device against the reference, image by image: a
    difference passes only where the two classes' reference distances are closer than their
    `reference_bound`s together."""
    pixels = split.images[0].size if len(split.images) else 0
    found = []
    for metric, ref in references.items():
        predicted = np.asarray(outcome.predicted[metric])
        rows = np.flatnonzero(predicted != ref.predicted)
        mine, theirs = ref.distances[rows, predicted[rows]], ref.distances[rows, ref.predicted[rows]]
        tie = np.abs(mine - theirs) <= reference_bound(mine, pixels) + reference_bound(theirs, pixels)
        confusion = np.zeros_like(ref.confusion)
        np.add.at(confusion, (split.class_indices, predicted), 1)
        found.append(Agreement(outcome.device, metric, len(predicted), rows[tie].tolist(), rows[~tie].tolist(),
                               mean_class_accuracy(confusion), mean_class_accuracy(ref.confusion)))
    return found


def format_agreement(a: Agreement, split: EvalSplit, classes: list[str], outcome: Outcome,
                     references: dict[str, Reference]) -> str:
    said = (f"{a.device} {a.metric} vs the NumPy float64 reference: mean class accuracy {a.device_accuracy:.4f}, "
            f"reference {a.reference_accuracy:.4f}; ")
    if a.wrong:
        row = a.wrong[0]
        return said + (f"WRONG: {len(a.wrong)} of {a.num_images:,} predictions differ beyond a tie (first: "
                       f"{split.paths[row]}, true {classes[split.class_indices[row]]}: says "
                       f"{classes[outcome.predicted[a.metric][row]]}, reference "
                       f"{classes[references[a.metric].predicted[row]]})")
    return said + (f"{a.num_images:,} predictions the same" if not a.ties else
                   f"{a.num_images:,} predictions the same but {len(a.ties)} proven ties")


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


def decoder_name() -> str:
    return "libspng (pyspng) for 8-bit grayscale, else Pillow" if png.pyspng else "Pillow (no pyspng)"


def temporary_chunk_dir() -> tempfile.TemporaryDirectory:
    """Chunks are decoded afresh into a folder removed at the end: the check measures decoding."""
    return tempfile.TemporaryDirectory(prefix="mnist37-gpu-check-")
