"""The evaluation job from Python: `evaluate` runs it in this process, `load` reads a finished
run's outputs, and both give a `Results` (a notebook shows it as a table and the prototypes).

    import mnist37
    results = mnist37.evaluate("mnist_sample")            # the job, with any config key as a keyword
    results.per_class["l1"]["3"]                           # 0.9168..., fastbook's figure
    results.prototypes[1]                                  # float32 [28, 28]: the ideal 7
    mnist37.load(results.out).confusion["l2"]              # int64 [C, C], from the folder alone

docs/api.md is the reference.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mnist37 import Mnist37Error
from mnist37.storage.locations import is_uri


class ResultsNotFound(Mnist37Error, FileNotFoundError):
    """A location that holds no finished run's outputs (no results.json, or a file it names)."""


class NoPredictions(Mnist37Error, LookupError):
    """Per-image predictions were asked for, and the run wrote none."""


@dataclass(frozen=True, eq=False)
class Results:
    """A finished run, as `evaluate` returns it and `load` reads it back. Figures are those of
    results.json; arrays are read from the files beside it (docs/output.md).

    `out`: the output folder (a local path) or object-store prefix (a URI) the run wrote.
    `classes`: class names in index order (confusion rows and columns, prototypes' first axis).
    `metrics`: the distance metrics reported (`l1`, `l2`), in the run's order.
    `per_class`: metric -> class name -> accuracy on the evaluation split (None: no images).
    `mean_class_accuracy`, `overall_accuracy`: metric -> accuracy (fastbook's headline is the first).
    `top_k`: metric -> top-k accuracy (`k`, `per_class`, `mean_class_accuracy`, `overall_accuracy`,
    `correct`); empty when the run reported none.
    `confusion`: metric -> int64 [C, C], rows = true class, columns = predicted.
    `prototypes`: float32 [C, H, W] (gray) or [C, 3, H, W] (color), pixels in [0, 1].
    `report`: where report.html is (a path, or a URI under `out`).
    `results`: results.json's whole contents (the config, counts, files, shards, seconds).
    """

    out: str
    classes: list[str]
    metrics: list[str]
    per_class: dict[str, dict[str, float | None]]
    mean_class_accuracy: dict[str, float]
    overall_accuracy: dict[str, float]
    top_k: dict[str, dict]
    confusion: dict[str, np.ndarray] = field(repr=False)
    prototypes: np.ndarray = field(repr=False)
    report: str
    results: dict = field(repr=False)

    @functools.cached_property
    def predictions(self):
        """One row per evaluated image, in the evaluation split's listing order, as a pyarrow
        Table read from every file under `<out>/predictions/` that results.json lists (columns:
        docs/output.md); `.to_pandas()` where pandas is installed. Read once, then kept.
        NoPredictions when the run wrote none (`predictions = "none"`, or an older mnist37)."""
        from mnist37.predictions import read

        listing = self.results.get("predictions")
        if listing is None:
            raise NoPredictions(f"{self.out}: this run wrote no per-image predictions (results.json has no "
                                "`predictions`: a run of an mnist37 before they were written); run it again")
        if listing["columns"] == "none":
            raise NoPredictions(f"{self.out}: this run wrote no per-image predictions (predictions = none); run it "
                                "with predictions = brief or full")
        return read(self.out, listing)

    def examples(self, metric: str | None = None):
        """The boundary examples of `metric` (default: the first) as a pyarrow Table: per true
        class the misclassified images nearest the decision boundary and farthest from it
        (`examples_<metric>.parquet`; its columns are in docs/output.md)."""
        import pyarrow.parquet as pq

        metric = metric or self.metrics[0]
        if metric not in self.metrics:
            raise KeyError(f"metric {metric!r}: this run reported {', '.join(self.metrics)}")
        name = self.results["metrics"][metric].get("examples_file", f"examples_{metric}.parquet")
        return pq.read_table(io.BytesIO(_read(self.out, [name])[0]))

    def __repr__(self) -> str:
        figures = "; ".join(f"{m}: mean of classes {self.mean_class_accuracy[m]:.4f}, overall "
                            f"{self.overall_accuracy[m]:.4f}" for m in self.metrics)
        return f"Results({self.out!r}: {len(self.classes)} classes; {figures})"

    def _repr_html_(self) -> str:
        """The accuracy table and the prototypes, images inline: every class up to
        report.INLINE_CLASSES, beyond that the worst and best classes only (as report.html)."""
        from mnist37.report import INLINE_CLASSES, RANKED_CLASSES, accuracy_columns, worst_and_best

        esc = html.escape
        eval_counts = self.results["counts"].get(self.results["config"]["eval_split"], {})
        if len(self.classes) <= INLINE_CLASSES:
            shown, note = list(range(len(self.classes))), ""
        else:
            worst, best = worst_and_best(self.results, n=RANKED_CLASSES)
            shown = worst + best
            note = (f"<p>{len(self.classes)} classes: the {len(worst)} worst and {len(best)} best by "
                    f"{esc(self.metrics[0])}; every class is in results.json and the report.</p>")
        columns = accuracy_columns(self.results)
        head = "".join(f"<th>{esc(heading)}</th>" for heading, _ in columns)
        rows = [f"<tr><th>class</th><th>images</th>{head}<th>prototype</th></tr>"]
        for c in shown:
            name = self.classes[c]
            cells = "".join(_cell(figures["per_class"][name]) for _, figures in columns)
            rows.append(f"<tr><th>{esc(name)}</th><td>{eval_counts.get(name, 0)}</td>{cells}"
                        f"<td>{_img(self.prototypes[c], f'ideal {name}')}</td></tr>")
        for label, key in (("mean of classes", "mean_class_accuracy"), ("overall", "overall_accuracy")):
            rows.append(f"<tr><th>{label}</th><td></td>{''.join(_cell(figures[key]) for _, figures in columns)}"
                        "<td></td></tr>")
        return (f"<div class='mnist37-results'><p>mnist37 results in <code>{esc(self.out)}</code></p>{note}"
                f"<table>{''.join(rows)}</table><p>report: <code>{esc(self.report)}</code></p></div>")


def _cell(accuracy: float | None) -> str:
    return "<td>-</td>" if accuracy is None else f"<td>{accuracy:.4f}</td>"


def _img(prototype: np.ndarray, title: str, scale: int = 2) -> str:
    """A prototype ([H, W] or [3, H, W], pixels in [0, 1]) as an inline PNG <img>."""
    pixels = np.clip(np.asarray(prototype, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if pixels.ndim == 3:
        pixels = pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    h, w = pixels.shape[:2]
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return (f'<img src="{uri}" width="{w * scale}" height="{h * scale}" alt="{html.escape(title)}" '
            f'title="{html.escape(title)}">')


def _read(out: str, names: list[str]) -> list[bytes]:
    """The bytes of the files `names` under a local folder or an object-store prefix."""
    if is_uri(out) and not out.startswith("file://"):
        from mnist37.storage.objects import read_objects

        found = read_objects(out, names)
        missing = [name for name, data in zip(names, found) if isinstance(data, OSError)]
    else:
        folder = Path(out.removeprefix("file://"))
        found = [(folder / name).read_bytes() if (folder / name).is_file() else None for name in names]
        missing = [name for name, data in zip(names, found) if data is None]
    if missing:
        raise ResultsNotFound(f"{out}: {missing[0]} not found; "
                              + ("not the output folder of a finished run (results.json is written last)"
                                 if missing[0] == "results.json" else "results.json names it, but it is gone"))
    return found


def load(out: str | Path) -> Results:
    """Read a finished run's outputs: results.json, prototypes.npy and each metric's
    confusion_<metric>.npy from a local folder or an object-store prefix (s3://...). Raises
    ResultsNotFound naming the location when results.json (or a file it names) is not there."""
    out = str(out)
    results = json.loads(_read(out, ["results.json"])[0])
    metrics = list(results["metrics"])
    names = ["prototypes.npy"] + [results["metrics"][m].get("confusion_file", f"confusion_{m}.npy") for m in metrics]
    prototypes, *confusions = (np.load(io.BytesIO(data)) for data in _read(out, names))
    base = out.rstrip("/")
    return Results(
        out=out, classes=list(results["classes"]), metrics=metrics,
        per_class={m: dict(results["metrics"][m]["per_class"]) for m in metrics},
        mean_class_accuracy={m: results["metrics"][m]["mean_class_accuracy"] for m in metrics},
        overall_accuracy={m: results["metrics"][m]["overall_accuracy"] for m in metrics},
        top_k={m: results["metrics"][m]["top_k"] for m in metrics if "top_k" in results["metrics"][m]},
        confusion=dict(zip(metrics, confusions)), prototypes=prototypes,
        report=f"{base}/report.html" if is_uri(out) else str(Path(out) / "report.html"), results=results)


def evaluate(data: str | Path, out: str | Path | None = None, **config) -> Results:
    """Run the evaluation job in this process, as `python -m mnist37.job --data DATA --out OUT
    --KEY VALUE ...` runs it, and return its Results (read back from `out`, as `load` would).

    `config`: any config key (docs/configuration.md) as a keyword, a value as in a config
    file (`classes=["3", "7"]`, `shard_size=4096`) or as on the command line (`classes="3 7"`);
    an unknown key or a bad value raises ConfigError naming it. `out=None` writes to a new
    temporary folder (`tempfile.mkdtemp(prefix="mnist37-")`, kept after the call: its report
    and files stay readable; Results.out names it), not to the command line's runs/latest.

    Ray as the job: a process that already called `ray.init()` has the job run on that Ray,
    left running after; otherwise `ray_address` (else RAY_ADDRESS, else a cluster `ray start`
    left on this machine) is joined, or a local Ray of the job's own is started and stopped.
    Every problem is an exception (Mnist37Error's subclasses: ConfigError, DatasetError,
    StorageError, ClusterError, ...; KeyboardInterrupt when interrupted), never an exit of
    this process. Progress goes to stderr: a bar on a terminal, plain lines otherwise (a
    notebook gets no terminal control codes)."""
    from mnist37 import config as configuration
    from mnist37.job import main

    if out is None:
        out = tempfile.mkdtemp(prefix="mnist37-")
    cfg = configuration.load(None, data=str(data), out=str(out), **config)
    with _progress_lines(), _signals_kept():
        main(cfg)
    return load(cfg.out)


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a line is written (a notebook cell's,
    pytest's capture), not the one there when it was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _progress_lines():
    """The job's progress and stage lines on stderr while it runs, when the caller has set up
    no logging of their own (a notebook, a script): without a handler they would be lost. Off
    a terminal, the lines Ray forwards from the job's tasks come without the ANSI colors Ray
    wraps their `(task pid=...)` prefix in (RAY_COLOR_PREFIX=0, read by the driver at each line)."""
    from mnist37.progress import on_terminal

    with contextlib.ExitStack() as stack:
        if not on_terminal() and "RAY_COLOR_PREFIX" not in os.environ:
            os.environ["RAY_COLOR_PREFIX"] = "0"
            stack.callback(os.environ.pop, "RAY_COLOR_PREFIX", None)
        stack.enter_context(_package_lines())
        yield


@contextlib.contextmanager
def _package_lines():
    package = logging.getLogger("mnist37")
    if logging.getLogger().handlers or package.handlers:
        yield
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


@contextlib.contextmanager
def _signals_kept():
    """The caller's SIGINT and SIGTERM handlers back after the job, which takes both while it
    runs (an interrupt stops it with its cleanup: mnist37.job)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            if handler is not None:
                signal.signal(signum, handler)
