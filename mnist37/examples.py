"""Boundary examples: misclassified images nearest to the decision boundary and farthest from it,
shown in report.html. Plain records (no torch), so the driver can keep them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Example:
    """A misclassified image: how far past the decision boundary it fell, and its pixels."""

    path: str
    true: int
    predicted: int
    margin: float  # d(true) - d(predicted) >= 0
    distances: list[float]  # [C], to every prototype
    image: np.ndarray  # uint8 [H, W]

    def record(self) -> dict:
        """For results.json: everything but the pixels."""
        return {"path": self.path, "true": self.true, "predicted": self.predicted, "margin": self.margin,
                "distances": self.distances}


# Per true class: the misclassified images nearest to the boundary and farthest from it.
Sides = dict[str, list[Example]]  # {"closest": [...], "farthest": [...]}



class BoundaryExamples:
    """Per metric and true class, the k misclassified images nearest to the decision boundary
    and the k farthest from it over every chunk, kept as chunks finish (at most 2k each)."""

    def __init__(self, k: int):
        self.k = k
        self.kept: dict[str, dict[int, Sides]] = {}

    def add(self, found: dict[str, dict[int, Sides]]) -> None:
        for metric, per_class in found.items():
            for c, sides in per_class.items():
                mine = self.kept.setdefault(metric, {}).setdefault(c, {"closest": [], "farthest": []})
                pool = {e.path: e for e in [*mine["closest"], *mine["farthest"], *sides["closest"], *sides["farthest"]]}
                ranked = sorted(pool.values(), key=lambda e: (e.margin, e.path))
                mine["closest"], mine["farthest"] = ranked[:self.k], ranked[::-1][:self.k]

    def report(self) -> dict:
        """For results.json: {metric: {class index as str: {side: [record, ...]}}}."""
        return {metric: {str(c): {side: [e.record() for e in kept] for side, kept in sides.items()}
                         for c, sides in sorted(per_class.items())}
                for metric, per_class in self.kept.items()}

    def images(self) -> dict[str, np.ndarray]:
        """The pixels of every kept example, by path (uint8 [H, W])."""
        return {e.path: e.image for per_class in self.kept.values() for sides in per_class.values()
                for kept in sides.values() for e in kept}
