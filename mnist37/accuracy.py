"""Accuracy from confusion matrices (rows = true class, columns = predicted class)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy_report(confusion: np.ndarray, classes: Sequence[str], inline_confusion: bool = True) -> dict:
    """Per-class accuracy, their mean (fastbook's headline figure), overall accuracy and the
    most-confused pairs; the matrix itself as nested lists when `inline_confusion` (the
    caller writes a large one to a file instead: 1,000 classes are a million cells)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    per_class_total = confusion.sum(axis=1)
    correct = np.diag(confusion)
    per_class = {
        name: (float(correct[i] / per_class_total[i]) if per_class_total[i] else None)
        for i, name in enumerate(classes)
    }
    scored = [acc for acc in per_class.values() if acc is not None]
    total = int(confusion.sum())
    report = {
        "per_class": per_class,
        "mean_class_accuracy": float(np.mean(scored)) if scored else None,
        "overall_accuracy": float(correct.sum() / total) if total else None,
        "correct": int(correct.sum()),
        "total": total,
        "most_confused": [{"true": t, "predicted": p, "count": n} for t, p, n in most_confused(confusion, 10)],
    }
    if inline_confusion:
        report["confusion"] = confusion.tolist()
    return report


def top_k_report(hits: np.ndarray, totals: np.ndarray, classes: Sequence[str], k: int) -> dict:
    """Top-k accuracy from `hits` (int [C]: images of each true class whose class was among its k
    nearest) and `totals` (int [C]: images of each true class): per class (None: no images), their
    mean and overall, as accuracy_report gives top-1."""
    hits, totals = np.asarray(hits, dtype=np.int64), np.asarray(totals, dtype=np.int64)
    per_class = {name: (float(hits[i] / totals[i]) if totals[i] else None) for i, name in enumerate(classes)}
    scored = [acc for acc in per_class.values() if acc is not None]
    total = int(totals.sum())
    return {"k": k, "per_class": per_class, "mean_class_accuracy": float(np.mean(scored)) if scored else None,
            "overall_accuracy": float(hits.sum() / total) if total else None, "correct": int(hits.sum())}


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """float64 [C]: correct / images of each true class; NaN for a class with no images."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


def ranked(accuracies: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """int64 [<= C]: the indices of the classes that have an accuracy (not None or NaN), worst
    first; equal accuracies by index. The best are the end of it, reversed."""
    acc = np.array([np.nan if a is None else a for a in accuracies], dtype=np.float64)
    scored = np.flatnonzero(~np.isnan(acc))
    return scored[np.lexsort((scored, acc[scored]))]


def most_confused(confusion: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """The `n` largest off-diagonal counts as (true, predicted, count), largest first; equal
    counts by (true, predicted). Pairs never confused are left out."""
    confusion = np.array(confusion, dtype=np.int64)  # a copy: the diagonal is cleared
    np.fill_diagonal(confusion, 0)
    flat = confusion.ravel()
    n = min(n, int(np.count_nonzero(flat)))
    if n == 0:
        return []
    top = np.argpartition(-flat, n - 1)[:n] if n < flat.size else np.arange(flat.size)
    threshold = flat[top].min()
    candidates = np.flatnonzero(flat >= threshold)  # every tie at the cut, so the order is defined
    order = candidates[np.lexsort((candidates, -flat[candidates]))][:n]
    side = confusion.shape[1]
    return [(int(i // side), int(i % side), int(flat[i])) for i in order]
