"""Whether a device classifies right: its distances and predictions against the CPU's, the exact
distances and an independent NumPy float64 reference, image by image.

Test support: the CUDA tests (tests/test_gpu_agreement.py) use it, and so does jobs/gpu_check.py,
the check a lead runs on a lent GPU machine, without Ray, on data sets decoded and classified by
tests/decoded_sets.py. `verify` runs every check on one data set's outcomes. The throughput
study beside it is benchmarks/gpu_throughput/.

Why predictions may differ at all: both devices start from the same float32 pixel differences
(mnist37.distances.scaled_pixels) but sum them in another order (on a GPU all classes in one
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

from dataclasses import dataclass

import numpy as np

from mnist37.distances import PIXEL_VALUES
from tests.decoded_sets import EvalSplit, Outcome

# float32's and float64's unit roundoff.
UNIT_ROUNDOFF = {np.float32: 2.0 ** -24, np.float64: 2.0 ** -53}
# float64 working memory per block of images when computing distances in NumPy: 512 images x
# 10 classes x 784 pixels is ~32 MB; 1,000 classes get blocks of 5 images.
REFERENCE_BYTES = 32 << 20


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


def ulps_apart(a, b) -> np.ndarray:
    """How many float32 steps lie between float32 values a and b (0 when equal), elementwise."""
    def ordered(v):
        bits = np.asarray(v, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # sign-magnitude to a monotone line
    return np.abs(ordered(a) - ordered(b))


def exact_distances(images: np.ndarray, prototypes: np.ndarray, metric: str) -> np.ndarray:
    """float64 [M, C] distances of `uint8 [M, H, W]` images: the devices' own float32 pixel
    differences (each rounded to float32 as they round it), summed in float64, in blocks."""
    values, flat = PIXEL_VALUES.numpy(), prototypes.reshape(len(prototypes), -1)
    return blocked_distances(images, len(flat), metric, lambda x: (values[x] - flat).astype(np.float64))


def blocked_distances(images: np.ndarray, num_classes: int, metric: str, difference) -> np.ndarray:
    """float64 [N, C]: each image's distance to each class, from `difference(x)` (x: uint8
    [B, 1, P], a block of images flattened) giving float64 [B, C, P] differences, in blocks
    that keep that array near REFERENCE_BYTES; l1 the mean absolute difference, l2 the root
    mean square."""
    if metric not in ("l1", "l2"):
        raise ValueError(f"Unknown metric {metric!r}; expected one of l1, l2")
    pixels = images[0].size if len(images) else 0
    out = np.empty((len(images), num_classes), dtype=np.float64)
    block = block_images(num_classes, max(pixels, 1))
    for start in range(0, len(images), block):
        diff = difference(images[start:start + block].reshape(-1, 1, pixels))
        out[start:start + len(diff)] = np.abs(diff).mean(axis=-1) if metric == "l1" else \
            np.sqrt(np.square(diff).mean(axis=-1))
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
        out = blocked_distances(evaluation.images, num_classes, metric, lambda x: x / 255.0 - means)
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


@dataclass
class Verdict:
    """A data set's outcomes on each device, checked (`verify`)."""

    findings: list[str]  # one line per check, as jobs/gpu_check.py prints them
    failures: list[str]  # one line per failed check; none when every device is right
    near: dict[str, np.ndarray]  # metric -> bool [N]: the images at a float32 tie (`near_ties`)

    @property
    def ok(self) -> bool:
        return not self.failures


def verify(name: str, classes: list[str], metrics: list[str], prototypes: np.ndarray, train: EvalSplit,
           split: EvalSplit, outcomes: dict[str, Outcome]) -> Verdict:
    """Each device's outcome (device -> Outcome of `split`) against the NumPy reference (from
    `train`) and the exact distances (from `prototypes`), and, with two devices ("cpu" and
    "cuda"), against each other."""
    findings, failures = [], []
    references = reference(train, split, len(classes), metrics)
    for outcome in outcomes.values():
        for a in agree(outcome, references, split):
            findings.append(format_agreement(a, split, classes, outcome, references))
            if not a.ok:
                failures.append(f"{name} {a.device} {a.metric}: {len(a.wrong)} predictions differ from the NumPy "
                                "float64 reference beyond a tie")
    exact = {m: exact_distances(split.images, prototypes, m) for m in metrics}
    for outcome in outcomes.values():
        for e in exactness(outcome, exact, split.images[0].size):
            findings.append(format_exactness(e))
            if not e.ok:
                failures.append(f"{name} {e.device} {e.metric} distances off by {e.worst:.2f} "
                                "times float32's error bound")
    if len(outcomes) == 2:
        comparison = compare(outcomes["cpu"], outcomes["cuda"], split, exact)
        for metric, ulps in comparison.max_ulps.items():
            differing = sum(d.metric == metric for d in comparison.differences)
            said = f"{differing} predictions differ" if differing else "predictions identical"
            findings.append(f"cpu vs cuda, {metric}: {said} on {comparison.num_images:,} images; "
                            f"distances at most {ulps} ulps apart")
        findings += ["  " + format_difference(d, classes) for d in comparison.differences]
        if not comparison.ok:
            failures.append(f"{name}: {sum(not d.tie for d in comparison.differences)} predictions "
                            "differ between cpu and cuda beyond a proven float32 tie")
    return Verdict(findings, failures, {m: near_ties(e, split.images[0].size) for m, e in exact.items()})
