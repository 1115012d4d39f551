"""The output folder: results.json, the prototypes as PNG images, and the accuracy table."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Prototype images are 28x28; the side-by-side sheet is enlarged this many times to be seen.
SHEET_SCALE = 8


def format_table(results: dict) -> str:
    """Per-class, mean-of-classes and overall accuracy, one column per metric."""
    metrics = results["metrics"]
    names = list(metrics)
    counts = results["counts"][results["config"]["eval_split"]]
    rows = [(f"{name}  (n={counts[name]})", [metrics[m]["per_class"][name] for m in names])
            for name in results["classes"]]
    rows.append(("mean of classes", [metrics[m]["mean_class_accuracy"] for m in names]))
    rows.append(("overall", [metrics[m]["overall_accuracy"] for m in names]))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'class':<{width}}  " + "  ".join(f"{m:>6}" for m in names)]
    lines += [f"{label:<{width}}  " + "  ".join("     -" if v is None else f"{v:6.4f}" for v in values)
              for label, values in rows]
    return "\n".join(lines)


def format_files(results: dict) -> str:
    """The accounting per split and class: found = used + rejected (and what was ignored)."""
    lines = [f"{'files':<16}{'found':>9}{'used':>9}{'rejected':>9}{'ignored':>9}"]
    for split, classes in results["files"].items():
        for name, a in classes.items():
            lines.append(f"{split + '/' + name:<16}{a['found']:>9}{a['used']:>9}{a['rejected']:>9}{a['ignored']:>9}")
    return "\n".join(lines)


def save_prototypes(folder: Path, prototypes: np.ndarray, classes: Sequence[str]) -> list[Path]:
    """Each `float32 [H, W]` prototype as an 8-bit grayscale PNG, plus one enlarged sheet of all."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.rint(prototypes * 255.0), 0, 255).astype(np.uint8)
    paths = []
    for name, image in zip(classes, pixels):
        path = folder / f"prototype_{name}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    sheet = np.concatenate(list(pixels), axis=1)
    h, w = sheet.shape
    path = folder / "prototypes.png"
    Image.fromarray(sheet).resize((w * SHEET_SCALE, h * SHEET_SCALE), Image.NEAREST).save(path)
    paths.append(path)
    return paths


def write_outputs(out: Path, results: dict, prototypes: np.ndarray) -> str:
    """Write results.json (atomically), the prototypes (PNGs and exact float32 .npy) and
    table.txt; return the table."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "prototypes.npy", prototypes)
    results["prototypes_sha256"] = hashlib.sha256(np.ascontiguousarray(prototypes).tobytes()).hexdigest()
    results["outputs"] = ["prototypes.npy"] + [p.name for p in save_prototypes(out, prototypes, results["classes"])]
    table = format_table(results) + "\n\n" + format_files(results)
    (out / "table.txt").write_text(table + "\n")
    partial = out / "results.json.partial"
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, out / "results.json")
    return table
