"""The distance classifier: each image goes to the class of its nearest prototype.

Metrics, over the H*W pixels of images scaled to [0, 1]:
  l1: mean absolute difference (fastbook's `mnist_distance`)
  l2: root mean squared difference
Each image goes to the class of least *exact* distance, ties to the earlier class, on every
device (mnist37.distances: fast sums with proven bounds, rechecked where they cannot decide).
Here: the device, batches onto it, confusions, misclassified images, and one chunk's outcome.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from mnist37 import Mnist37Error
from mnist37.chunks import Source, read_chunk
from mnist37.distances import nearest_with_distances, nearest_with_top_k
from mnist37.examples import Example, Sides
from mnist37.memory import reuse_freed_memory
from mnist37.predictions import PredictionsFile, PredictionsRequest, write_chunk

# Images per step on a GPU; the working set is a few float64 [BATCH_IMAGES, C] matrices
# (the sums, their bounds) and torch.cdist's and the matrix product's outputs.
BATCH_IMAGES = 8192
# Images per step on the CPU: the float32 pixel values [CPU_BATCH_IMAGES, H*W] that torch.cdist
# reads stay small (3.2 MB for 28x28 images), and so do the [CPU_BATCH_IMAGES, C] sums.
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
    # metric -> bool [N]: the true class among the top_k nearest (in_top_k); empty when top_k is 0
    top_k: dict[str, torch.Tensor] = field(default_factory=dict)


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
                    metrics: Sequence[str], device: str = "auto", top_k: int = 0) -> Classified:
    """Confusion matrices per metric for `uint8 [N, H, W]` images, and every misclassified one;
    with `top_k`, whether each image's true class is among its `top_k` nearest (in_top_k).

    Each batch waits on the device once per metric, to learn which images the fast sums left
    undecided (nearest); confusions and the misclassified images are worked out once, over all
    N, at the end."""
    dev = resolve_device(device)
    num_classes = len(prototypes)
    protos = torch.tensor(prototypes, dtype=torch.float32, device=dev)
    with warnings.catch_warnings():
        # Chunks are read-only memory maps; the tensors made from them are only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(images)
    true = torch.from_numpy(np.asarray(class_indices, dtype=np.int64)).to(dev)
    parts = {m: [] for m in metrics}
    guesses = {m: [] for m in metrics}
    hits = {m: [] for m in metrics}
    for start, batch in device_batches(pixels, dev, CPU_BATCH_IMAGES if dev.type == "cpu" else BATCH_IMAGES):
        for metric in metrics:
            if top_k:
                guess, dist, hit = nearest_with_top_k(batch, protos, true[start:start + len(batch)], metric, top_k)
                hits[metric].append(hit)
            else:
                guess, dist = nearest_with_distances(batch, protos, true[start:start + len(batch)], metric)
            guesses[metric].append(guess)
            parts[metric].append(dist)
    confusions, wrong, predicted, found = {}, {}, {}, {}
    for metric, chunks in parts.items():
        dist = torch.cat(chunks) if chunks else torch.empty(0, num_classes, device=dev)
        guess = torch.cat(guesses[metric]) if chunks else torch.empty(0, dtype=torch.int64, device=dev)
        confusions[metric] = confusion(true, guess, num_classes).cpu().numpy()
        rows = torch.nonzero(guess != true).flatten()
        d = dist[rows]
        # Both distances are float64 rechecks (nearest_with_distances); 0 where float64 could
        # not order an exact tie-break.
        margins = (d.gather(1, true[rows, None]) - d.gather(1, guess[rows, None])).clamp_(min=0)
        wrong[metric] = Misclassified(rows.cpu().numpy(), true[rows].cpu().numpy(), guess[rows].cpu().numpy(),
                                      margins.flatten().cpu().numpy(), d.cpu().numpy())
        predicted[metric], found[metric] = guess, dist
    in_top = {m: torch.cat(h) if h else torch.zeros(0, dtype=torch.bool, device=dev)
              for m, h in hits.items()} if top_k else {}
    return Classified(confusions, wrong, predicted, found, dev, in_top)


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


class ChunkOutcome(NamedTuple):
    """What classifying one chunk gives: its confusion matrices per metric, the device that
    computed them, per metric and true class the boundary examples, per metric the images of
    each true class whose class was among the top_k nearest (`int64 [C]`; empty when top_k is
    0), and the predictions file written (None when none was asked for)."""

    confusions: dict[str, np.ndarray]
    device: torch.device
    examples: dict[str, dict[int, Sides]]
    top_k: dict[str, np.ndarray]
    predictions: PredictionsFile | None


def classify_chunk(chunk: Source, prototypes: np.ndarray, metrics: Sequence[str], device: str = "auto",
                   examples: int = 0, expected_checksum: str | None = None, verify: bool = True, top_k: int = 0,
                   predictions: PredictionsRequest | None = None) -> ChunkOutcome:
    """Read one Arrow chunk (a memory-mapped file, a URI, or its bytes), verified against its
    checksum (and, when given, `expected_checksum`: the chunk decode reported), and classify it
    (ChunkOutcome): with up to `examples` misclassified images per metric and true class closest
    to and farthest from the boundary, top-`top_k` hits per class, and with `predictions` the
    chunk's predictions file (mnist37.predictions)."""
    reuse_freed_memory()
    read = read_chunk(chunk, expected_checksum, verify)
    done = classify_images(read.images, read.class_indices, prototypes, metrics, device, top_k)
    found = {}
    for metric, wrong in done.misclassified.items():
        picked = boundary_examples(wrong, len(prototypes), examples) if examples else {}
        found[metric] = {c: {side: [Example(read.paths[row], int(wrong.true[i]), int(wrong.predicted[i]),
                                            float(wrong.margins[i]), wrong.distances[i].tolist(),
                                            np.array(read.images[row]))
                                    for i in picks for row in [int(wrong.rows[i])]]
                             for side, picks in sides.items()}
                         for c, sides in picked.items()}
    true = np.asarray(read.class_indices, dtype=np.int64)
    hits = {m: np.bincount(true[h.cpu().numpy()], minlength=len(prototypes)).astype(np.int64)
            for m, h in done.top_k.items()}
    written = None
    if predictions is not None:
        written = write_chunk(predictions, expected_checksum, read.paths, true,
                              {m: p.cpu().numpy() for m, p in done.predicted.items()},
                              {m: d.cpu().numpy() for m, d in done.distances.items()},
                              {m: h.cpu().numpy() for m, h in done.top_k.items()})
    return ChunkOutcome(done.confusions, done.device, found, hits, written)
