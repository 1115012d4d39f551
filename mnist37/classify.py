"""The distance classifier: each image goes to the class of its nearest prototype.

Metrics, over the H*W pixels of images scaled to [0, 1]:
  l1: mean absolute difference (fastbook's `mnist_distance`)
  l2: root mean squared difference
Ties go to the earlier class in `classes` order (torch.argmin's first minimum).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mnist37 import Mnist37Error
from mnist37.chunks import Source, read_chunk
from mnist37.examples import Example, Sides
from mnist37.prototypes import PIXEL_MAX

# Images per step on the device: bounds the float32 working set to ~25 MB on CPU
# whatever the shard size.
BATCH_IMAGES = 8192


class DeviceError(Mnist37Error, RuntimeError):
    """The configured device is not available to the process."""


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when this process sees a CUDA device, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device: 'cuda' was asked for but no CUDA device is visible to this process; "
                          "use device = 'auto' or 'cpu'")
    return torch.device(name)


def distances(images: torch.Tensor, prototypes: torch.Tensor, metrics: Sequence[str]) -> dict[str, torch.Tensor]:
    """Distances of `uint8 [N, H, W]` images to `float32 [C, H, W]` prototypes: {metric: float32 [N, C]}.

    Both metrics come from one pass over the pixel differences, one class at a time so the
    working set stays `[N, H*W]`.
    """
    x = images.reshape(len(images), -1).float().div_(PIXEL_MAX)
    protos = prototypes.reshape(len(prototypes), -1).to(x.device, torch.float32)
    out = {m: torch.empty(len(x), len(protos), dtype=torch.float32, device=x.device) for m in metrics}
    for c, proto in enumerate(protos):
        diff = x - proto
        if "l1" in out:
            out["l1"][:, c] = diff.abs().mean(dim=1)
        if "l2" in out:
            out["l2"][:, c] = diff.square_().mean(dim=1).sqrt_()
    return out


def confusion(true: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`int64 [C, C]` counts, rows = true class, columns = predicted class."""
    flat = true.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class Classified:
    confusions: dict[str, np.ndarray]  # metric -> int64 [C, C], rows = true class
    # metric -> misclassified images as (row, true, predicted, margin, distances [C]); the margin
    # d(true) - d(predicted) >= 0 says how far past the decision boundary an image fell.
    misclassified: dict[str, list[tuple[int, int, int, float, list[float]]]]
    device: torch.device


def classify_images(images: np.ndarray, class_indices: np.ndarray, prototypes: np.ndarray,
                    metrics: Sequence[str], device: str = "auto") -> Classified:
    """Confusion matrices per metric for `uint8 [N, H, W]` images, and every misclassified one."""
    dev = resolve_device(device)
    num_classes = len(prototypes)
    protos = torch.tensor(prototypes, dtype=torch.float32, device=dev)
    with warnings.catch_warnings():
        # Chunks are read-only memory maps; the tensors made from them are only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(images)
        true = torch.from_numpy(np.asarray(class_indices)).to(dev)
    totals = {m: torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dev) for m in metrics}
    wrong = {m: [] for m in metrics}
    for start in range(0, len(pixels), BATCH_IMAGES):
        batch = pixels[start:start + BATCH_IMAGES].to(dev, non_blocking=True)
        labels = true[start:start + BATCH_IMAGES]
        for metric, dist in distances(batch, protos, metrics).items():
            predicted = dist.argmin(dim=1)
            totals[metric] += confusion(labels, predicted, num_classes)
            rows = torch.nonzero(predicted != labels).flatten()
            if len(rows):
                d = dist[rows]
                margin = d.gather(1, labels[rows, None]) - d.gather(1, predicted[rows, None])
                wrong[metric] += [(start + r, t, p, m, ds) for r, t, p, m, ds in zip(
                    rows.tolist(), labels[rows].tolist(), predicted[rows].tolist(),
                    margin.flatten().tolist(), d.tolist())]
    return Classified({m: t.cpu().numpy() for m, t in totals.items()}, wrong, dev)


def classify(images: np.ndarray, class_indices: np.ndarray, prototypes: np.ndarray,
             metrics: Sequence[str], device: str = "auto") -> dict[str, np.ndarray]:
    """Confusion matrices `int64 [C, C]` per metric for `uint8 [N, H, W]` images."""
    return classify_images(images, class_indices, prototypes, metrics, device).confusions


def boundary_examples(misclassified: list[tuple], num_classes: int, k: int) -> dict[int, dict[str, list]]:
    """Per true class, the k misclassified images closest to the decision boundary (smallest
    margin) and the k farthest from it (largest margin)."""
    out = {}
    for c in range(num_classes):
        ranked = sorted((w for w in misclassified if w[1] == c), key=lambda w: (w[3], w[0]))
        out[c] = {"closest": ranked[:k], "farthest": ranked[::-1][:k]}
    return out


def classify_chunk(chunk: Source, prototypes: np.ndarray, metrics: Sequence[str], device: str = "auto",
                   examples: int = 0) -> tuple[dict[str, np.ndarray], torch.device, dict[str, dict[int, Sides]]]:
    """Read one Arrow chunk (a memory-mapped file, a URI, or its bytes) and return its confusion
    matrices per metric, the device that computed them, and per metric and true class up to
    `examples` misclassified images closest to and farthest from the boundary."""
    read = read_chunk(chunk)
    done = classify_images(read.images, read.class_indices, prototypes, metrics, device)
    found = {}
    for metric, wrong in done.misclassified.items():
        picked = boundary_examples(wrong, len(prototypes), examples) if examples else {}
        found[metric] = {c: {side: [Example(read.paths[row], t, p, m, ds, np.array(read.images[row]))
                                    for row, t, p, m, ds in rows] for side, rows in sides.items()}
                         for c, sides in picked.items()}
    return done.confusions, done.device, found
