"""Benchmark: the job's fixed costs one by one, beside the single-process loop's whole run.

    python benchmarks/fixed_costs/fixed_costs_benchmark.py --data ../shared/data/mnist_sample.tgz --rounds 5

What a run of the job pays whatever its data (issue 24, item 1), each measured on its own in
a fresh process the way the job does it, for a Ray of the job's own (`own`) and for a running
`ray start --head` cluster (`cluster`, started here as the benchmark's cluster variants start
theirs):

- `python`: the interpreter up to a script's first line (the process's age there);
- `import ray`, then `import driver`: the job's driver modules on top (mnist37.job,
  mnist37.on_ray.session and .tasks: what the driver imports before it connects);
- `ray.init`: `mnist37.on_ray.session.connect`, the job's own call;
- `workers`: from submitting one task per CPU until each has begun (the median), each on a
  worker process of its own that this job's first task starts (Ray starts a job's workers
  for it);
- `worker age`: each such worker's age when its first task began (its interpreter, Ray's
  worker set-up, registering with the raylet), the median;
- first-task imports in those fresh workers, per module, in the order the job's tasks first
  need them (the listing and decode tasks: mnist37.on_ray.tasks and what it brings; the
  classify task: torch through mnist37.classify); medians over the workers;
- `ray.shutdown`: `mnist37.on_ray.session.disconnect`, the job's own call (for a Ray of its own:
  every process stopped);
- `exit`: from then to the process's end, seen from here.

`seed` is fastbook's single-process loop over the same folder (`python -m mnist37.fastbook`),
its whole wall time, in the same rounds. Medians of --rounds alternating rounds. Findings:
README.md beside this file and docs/fixed-costs.md.
"""

from __future__ import annotations

import json
import os
import sys
import time

# The first line: the process's age here is what the interpreter cost (see `probe`).
_FIRST_LINE = time.clock_gettime(time.CLOCK_BOOTTIME)

# What the job's tasks import the first time a worker runs them, in that order: the listing
# and decode tasks unpickle functions of mnist37.on_ray.tasks; the classify task imports torch.
WORKER_IMPORTS = ("numpy", "pyarrow", "PIL.Image", "simplejpeg", "mnist37.on_ray.tasks", "torch", "mnist37.classify")


def _age_s(at: float) -> float:
    """This process's age at CLOCK_BOOTTIME `at` (Linux /proc): mnist37.job.process_age_s at a
    given moment, kept here so that neither the probe nor a worker imports mnist37 before the
    imports it times."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return at - ticks / os.sysconf("SC_CLK_TCK")


def _first_task() -> dict:
    """Run as a Ray task on a fresh worker: its age now, then each first import's seconds."""
    import importlib

    began = time.clock_gettime(time.CLOCK_BOOTTIME)  # the machine's clock, shared with the driver
    age = _age_s(began)
    imports = {}
    for name in WORKER_IMPORTS:
        clock = time.perf_counter()
        importlib.import_module(name)
        imports[name] = time.perf_counter() - clock
    return {"pid": os.getpid(), "began": began, "age_s": age, "imports_s": imports}


def probe(address: str) -> dict:
    """One job's fixed costs (module docstring), `address` "local" for a Ray of its own."""
    figures = {"python": _age_s(_FIRST_LINE)}
    clock = time.perf_counter()
    import ray
    figures["import ray"] = time.perf_counter() - clock
    clock = time.perf_counter()
    import mnist37.job  # noqa: F401
    import mnist37.on_ray.tasks  # noqa: F401
    from mnist37.on_ray.session import connect, disconnect
    figures["import driver"] = time.perf_counter() - clock

    clock = time.perf_counter()
    connect(address, dashboard=False, stall_timeout_s=120)
    figures["ray.init"] = time.perf_counter() - clock

    cpus = int(ray.cluster_resources().get("CPU", 1))
    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_first_task)
    submitted = time.clock_gettime(time.CLOCK_BOOTTIME)
    answers = ray.get([task.remote() for _ in range(cpus)])
    fresh = list({a["pid"]: a for a in answers}.values())
    figures["workers"] = _median([a["began"] - submitted for a in fresh])
    figures["worker age"] = _median([a["age_s"] for a in fresh])
    for name in WORKER_IMPORTS:
        figures[f"import {name}"] = _median([a["imports_s"][name] for a in fresh])

    clock = time.perf_counter()
    disconnect()
    figures["ray.shutdown"] = time.perf_counter() - clock
    figures["until ray.shutdown"] = _age_s(time.clock_gettime(time.CLOCK_BOOTTIME))
    figures["fresh workers"] = len(fresh)
    return figures


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def _run(argv: list[str], env: dict) -> tuple[float, str]:
    """(wall seconds, stdout) of a fresh process."""
    import subprocess

    from benchmarks.support.processes import fresh_process

    clock = time.perf_counter()
    run = subprocess.run(fresh_process(argv), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - clock
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{run.stderr[-3000:]}")
    return wall, run.stdout


def main(argv: list[str] | None = None) -> None:
    import argparse
    import statistics
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
    from mnist37.locate import find_root
    from tests.ray_heads import running_cluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data set folder or archive (e.g. mnist_sample.tgz)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians shown (default: 5)")
    args = parser.parse_args(argv)
    root = find_root(args.data, "train")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    me = [sys.executable, str(Path(__file__).resolve())]
    rows: dict[str, list[dict]] = {"seed": [], "own": [], "cluster": []}
    with tempfile.TemporaryDirectory(prefix="mnist37-fixed-") as work, \
            running_cluster(Path(work) / "ray-start.log") as address:
        for _ in range(args.rounds):
            wall, _ = _run([sys.executable, "-m", "mnist37.fastbook", "--data", str(root), "--classes", "3", "7"], env)
            rows["seed"].append({"wall": wall})
            for variant, target in (("own", "local"), ("cluster", address)):
                wall, out = _run([*me, "--probe", target], env)
                figures = json.loads(out.strip().splitlines()[-1])
                figures["exit"] = wall - figures.pop("until ray.shutdown")
                figures["wall"] = wall
                rows[variant].append(figures)

    names = ["wall", "python", "import ray", "import driver", "ray.init", "workers", "worker age",
             *(f"import {m}" for m in WORKER_IMPORTS), "ray.shutdown", "exit"]
    print(f"medians of {args.rounds} rounds, seconds; {rows['own'][0]['fresh workers']} fresh workers a probe")
    print(f"{'':<26}{'seed':>8}{'own':>8}{'cluster':>9}")
    for name in names:
        cells = []
        for variant in ("seed", "own", "cluster"):
            values = [r[name] for r in rows[variant] if name in r]
            cells.append(f"{statistics.median(values):.3f}" if values else "-")
        print(f"{name:<26}{cells[0]:>8}{cells[1]:>8}{cells[2]:>9}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:  # one measured process, before any other import
        print(json.dumps(probe(sys.argv[2])))
    else:
        main()
