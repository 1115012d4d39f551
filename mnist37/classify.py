"""The distance classifier: each image goes to the class of its nearest prototype.

Metrics, over the H*W pixels of images scaled to [0, 1]:
  l1: mean absolute difference (fastbook's `mnist_distance`)
  l2: root mean squared difference
Ties go to the earlier class in `classes` order (torch.argmin's first minimum).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mnist37 import Mnist37Error
from mnist37.chunks import Source, read_chunk
from mnist37.examples import Example, Sides
from mnist37.memory import reuse_freed_memory
from mnist37.prototypes import PIXEL_MAX

# Images per step on a GPU: with DIFFERENCES_AT_ONCE, bounds the working set to ~256 MB
# whatever the shard size.
BATCH_IMAGES = 8192
# Images per step on the CPU, where the working set is two float32 [CPU_BATCH_IMAGES, H*W]
# arrays (the scaled pixels and one class's differences): 3.2 MB for 28x28 images, which stay
# in cache and are reused, rather than 51 MB of fresh memory per step. An 8192-image chunk,
# two classes, l1 and l2: 17-18 ms at 1024, 22 at 2048, 63-75 at 8192 (the same distances,
# bit for bit; each image's distances are its own row's sums).
CPU_BATCH_IMAGES = 1024


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


# Most float32 pixel differences the all-classes pass holds at once (256 MB): all ten MNIST
# classes for a batch of BATCH_IMAGES 28x28 images; more classes go in several passes.
DIFFERENCES_AT_ONCE = 64 << 20

# The 256 values x / 255 a uint8 pixel can take, as float32, divided on the CPU. CUDA divides a
# tensor by a Python number as a multiplication by its reciprocal, one ulp off for some pixels;
# looking the values up makes every device start from the same float32 numbers.
PIXEL_VALUES = torch.arange(256, dtype=torch.uint8).float().div_(PIXEL_MAX)


@functools.cache
def _pixel_values_on(device: torch.device) -> torch.Tensor:
    # Once per device: a blocking copy per batch would wait for every kernel queued before it.
    return PIXEL_VALUES.to(device)


def scaled_pixels(images: torch.Tensor) -> torch.Tensor:
    """`uint8 [N, H, W]` images as `float32 [N, H*W]` in [0, 1], bit for bit the same on every device."""
    flat = images.reshape(len(images), -1)
    return _pixel_values_on(images.device).index_select(0, flat.reshape(-1).int()).reshape(flat.shape)


def distances(images: torch.Tensor, prototypes: torch.Tensor, metrics: Sequence[str],
              all_classes: bool | None = None) -> dict[str, torch.Tensor]:
    """Distances of `uint8 [N, H, W]` images to `float32 [C, H, W]` prototypes: {metric: float32 [N, C]}.

    Both metrics come from one pass over the same float32 pixel differences `x / 255 - prototype`
    (`scaled_pixels`). On the CPU (`all_classes` false, the default there) the pass goes one
    class at a time, so the working set stays `[N, H*W]`. On a GPU (`all_classes` true, the
    default on any other device) it is one broadcast `[N, C, H*W]` difference (in class groups
    of at most DIFFERENCES_AT_ONCE values) read by two fused norm reductions: about 7 kernels
    per batch rather than 8 per class, and the differences are read twice rather than 7 times
    per class. The differences are the same float32 numbers either way; only the order of the
    float32 sums (and the last roundings) differs, so the two agree to a few ulps and a
    prediction can differ only where two classes are that close (jobs/gpu_check.py checks it).
    """
    x = scaled_pixels(images)
    protos = prototypes.reshape(len(prototypes), -1).to(x.device, torch.float32)
    if all_classes is None:
        all_classes = x.device.type != "cpu"
    if all_classes:
        pixels = x.shape[1]
        step = max(1, DIFFERENCES_AT_ONCE // max(1, len(x) * pixels))  # classes per pass
        parts = {m: [] for m in metrics}
        for first in range(0, len(protos), step):
            diff = x[:, None, :] - protos[first:first + step]
            for m, found in parts.items():
                if m == "l1":
                    found.append(torch.linalg.vector_norm(diff, 1, dim=2).div_(pixels))
                elif m == "l2":
                    found.append(torch.linalg.vector_norm(diff, 2, dim=2).div_(math.sqrt(pixels)))
        return {m: found[0] if len(found) == 1 else torch.cat(found, dim=1) for m, found in parts.items()}
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
class Misclassified:
    """One metric's misclassified images, in row order."""

    rows: np.ndarray  # int64 [M], positions among the classified images
    true: np.ndarray  # int64 [M]
    predicted: np.ndarray  # int64 [M]
    # float32 [M]: d(true) - d(predicted) >= 0, how far past the decision boundary each fell
    margins: np.ndarray
    distances: np.ndarray  # float32 [M, C], to every prototype

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Classified:
    confusions: dict[str, np.ndarray]  # metric -> int64 [C, C], rows = true class
    misclassified: dict[str, Misclassified]
    # metric -> every image's prediction (int64 [N]) and distances (float32 [N, C]), left on
    # `device`: the job needs only the above; jobs/gpu_check.py compares these across devices.
    predicted: dict[str, torch.Tensor]
    distances: dict[str, torch.Tensor]
    device: torch.device


def device_batches(pixels: torch.Tensor, device: torch.device, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """`(start, uint8 batch of up to size images on device)`, in order.

    On CUDA each batch is copied on a side stream while the one before is computed on (two
    device buffers, guarded by events), so the copy overlaps the distances. Pixels not
    already in pinned memory (a memory-mapped chunk) are staged through two pinned buffers:
    a copy from pageable memory would hold this thread until it is done. A caller must be
    done with a batch (its kernels queued on the current stream) before asking for the next.
    """
    if device.type != "cuda":
        for start in range(0, len(pixels), size):
            yield start, pixels[start:start + size].to(device)
        return
    compute, copier = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    shape = (min(size, len(pixels)), *pixels.shape[1:])
    staging = None if pixels.is_pinned() else [torch.empty(shape, dtype=pixels.dtype, pin_memory=True)
                                                for _ in range(2)]
    buffers = [torch.empty(shape, dtype=pixels.dtype, device=device) for _ in range(2)]
    copied, consumed = [torch.cuda.Event() for _ in range(2)], [torch.cuda.Event() for _ in range(2)]
    for i, start in enumerate(range(0, len(pixels), size)):
        slot, source = i % 2, pixels[start:start + size]
        n = len(source)
        if staging is not None:
            if i >= 2:
                copied[slot].synchronize()  # the copy out of this staging buffer (batch i-2) is done
            staging[slot][:n].copy_(source)
            source = staging[slot][:n]
        with torch.cuda.stream(copier):
            if i >= 2:
                copier.wait_event(consumed[slot])  # batch i-2's kernels are done with this buffer
            buffers[slot][:n].copy_(source, non_blocking=True)
            copied[slot].record(copier)
        compute.wait_event(copied[slot])
        yield start, buffers[slot][:n]
        consumed[slot].record(compute)
    compute.wait_stream(copier)


def classify_images(images: np.ndarray, class_indices: np.ndarray, prototypes: np.ndarray,
                    metrics: Sequence[str], device: str = "auto") -> Classified:
    """Confusion matrices per metric for `uint8 [N, H, W]` images, and every misclassified one.

    Nothing waits on the device until every batch is queued: predictions, confusions and the
    misclassified images are worked out once, over all N, at the end."""
    dev = resolve_device(device)
    num_classes = len(prototypes)
    protos = torch.tensor(prototypes, dtype=torch.float32, device=dev)
    with warnings.catch_warnings():
        # Chunks are read-only memory maps; the tensors made from them are only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(images)
    true = torch.from_numpy(np.asarray(class_indices, dtype=np.int64)).to(dev)
    parts = {m: [] for m in metrics}
    for _, batch in device_batches(pixels, dev, CPU_BATCH_IMAGES if dev.type == "cpu" else BATCH_IMAGES):
        for metric, dist in distances(batch, protos, metrics).items():
            parts[metric].append(dist)
    confusions, wrong, predicted, found = {}, {}, {}, {}
    for metric, chunks in parts.items():
        dist = torch.cat(chunks) if chunks else torch.empty(0, num_classes, device=dev)
        guess = dist.argmin(dim=1)
        confusions[metric] = confusion(true, guess, num_classes).cpu().numpy()
        rows = torch.nonzero(guess != true).flatten()
        d = dist[rows]
        margins = d.gather(1, true[rows, None]) - d.gather(1, guess[rows, None])
        wrong[metric] = Misclassified(rows.cpu().numpy(), true[rows].cpu().numpy(), guess[rows].cpu().numpy(),
                                      margins.flatten().cpu().numpy(), d.cpu().numpy())
        predicted[metric], found[metric] = guess, dist
    return Classified(confusions, wrong, predicted, found, dev)


def boundary_examples(misclassified: Misclassified, num_classes: int, k: int) -> dict[int, dict[str, np.ndarray]]:
    """Per true class, the k misclassified images closest to the decision boundary (smallest
    margin, then earliest row) and the k farthest from it (largest margin, then latest row),
    as positions in `misclassified`."""
    ranked = np.lexsort((misclassified.rows, misclassified.margins))
    out = {}
    for c in range(num_classes):
        mine = ranked[misclassified.true[ranked] == c]
        out[c] = {"closest": mine[:k], "farthest": mine[::-1][:k]}
    return out


def classify_chunk(chunk: Source, prototypes: np.ndarray, metrics: Sequence[str], device: str = "auto",
                   examples: int = 0, expected_checksum: str | None = None, verify: bool = True
                   ) -> tuple[dict[str, np.ndarray], torch.device, dict[str, dict[int, Sides]]]:
    """Read one Arrow chunk (a memory-mapped file, a URI, or its bytes), verified against its
    checksum (and, when given, `expected_checksum`: the chunk decode reported), and return its
    confusion matrices per metric, the device that computed them, and per metric and true class
    up to `examples` misclassified images closest to and farthest from the boundary."""
    reuse_freed_memory()
    read = read_chunk(chunk, expected_checksum, verify)
    done = classify_images(read.images, read.class_indices, prototypes, metrics, device)
    found = {}
    for metric, wrong in done.misclassified.items():
        picked = boundary_examples(wrong, len(prototypes), examples) if examples else {}
        found[metric] = {c: {side: [Example(read.paths[row], int(wrong.true[i]), int(wrong.predicted[i]),
                                            float(wrong.margins[i]), wrong.distances[i].tolist(),
                                            np.array(read.images[row]))
                                    for i in picks for row in [int(wrong.rows[i])]]
                             for side, picks in sides.items()}
                         for c, sides in picked.items()}
    return done.confusions, done.device, found
