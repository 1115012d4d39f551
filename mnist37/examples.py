"""Boundary examples: misclassified images nearest to the decision boundary and farthest from it,
shown in report.html. Plain records (no torch), so the driver can keep them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mnist37.accuracy import per_class_accuracy, ranked


@dataclass
class Example:
    """A misclassified image: how far past the decision boundary it fell, and its pixels."""

    path: str
    true: int
    predicted: int
    margin: float  # d(true) - d(predicted) >= 0
    # [C], to every prototype (float32 once kept by BoundaryExamples); None once let go
    distances: np.ndarray | list[float] | None
    image: np.ndarray | None  # uint8 [H, W] or [3, H, W]; None once let go

    def record(self) -> dict:
        """For results.json: everything but the pixels."""
        return {"path": self.path, "true": self.true, "predicted": self.predicted, "margin": self.margin,
                "distances": None if self.distances is None else np.asarray(self.distances).tolist()}


# Per true class: the misclassified images nearest to the boundary and farthest from it.
Sides = dict[str, list[Example]]  # {"closest": [...], "farthest": [...]}

SIDES = ("closest", "farthest")

# examples_<metric>.parquet: one row per kept example.
EXAMPLES_SCHEMA = pa.schema([
    ("true", pa.int32()), ("side", pa.string()), ("rank", pa.int32()), ("path", pa.string()),
    ("predicted", pa.int32()), ("margin", pa.float64()), ("distances", pa.list_(pa.float32())),
])


class BoundaryExamples:
    """Per metric and true class, the k misclassified images nearest to the decision boundary
    and the k farthest from it over every chunk, kept as chunks finish (at most 2k each).

    Their pixels and distances ([C] each) may be let go for the classes no report shows
    (`keep_only`), so that what the driver holds stays bounded when classes are many."""

    def __init__(self, k: int):
        self.k = k
        self.kept: dict[str, dict[int, Sides]] = {}

    def add(self, found: dict[str, dict[int, Sides]]) -> None:
        for metric, per_class in found.items():
            for c, sides in per_class.items():
                mine = self.kept.setdefault(metric, {}).setdefault(c, {"closest": [], "farthest": []})
                for e in (*sides["closest"], *sides["farthest"]):
                    if e.distances is not None:  # a list of Python floats is 8x the bytes
                        e.distances = np.asarray(e.distances, dtype=np.float32)
                pool = {e.path: e for e in [*mine["closest"], *mine["farthest"], *sides["closest"], *sides["farthest"]]}
                ranked = sorted(pool.values(), key=lambda e: (e.margin, e.path))
                mine["closest"], mine["farthest"] = ranked[:self.k], ranked[::-1][:self.k]

    def keep_only(self, metric: str, classes: Collection[int]) -> None:
        """Let go of the pixels and distances of `metric`'s examples outside `classes` (true
        class indices); their records (path, classes, margin) stay."""
        classes = set(classes)
        for c, sides in self.kept.get(metric, {}).items():
            if c not in classes:
                for kept in sides.values():
                    for e in kept:
                        e.image = e.distances = None

    def keep_worst(self, confusions: dict[str, np.ndarray], n: int) -> None:
        """Per metric, keep pixels and distances for the `n` worst classes by accuracy so far
        (`confusions`: metric -> int64 [C, C] summed over the chunks done) and let go of the rest."""
        for metric, matrix in confusions.items():
            self.keep_only(metric, ranked(per_class_accuracy(matrix))[:n].tolist())

    def of(self, metric: str, c: int) -> Sides:
        """`metric`'s examples of true class `c` (empty sides when none was misclassified)."""
        return self.kept.get(metric, {}).get(c, {"closest": [], "farthest": []})

    def report(self) -> dict:
        """For results.json: {metric: {class index as str: {side: [record, ...]}}}."""
        return {metric: {str(c): {side: [e.record() for e in kept] for side, kept in sides.items()}
                         for c, sides in sorted(per_class.items())}
                for metric, per_class in self.kept.items()}

    def table(self, metric: str) -> pa.Table:
        """`metric`'s examples as rows (EXAMPLES_SCHEMA), by true class, side and rank;
        `distances` is null where they were let go. Built from buffers: pyarrow's converters
        of Python and NumPy values import pandas first (1-2 s), which the driver has no use for."""
        rows = [(c, side, rank, e) for c, sides in sorted(self.kept.get(metric, {}).items())
                for side in SIDES for rank, e in enumerate(sides[side])]
        kept = [e.distances is not None for *_, e in rows]
        sizes = [len(e.distances) if e.distances is not None else 0 for *_, e in rows]
        values = [np.asarray(e.distances, dtype=np.float32) for *_, e in rows if e.distances is not None]
        distances = pa.Array.from_buffers(
            pa.list_(pa.float32()), len(rows),
            [_bitmap(kept), _offsets(sizes)],
            children=[_numbers(np.concatenate(values) if values else np.zeros(0, np.float32), pa.float32())])
        return pa.Table.from_arrays([
            _numbers([c for c, _, _, _ in rows], pa.int32()), _strings([side for _, side, _, _ in rows]),
            _numbers([rank for _, _, rank, _ in rows], pa.int32()), _strings([e.path for *_, e in rows]),
            _numbers([e.predicted for *_, e in rows], pa.int32()), _numbers([e.margin for *_, e in rows], pa.float64()),
            distances], schema=EXAMPLES_SCHEMA)

    def images(self) -> dict[str, np.ndarray]:
        """The pixels of every kept example, by path (uint8 [H, W])."""
        return {e.path: e.image for per_class in self.kept.values() for sides in per_class.values()
                for kept in sides.values() for e in kept if e.image is not None}


def _numbers(values, kind: pa.DataType) -> pa.Array:
    data = np.asarray(values, dtype=kind.to_pandas_dtype())
    return pa.Array.from_buffers(kind, len(data), [None, pa.py_buffer(np.ascontiguousarray(data))])


def _offsets(sizes: list[int]) -> pa.Buffer:
    return pa.py_buffer(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int32))


def _strings(values: list[str]) -> pa.Array:
    encoded = [v.encode() for v in values]
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, _offsets([len(v) for v in encoded]),
                                                             pa.py_buffer(b"".join(encoded))])


def _bitmap(valid: list[bool]) -> pa.Buffer | None:
    return None if all(valid) else pa.py_buffer(np.packbits(np.array(valid, dtype=bool), bitorder="little"))
