"""The output folder: results.json, the prototypes, the accuracy table, and report.html.

Up to INLINE_CLASSES classes everything is shown whole, as fastbook's readers know it: a row
per class, every cell of each confusion matrix, the examples of every class. Beyond, what is
printed and report.html show the summary, the worst and best classes, the most-confused pairs,
each confusion matrix as one image and the boundary examples of the worst classes; the whole
table is in table.txt, the confusion matrices and examples in files beside results.json.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mnist37.accuracy import ranked
from mnist37.examples import SIDES, BoundaryExamples
from mnist37.prototypes import PIXEL_MAX
from mnist37.storage.writes import publish, writing

# Prototypes are as small as the images (28x28 for MNIST): the side-by-side sheet is enlarged
# this many times to be seen.
SHEET_SCALE = 8
# Up to this many classes, results.json holds the confusion matrices and the examples inline,
# and the table and report.html show every class (fastbook's view); beyond, they are short.
INLINE_CLASSES = 50
# Beyond INLINE_CLASSES: the worst and the best classes printed and shown, by the first metric.
RANKED_CLASSES = 15
# Beyond INLINE_CLASSES: the worst classes per metric whose boundary examples report.html shows.
EXAMPLE_CLASSES = 10
# A confusion-matrix image is at most this many pixels a side; more classes share a pixel.
CONFUSION_PIXELS = 1024
# Distances named in an example's caption beyond INLINE_CLASSES: to the nearest prototypes.
NEAREST_SHOWN = 5


def many_classes(classes: Sequence[str]) -> bool:
    """Whether the outputs are the short ones (more than INLINE_CLASSES classes)."""
    return len(classes) > INLINE_CLASSES


def worst_and_best(results: dict, metric: str | None = None, n: int = RANKED_CLASSES) -> tuple[list[int], list[int]]:
    """Indices of the `n` worst classes by `metric` (default: the first), worst first, and of the
    `n` best, best first (none of the worst among them); classes with no images are left out."""
    metric = metric or next(iter(results["metrics"]))
    per_class = results["metrics"][metric]["per_class"]
    order = ranked([per_class[name] for name in results["classes"]]).tolist()
    worst = order[:n]
    return worst, [c for c in order[::-1][:n] if c not in set(worst)]


def accuracy_columns(results: dict) -> list[tuple[str, dict]]:
    """The accuracy columns of the table, report.html and a notebook: (heading, the figures
    with `per_class`, `mean_class_accuracy`, `overall_accuracy`): per metric top-1 (`l1`),
    then per metric top-k where the run reported it (`l1 top5`)."""
    metrics = results["metrics"]
    top = [(f"{m} top{r['top_k']['k']}", r["top_k"]) for m, r in metrics.items() if "top_k" in r]
    return [(m, r) for m, r in metrics.items()] + top


def format_table(results: dict, whole: bool = True) -> str:
    """Per-class, mean-of-classes and overall accuracy, one column per metric (and per metric
    top-k, when reported); not `whole`: only the RANKED_CLASSES worst and best classes beyond
    INLINE_CLASSES classes."""
    metrics = results["metrics"]
    names = list(metrics)
    columns = accuracy_columns(results)
    classes = results["classes"]
    counts = results["counts"][results["config"]["eval_split"]]

    def row(name: str) -> tuple[str, list]:
        return f"{name}  (n={counts[name]})", [figures["per_class"][name] for _, figures in columns]

    if whole or not many_classes(classes):
        groups = [("", [row(name) for name in classes])]
    else:
        worst, best = worst_and_best(results)
        groups = [(f"the {len(worst)} worst of {len(classes)} classes by {names[0]}:",
                   [row(classes[c]) for c in worst]),
                  (f"the {len(best)} best:", [row(classes[c]) for c in best])]
    totals = [("mean of classes", [figures["mean_class_accuracy"] for _, figures in columns]),
              ("overall", [figures["overall_accuracy"] for _, figures in columns])]
    width = max(len(label) for label, _ in [*(r for _, rows in groups for r in rows), *totals])
    sizes = [max(6, len(heading)) for heading, _ in columns]

    def line(label: str, values: list) -> str:
        return f"{label:<{width}}  " + "  ".join(f"{'-':>{size}}" if v is None else f"{v:{size}.4f}"
                                                 for v, size in zip(values, sizes))

    lines = [f"{'class':<{width}}  " + "  ".join(f"{heading:>{size}}" for (heading, _), size in zip(columns, sizes))]
    for heading, rows in groups:
        lines += [heading] if heading else []
        lines += [line(label, values) for label, values in rows]
    lines += [line(label, values) for label, values in totals]
    if len(groups) > 1:
        lines.append("(every class: table.txt)")
    return "\n".join(lines)


def format_files(results: dict, whole: bool = True) -> str:
    """The accounting per split and class: found = used + rejected (and what was ignored); not
    `whole`: per split only, beyond INLINE_CLASSES classes."""
    lines = [f"{'files':<16}{'found':>9}{'used':>9}{'rejected':>9}{'ignored':>9}"]
    if not whole and many_classes(results["classes"]):
        for split, classes in results["files"].items():
            sums = [sum(a[k] for a in classes.values()) for k in ("found", "used", "rejected", "ignored")]
            lines.append(f"{split + '/*':<16}" + "".join(f"{v:>9}" for v in sums))
        lines.append("(every class: table.txt)")
        return "\n".join(lines)
    for split, classes in results["files"].items():
        for name, a in classes.items():
            lines.append(f"{split + '/' + name:<16}{a['found']:>9}{a['used']:>9}{a['rejected']:>9}{a['ignored']:>9}")
    return "\n".join(lines)


def _as_image(pixels: np.ndarray) -> Image.Image:
    """An image array as Pillow takes it: [H, W] gray, or color [3, H, W] turned to [H, W, 3]."""
    pixels = np.asarray(pixels)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)) if pixels.ndim == 3 else pixels)


# zlib's level for the prototype files: at 1,000 classes of 64x64 color, level 1 encodes them in
# 0.60 ms each against 1.35 ms at Pillow's default (6), for files 16 % larger (the job's driver
# encodes them after the results, by PUBLISH_THREADS threads).
PROTOTYPE_PNG_LEVEL = 1


def _png_bytes(pixels: np.ndarray, scale: int = 1, compress_level: int = 6) -> bytes:
    image = _as_image(pixels)
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def prototype_images(prototypes: np.ndarray, classes: Sequence[str]) -> dict[str, Callable[[], bytes]]:
    """Each `float32 [H, W]` prototype as an 8-bit grayscale PNG (a color `[3, H, W]` one as
    an RGB PNG), plus, up to INLINE_CLASSES classes, one enlarged sheet of all side by side:
    {file name: what encodes its PNG bytes when called}. Encoded by the threads that publish
    them (`_save_all`): Pillow encodes without the GIL, so 1,000 of them took 0.33 s on 2 cores
    against 0.55 s one after another."""
    pixels = np.clip(np.rint(prototypes * PIXEL_MAX), 0, 255).astype(np.uint8)
    files = {f"prototype_{name}.png": functools.partial(_png_bytes, image, compress_level=PROTOTYPE_PNG_LEVEL)
             for name, image in zip(classes, pixels)}
    if not many_classes(classes):  # beyond, one PNG of C prototypes costs more than the C files
        files["prototypes.png"] = functools.partial(_png_bytes, np.concatenate(list(pixels), axis=-1), SHEET_SCALE)
    return files


def output_names(classes: Sequence[str], metrics: Sequence[str] = ()) -> list[str]:
    """The files write_outputs writes beside results.json."""
    sheet = [] if many_classes(classes) else ["prototypes.png"]
    return ["prototypes.npy", *(f"prototype_{name}.png" for name in classes), *sheet,
            *(f"confusion_{m}.npy" for m in metrics), *(f"examples_{m}.parquet" for m in metrics), "table.txt",
            "report.html"]


def write_outputs(out: Path | str, results: dict, prototypes: np.ndarray, examples: BoundaryExamples | None = None,
                  confusions: dict[str, np.ndarray] | None = None) -> str:
    """Write the prototypes (exact float32 .npy and PNGs), each metric's confusion matrix
    (`confusion_<metric>.npy`, int64 [C, C]) and boundary examples (`examples_<metric>.parquet`),
    table.txt, report.html and results.json, last; return the table to print (short beyond
    INLINE_CLASSES classes). `results` is written as it is (results_json made it); `confusions`
    default to its inline ones.

    Each file is published whole (`writes.publish`: a temporary flushed to disk, then renamed
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

    if confusions is None:
        confusions = {m: np.asarray(r["confusion"], dtype=np.int64) for m, r in results["metrics"].items()
                      if "confusion" in r}
    examples = examples if examples is not None else BoundaryExamples(0)
    if not isinstance(out, str):
        with writing("output folder", out, "creating it"):
            out.mkdir(parents=True, exist_ok=True)
    save("prototypes.npy", _npy_bytes(prototypes))
    _save_all(save, prototype_images(prototypes, results["classes"]))
    for metric in results["metrics"]:
        save(f"confusion_{metric}.npy", _npy_bytes(np.asarray(confusions[metric], dtype=np.int64)))
        parquet = pa.BufferOutputStream()
        pq.write_table(examples.table(metric), parquet)
        save(f"examples_{metric}.parquet", parquet.getvalue().to_pybytes())
    table = format_table(results) + "\n\n" + format_files(results)
    save("table.txt", (table + "\n").encode())
    save("report.html", render_html(results, prototypes, examples, confusions).encode())
    save("results.json", (json.dumps(results, indent=2) + "\n").encode())
    if not many_classes(results["classes"]):
        return table
    return format_table(results, whole=False) + "\n\n" + format_files(results, whole=False)


# Files published by threads at once, so that their flushes to disk (or their uploads) overlap:
# 1,000 prototype PNGs took 4.3-5.4 s one after another on this machine's disk, 0.7 s by 8 threads.
PUBLISH_THREADS = 8


def _save_all(save: Callable[[str, bytes], None], files: dict[str, Callable[[], bytes]]) -> None:
    """`save(name, encode())` for every file, by PUBLISH_THREADS threads; the first error is
    raised once every other file is written or has failed."""
    with ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="mnist37-publish") as pool:
        for _ in pool.map(lambda item: save(item[0], item[1]()), files.items()):
            pass


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


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


def render_html(results: dict, prototypes: np.ndarray, examples: BoundaryExamples,
                confusions: dict[str, np.ndarray]) -> str:
    """report.html: one self-contained page (images inline), opened from disk without a server.
    Every class in full up to INLINE_CLASSES classes; beyond, a page of bounded size
    (`_many_classes_sections`)."""
    source = esc(str(results["data"]["source"]))
    head = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">\n<title>mnist37 report: {source}</title>'
            f"\n<style>{_STYLE}</style></head><body>\n<h1>mnist37: nearest prototype on {source}</h1>")
    if many_classes(results["classes"]):
        return "\n".join([head, *_many_classes_sections(results, prototypes, examples, confusions),
                          _run_section(results, whole=False), "</body></html>\n"])
    example_images = examples.images()
    parts = [head, _prototypes_section(results["classes"], prototypes), _accuracy_section(results),
             *(_confusion_section(m, confusions[m], results["classes"]) for m in results["metrics"]),
             *(_examples_section(m, per_class, results["classes"], example_images)
               for m, per_class in results.get("examples", {}).items()),
             _run_section(results), "</body></html>\n"]
    return "\n".join(parts)


# The summary's columns beyond INLINE_CLASSES: (heading, key of metrics.<metric>), each shown
# when results.json has it.
SUMMARY_COLUMNS = [("mean of classes", "mean_class_accuracy"), ("overall", "overall_accuracy")]


def _many_classes_sections(results: dict, prototypes: np.ndarray, examples: BoundaryExamples,
                           confusions: dict[str, np.ndarray]) -> list[str]:
    """The summary, the worst and best classes with their prototypes, the most-confused pairs,
    each confusion matrix as one image, and the boundary examples of the EXAMPLE_CLASSES worst
    classes per metric: a page whose size does not grow with the number of classes."""
    classes, metrics = results["classes"], results["metrics"]
    counts = results["counts"][results["config"]["eval_split"]]
    worst, best = worst_and_best(results)
    first = next(iter(metrics))
    columns = [(label, key) for label, key in SUMMARY_COLUMNS if all(key in r for r in metrics.values())]
    top = [(f"top-{r['top_k']['k']} {label}", key) for label, key in SUMMARY_COLUMNS
           for r in list(metrics.values())[:1] if "top_k" in r]
    parts = [f"<h2>Summary</h2><p>{len(classes):,} classes, {sum(counts.values()):,} images evaluated. Every "
             "class's accuracy: table.txt and results.json; every prototype: prototype_&lt;class&gt;.png, "
             "prototypes.npy; the confusion matrices: confusion_&lt;metric&gt;.npy; the boundary "
             "examples of every class: examples_&lt;metric&gt;.parquet.</p><table id='summary'><tr><th>metric</th>" +
             "".join(f"<th>{esc(label)}</th>" for label, _ in [*columns, *top]) + "<th>correct</th><th>images</th></tr>" +
             "".join(f"<tr><th>{esc(m)}</th>" + "".join(_cell(r[key]) for _, key in columns) +
                     "".join(_cell(r.get("top_k", {}).get(key)) for _, key in top) +
                     f"<td>{r['correct']:,}</td><td>{r['total']:,}</td></tr>" for m, r in metrics.items()) + "</table>"]
    for label, chosen in ((f"The {len(worst)} worst classes by {first}", worst),
                          (f"The {len(best)} best classes by {first}", best)):
        rows = "".join(f"<tr><th>{esc(classes[c])}</th><td>{counts[classes[c]]}</td>" +
                       "".join(_cell(figures["per_class"][classes[c]]) for _, figures in accuracy_columns(results)) +
                       "</tr>" for c in chosen)
        parts.append(f"<h2>{esc(label)}</h2><table class='ranked'><tr><th>class</th><th>images</th>" +
                     "".join(f"<th>{esc(heading)}</th>" for heading, _ in accuracy_columns(results)) +
                     f"</tr>{rows}</table>")
    parts.append("<h2>Prototypes of the worst and best classes</h2><div>" + "".join(
        f"<figure>{_img(prototypes[c] * PIXEL_MAX, f'prototype {classes[c]}', 2)}<figcaption>ideal "
        f"{esc(classes[c])}</figcaption></figure>" for c in [*worst, *best]) + "</div>")
    for m, r in metrics.items():
        rows = "".join(f"<tr><td>{esc(classes[p['true']])}</td><td>{esc(classes[p['predicted']])}</td>"
                       f"<td>{p['count']}</td><td>{p['count'] / max(counts[classes[p['true']]], 1):.4f}</td></tr>"
                       for p in r.get("most_confused", []))
        parts.append(f"<h2>Most confused, {esc(m)}</h2><table class='pairs'><tr><th>true</th><th>predicted</th>"
                     f"<th>images</th><th>share of the true class</th></tr>{rows}</table>")
    parts += [_confusion_image_section(m, confusions[m]) for m in metrics]
    for m in metrics:
        parts.append(_worst_examples_section(m, examples, classes, worst_and_best(results, m, EXAMPLE_CLASSES)[0]))
    return parts


def _cell(value: float | None) -> str:
    return "<td>-</td>" if value is None else f"<td>{value:.4f}</td>"


def confusion_image(confusion: np.ndarray, max_side: int = CONFUSION_PIXELS) -> np.ndarray:
    """uint8 [3, S, S]: each true class's row as shares of its images (white 0 to blue 1, by
    the square root so that single confusions show), S <= max_side; when classes are more,
    each pixel sums a step x step block of classes first (step = ceil(C / max_side))."""
    counts = np.asarray(confusion, dtype=np.float64)
    num_classes = len(counts)
    step = max(1, math.ceil(num_classes / max_side))
    if step > 1:
        side = math.ceil(num_classes / step)
        padded = np.zeros((side * step, side * step))
        padded[:num_classes, :num_classes] = counts
        counts = padded.reshape(side, step, side, step).sum(axis=(1, 3))
    share = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    shade = np.rint(255 * (1 - np.sqrt(share))).astype(np.uint8)
    return np.stack([shade, shade, np.full_like(shade, 255)])


def _confusion_image_section(metric: str, confusion: np.ndarray) -> str:
    num_classes = len(confusion)
    image = confusion_image(confusion)
    side = image.shape[-1]
    step = math.ceil(num_classes / side)
    shown = min(800, side * max(1, 800 // side))
    per_pixel = "one class" if step == 1 else f"{step} x {step} classes"
    return (f"<h2>Confusion, {esc(metric)}</h2><p>Rows: true class, columns: predicted, both in class index "
            f"order (results.json's classes); one pixel: {per_pixel}; darker: a larger share of the true "
            f"class's images (square root). The counts: confusion_{esc(metric)}.npy.</p>"
            f'<img class="confusion" src="{_png_data_uri(image)}" width="{shown}" height="{shown}" '
            f'alt="confusion matrix, {esc(metric)}">')


def _worst_examples_section(metric: str, examples: BoundaryExamples, classes: Sequence[str],
                            worst: Sequence[int]) -> str:
    parts = [f"<h2>Misclassified, {esc(metric)}: the {len(worst)} worst classes, nearest to and farthest from "
             "the boundary</h2>"]
    for c in worst:
        sides = examples.of(metric, c)
        for side, label in zip(SIDES, ("closest to the boundary", "farthest from it")):
            if not sides[side]:
                continue
            figures = []
            for e in sides[side]:
                nearest = ""
                if e.distances is not None:
                    d = np.asarray(e.distances)
                    order = np.argsort(d, kind="stable")[:NEAREST_SHOWN]
                    nearest = "nearest: " + ", ".join(f"{classes[j]}: {d[j]:.4f}" for j in order)
                caption = f"{e.path} → {classes[e.predicted]} (margin {e.margin:.4f}; {nearest})"
                picture = "(pixels not kept)" if e.image is None else _img(e.image, caption)
                figures.append(f"<figure>{picture}<figcaption>{esc(e.path)}<br>→ {esc(classes[e.predicted])}<br>"
                               f"margin {e.margin:.4f}<br>{esc(nearest)}</figcaption></figure>")
            parts.append(f"<h3>true {esc(classes[c])}, {label}</h3><div class='examples'>{''.join(figures)}</div>")
    return "\n".join(parts)


def _prototypes_section(classes: Sequence[str], prototypes: np.ndarray) -> str:
    return "<h2>Prototypes</h2><div>" + "".join(
        f"<figure>{_img(p * PIXEL_MAX, f'prototype {name}', 4)}<figcaption>ideal {esc(name)}</figcaption></figure>"
        for name, p in zip(classes, prototypes)) + "</div>"


def _accuracy_section(results: dict) -> str:
    classes, columns = results["classes"], accuracy_columns(results)
    eval_counts = results["counts"][results["config"]["eval_split"]]
    rows = ["<h2>Accuracy</h2><table id='accuracy'><tr><th>class</th><th>images</th>" +
            "".join(f"<th>{esc(heading)}</th>" for heading, _ in columns) + "</tr>"]
    for name in classes:
        cells = "".join(_cell(figures["per_class"][name]) for _, figures in columns)
        rows.append(f"<tr><th>{esc(name)}</th><td>{eval_counts[name]}</td>{cells}</tr>")
    for label, key in (("mean of classes", "mean_class_accuracy"), ("overall", "overall_accuracy")):
        rows.append(f"<tr><th>{label}</th><td></td>" + "".join(_cell(figures[key]) for _, figures in columns) + "</tr>")
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


def _run_section(results: dict, whole: bool = True) -> str:
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
             "<h2>Files</h2><pre>" + esc(format_files(results, whole)) + "</pre>"]
    if results["rejected"]:
        parts.append("<h3>Rejected</h3><pre>" + esc("\n".join(
            f"{r['path']}: {r['reason']}" for r in results["rejected"][:200])) + "</pre>")
    return "\n".join(parts)
