"""The outputs at 1,000 classes, before and after: the time to assemble results.json's metrics
and examples and to write the output folder (`report.write_outputs`), the sizes of what it
writes, the process's peak RSS, and headless Chromium's time to load report.html. The outcome
(confusion matrices, boundary examples, prototypes: tests/many_classes.py) is synthesized as
classify and evaluation build it, in ImageNet's shape: 1,000 classes, 2 validation images each,
64x64x3, k = 4 examples per side, l1 and l2. Each variant runs in its own process, alternating,
--repeats times; the figures are medians.

    mkdir /tmp/mnist37-before && git archive 0af93a2 mnist37 | tar -x -C /tmp/mnist37-before  # the mnist37 before
    python benchmarks/many_outputs/many_outputs.py --before /tmp/mnist37-before
    python benchmarks/many_outputs/many_outputs.py --classes 1000 --repeats 3   # this checkout only

Imports tests.many_classes (the synthesizer) from this checkout, and mnist37 from the checkout
measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def child(root: str, out: Path, num_classes: int) -> dict:
    """In a process of its own: synthesize, assemble, write; the figures as a dict."""
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("many_classes", CHECKOUT / "tests" / "many_classes.py")
    many_classes = importlib.util.module_from_spec(spec)
    sys.modules["many_classes"] = many_classes  # for its dataclass
    spec.loader.exec_module(many_classes)
    import inspect

    from mnist37 import evaluation, report
    from mnist37.accuracy import accuracy_report

    outcome = many_classes.synthesize(num_classes)
    classes = outcome.results["classes"]
    clock = time.perf_counter()
    if hasattr(evaluation, "outcome_json"):  # what results_json spends on them
        evaluation.outcome_json(evaluation.Classification(outcome.confusions, {}, outcome.examples, 0.0), classes)
        if not report.many_classes(classes):
            outcome.examples.report()
    else:
        {m: accuracy_report(matrix, classes) for m, matrix in outcome.confusions.items()}
        outcome.examples.report()
    assemble_s = time.perf_counter() - clock
    clock = time.perf_counter()
    if "confusions" in inspect.signature(report.write_outputs).parameters:
        printed = report.write_outputs(out, outcome.results, outcome.prototypes, outcome.examples, outcome.confusions)
    else:
        printed = report.write_outputs(out, outcome.results, outcome.prototypes, outcome.examples.images())
    write_s = time.perf_counter() - clock
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    return {"mnist37": report.__file__, "assemble_s": assemble_s, "write_s": write_s,
            "report_html": sizes["report.html"], "results_json": sizes["results.json"],
            "table_txt": sizes["table.txt"], "printed": len(printed.encode()),
            "folder": sum(sizes.values()), "files": len(sizes),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def chromium_s(page: Path, timeout_s: float) -> float | None:
    """Seconds for headless Chromium to load `page` and dump its DOM (its start included);
    None when it had not within `timeout_s`."""
    with tempfile.TemporaryDirectory() as profile:
        clock = time.perf_counter()
        try:
            subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run",
                            f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                           capture_output=True, timeout=timeout_s, check=True)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="root of another mnist37 checkout to compare with")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chromium-timeout", type=float, default=120.0, help="seconds")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.classes)))
        return
    variants = {"after": str(CHECKOUT), **({"before": args.before} if args.before else {})}
    runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, root in variants.items():
            with tempfile.TemporaryDirectory() as tmp:
                done = subprocess.run([sys.executable, __file__, "--classes", str(args.classes), "--child", root, tmp],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{name} ({root}) failed:\n{done.stderr[-3000:]}")
                figures = json.loads(done.stdout.splitlines()[-1])
                if CHROMIUM:
                    figures["chromium_s"] = chromium_s(Path(tmp) / "report.html", args.chromium_timeout)
                runs[name].append(figures)

    def median(name: str, key: str):
        values = [r[key] for r in runs[name]]
        if any(v is None for v in values):
            return None
        return statistics.median(values)

    print(f"{args.classes} classes, 64x64x3, l1 + l2, k = 4; medians of {args.repeats}, alternating")
    for name in variants:
        print(f"  {name}: {runs[name][0]['mnist37']}")
    rows = [("assemble results (s)", "assemble_s", 1), ("write outputs (s)", "write_s", 1),
            ("report.html (MB)", "report_html", 1 << 20), ("results.json (MB)", "results_json", 1 << 20),
            ("table.txt (KB)", "table_txt", 1 << 10), ("printed table (KB)", "printed", 1 << 10),
            ("output folder (MB)", "folder", 1 << 20), ("files", "files", 1),
            ("peak RSS, synthesis included (MB)", "peak_rss", 1 << 20),
            ("Chromium load + DOM dump (s)", "chromium_s", 1)]
    print(f"{'':<36}" + "".join(f"{name:>12}" for name in variants))
    for label, key, unit in rows:
        cells = []
        for name in variants:
            value = median(name, key) if key in runs[name][0] else None
            cells.append(f"{'> ' + str(int(args.chromium_timeout)) if value is None else f'{value / unit:.2f}':>12}")
        print(f"{label:<36}" + "".join(cells))


if __name__ == "__main__":
    main()
