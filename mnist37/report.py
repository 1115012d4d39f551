"""The output folder: results.json, the prototypes, the accuracy table, and report.html."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mnist37.prototypes import PIXEL_MAX
from mnist37.storage import publish, writing

# Prototypes are as small as the images (28x28 for MNIST): the side-by-side sheet is enlarged
# this many times to be seen.
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


def _as_image(pixels: np.ndarray) -> Image.Image:
    """An image array as Pillow takes it: [H, W] gray, or color [3, H, W] turned to [H, W, 3]."""
    pixels = np.asarray(pixels)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)) if pixels.ndim == 3 else pixels)


def _png_bytes(pixels: np.ndarray, scale: int = 1) -> bytes:
    image = _as_image(pixels)
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prototype_images(prototypes: np.ndarray, classes: Sequence[str]) -> dict[str, bytes]:
    """Each `float32 [H, W]` prototype as an 8-bit grayscale PNG (a color `[3, H, W]` one as
    an RGB PNG), plus one enlarged sheet of all: {file name: PNG bytes}."""
    pixels = np.clip(np.rint(prototypes * PIXEL_MAX), 0, 255).astype(np.uint8)
    files = {f"prototype_{name}.png": _png_bytes(image) for name, image in zip(classes, pixels)}
    files["prototypes.png"] = _png_bytes(np.concatenate(list(pixels), axis=-1), SHEET_SCALE)
    return files


def output_names(classes: Sequence[str]) -> list[str]:
    """The files write_outputs writes beside results.json."""
    return ["prototypes.npy", *(f"prototype_{name}.png" for name in classes), "prototypes.png", "table.txt",
            "report.html"]


def write_outputs(out: Path | str, results: dict, prototypes: np.ndarray,
                  example_images: dict[str, np.ndarray] | None = None) -> str:
    """Write the prototypes (exact float32 .npy and PNGs), table.txt, report.html and
    results.json, last; return the table. `results` is written as it is (results_json made it).

    Each file is published whole (`storage.publish`: a temporary flushed to disk, then renamed
    into place), so a reader sees an old file or a whole new one, after a crash too; a folder
    with results.json is complete. A folder that is full or
    read-only raises StorageError naming it, the file and the errno, and leaves no partial file.

    `out` may be a URI (s3://bucket/runs/x): each file is then one object, which appears whole
    when its upload completes; a store that refuses raises ObjectStoreError naming it."""
    def save(name: str, data: bytes) -> None:
        if isinstance(out, str):
            publish(f"{out.rstrip('/')}/{name}", lambda f: f.write(data))
            return
        with writing("output folder", out, f"writing {name}"):
            publish(out / name, lambda f: f.write(data))

    if not isinstance(out, str):
        with writing("output folder", out, "creating it"):
            out.mkdir(parents=True, exist_ok=True)
    npy = io.BytesIO()
    np.save(npy, prototypes)
    save("prototypes.npy", npy.getvalue())
    for name, data in prototype_images(prototypes, results["classes"]).items():
        save(name, data)
    table = format_table(results) + "\n\n" + format_files(results)
    save("table.txt", (table + "\n").encode())
    save("report.html", render_html(results, prototypes, example_images or {}).encode())
    save("results.json", (json.dumps(results, indent=2) + "\n").encode())
    return table


def _png_data_uri(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(np.asarray(pixels, dtype=np.uint8))).decode()


def _img(pixels: np.ndarray, title: str, scale: int = 3) -> str:
    h, w = np.asarray(pixels).shape[-2:]
    return (f'<img src="{_png_data_uri(pixels)}" width="{w * scale}" height="{h * scale}" '
            f'alt="{html.escape(title)}" title="{html.escape(title)}">')


def _heat(value: float) -> str:
    """White to dark blue for 0..1, with text that stays readable."""
    shade = int(255 - 200 * value)
    return f"background:rgb({shade},{shade},255);color:{'#fff' if value > 0.6 else '#000'}"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
img { image-rendering: pixelated; border: 1px solid #999; margin: 2px; }
figure { display: inline-block; margin: 0.3em; text-align: center; font-size: 0.8em; }
.facts td { text-align: left; }
"""
esc = html.escape


def render_html(results: dict, prototypes: np.ndarray, example_images: dict[str, np.ndarray]) -> str:
    """report.html: one self-contained page (images inline), opened from disk without a server."""
    source = esc(str(results["data"]["source"]))
    parts = [f'<!doctype html><html lang="en"><head><meta charset="utf-8">\n<title>mnist37 report: {source}</title>'
             f"\n<style>{_STYLE}</style></head><body>\n<h1>mnist37: nearest prototype on {source}</h1>",
             _prototypes_section(results["classes"], prototypes), _accuracy_section(results),
             *(_confusion_section(m, report["confusion"], results["classes"]) for m, report in results["metrics"].items()),
             *(_examples_section(m, per_class, results["classes"], example_images)
               for m, per_class in results.get("examples", {}).items()),
             _run_section(results), "</body></html>\n"]
    return "\n".join(parts)


def _prototypes_section(classes: Sequence[str], prototypes: np.ndarray) -> str:
    return "<h2>Prototypes</h2><div>" + "".join(
        f"<figure>{_img(p * PIXEL_MAX, f'prototype {name}', 4)}<figcaption>ideal {esc(name)}</figcaption></figure>"
        for name, p in zip(classes, prototypes)) + "</div>"


def _accuracy_section(results: dict) -> str:
    classes, metrics = results["classes"], results["metrics"]
    eval_counts = results["counts"][results["config"]["eval_split"]]
    rows = ["<h2>Accuracy</h2><table id='accuracy'><tr><th>class</th><th>images</th>" +
            "".join(f"<th>{esc(m)}</th>" for m in metrics) + "</tr>"]
    for name in classes:
        cells = "".join("<td>-</td>" if metrics[m]["per_class"][name] is None
                        else f"<td>{metrics[m]['per_class'][name]:.4f}</td>" for m in metrics)
        rows.append(f"<tr><th>{esc(name)}</th><td>{eval_counts[name]}</td>{cells}</tr>")
    for label, key in (("mean of classes", "mean_class_accuracy"), ("overall", "overall_accuracy")):
        rows.append(f"<tr><th>{label}</th><td></td>" +
                    "".join(f"<td>{metrics[m][key]:.4f}</td>" for m in metrics) + "</tr>")
    return "\n".join(rows) + "</table>"


def _confusion_section(metric: str, confusion: list[list[int]], classes: Sequence[str]) -> str:
    matrix = np.array(confusion)
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    rows = [f"<h2>Confusion, {esc(metric)}</h2><table class='confusion'><tr><th>true \\ predicted</th>" +
            "".join(f"<th>{esc(c)}</th>" for c in classes) + "</tr>"]
    for i, name in enumerate(classes):
        rows.append(f"<tr><th>{esc(name)}</th>" + "".join(
            f"<td style='{_heat(matrix[i, j] / totals[i, 0])}'>{matrix[i, j]}</td>"
            for j in range(len(classes))) + "</tr>")
    return "\n".join(rows) + "</table>"


def _examples_section(metric: str, per_class: dict, classes: Sequence[str],
                      example_images: dict[str, np.ndarray]) -> str:
    parts = [f"<h2>Misclassified, {esc(metric)}: nearest to and farthest from the boundary</h2>"]
    for c, sides in per_class.items():
        for side, label in (("closest", "closest to the boundary"), ("farthest", "farthest from it")):
            if not sides[side]:
                continue
            figures = []
            for e in sides[side]:
                dists = ", ".join(f"{classes[j]}: {d:.4f}" for j, d in enumerate(e["distances"]))
                caption = f"{e['path']} → {classes[e['predicted']]} (margin {e['margin']:.4f}; {dists})"
                figures.append(f"<figure>{_img(example_images[e['path']], caption)}<figcaption>"
                               f"→ {esc(classes[e['predicted']])}<br>margin {e['margin']:.4f}<br>"
                               f"{esc(dists)}</figcaption></figure>")
            parts.append(f"<h3>true {esc(classes[int(c)])}, {label}</h3><div class='examples'>{''.join(figures)}</div>")
    return "\n".join(parts)


def _run_section(results: dict) -> str:
    shards, elapsed = results["shards"], results["elapsed_s"]
    facts = [("data", results["data"]["source"]), ("root", results["data"]["root"]),
             ("fingerprint", results["data"]["fingerprint"]),
             ("images used", ", ".join(f"{s}: {sum(c.values()):,}" for s, c in results["counts"].items())),
             ("files rejected", len(results["rejected"])),
             ("shards", f"{sum(shards['count'].values())} of up to {shards['shard_size']} images, "
                        f"{shards['files_reused']:,} files reused, chunks via {shards['transport']}"),
             ("nodes", len(results["ray"]["nodes"])),
             ("seconds", ", ".join(f"{k} {v:.2f}" for k, v in elapsed.items()))]
    parts = ["<h2>Run</h2><table class='facts'>" +
             "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts) + "</table>",
             "<h2>Files</h2><pre>" + esc(format_files(results)) + "</pre>"]
    if results["rejected"]:
        parts.append("<h3>Rejected</h3><pre>" + esc("\n".join(
            f"{r['path']}: {r['reason']}" for r in results["rejected"][:200])) + "</pre>")
    return "\n".join(parts)
