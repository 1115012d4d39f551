"""Accuracy from confusion matrices (rows = true class, columns = predicted class)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy_report(confusion: np.ndarray, classes: Sequence[str]) -> dict:
    """Per-class accuracy, their mean (fastbook's headline figure) and overall accuracy."""
    confusion = np.asarray(confusion, dtype=np.int64)
    per_class_total = confusion.sum(axis=1)
    correct = np.diag(confusion)
    per_class = {
        name: (float(correct[i] / per_class_total[i]) if per_class_total[i] else None)
        for i, name in enumerate(classes)
    }
    scored = [acc for acc in per_class.values() if acc is not None]
    total = int(confusion.sum())
    return {
        "per_class": per_class,
        "mean_class_accuracy": float(np.mean(scored)) if scored else None,
        "overall_accuracy": float(correct.sum() / total) if total else None,
        "correct": int(correct.sum()),
        "total": total,
        "confusion": confusion.tolist(),
    }
