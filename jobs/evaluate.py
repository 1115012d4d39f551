"""Evaluate fastbook's pixel-similarity baseline (nearest mean image) as a Ray job.

On a laptop (starts a local Ray when no cluster is running):
    python jobs/evaluate.py --data ../shared/data/mnist_sample.tgz --out runs/sample

On a Ray cluster (README: "On a Ray cluster"):
    ray job submit --address http://127.0.0.1:8265 --runtime-env configs/runtime_env.yaml -- \
        python jobs/evaluate.py --data /data/mnist_sample.tgz --out /data/runs/sample

Every config key is also a flag (--shard-size 97, --device cpu, --on-bad-file skip); see
configs/mnist_sample.toml and mnist37/config.py. With no --data it downloads mnist_sample.
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Run as a script (python jobs/evaluate.py, or under `ray job submit`), the project root is
# not on sys.path unless mnist37 was pip-installed; Ray passes the driver's sys.path on to
# its workers, so this one line serves both.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37 import Mnist37Error  # noqa: E402
from mnist37.config import Config, build_parser, from_args  # noqa: E402

log = logging.getLogger("mnist37.evaluate")


def parse_args(argv: list[str] | None = None) -> Config:
    parser = build_parser(description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    try:
        return from_args(args)
    except Mnist37Error as e:
        parser.error(str(e))


def main(cfg: Config) -> dict:
    import ray

    from mnist37.distributed import check_address
    from mnist37.evaluation import evaluate, plan
    from mnist37.report import write_outputs

    clock = time.perf_counter()
    check_address(cfg.ray_address)
    # The scan needs no Ray: it runs while Ray starts (on 2 cores, ~0.5 s off a large job),
    # and a data problem is reported without waiting for it.
    with ThreadPoolExecutor(max_workers=1) as pool:
        planned = pool.submit(plan, cfg)
        # address=None: RAY_ADDRESS (set by `ray job submit`), else a cluster started on this
        # machine with `ray start`, else a new local Ray (its dashboard, if on, on loopback only).
        ray.init(address=cfg.ray_address or None, include_dashboard=cfg.ray_dashboard,
                 dashboard_host="127.0.0.1", configure_logging=False, log_to_driver=True)
        ray_init_s = time.perf_counter() - clock
        try:
            results, prototypes, example_images = evaluate(cfg, planned.result())
        finally:
            ray.shutdown()
    results["elapsed_s"] = {"ray_init": ray_init_s, **results["elapsed_s"],
                            "total": time.perf_counter() - clock}
    table = write_outputs(Path(cfg.out), results, prototypes, example_images)
    print(table)
    used = sum(sum(c.values()) for c in results["counts"].values())
    rejected = len(results["rejected"])
    print(f"\n{used + rejected} image files = {used} used + {rejected} rejected, in "
          f"{results['elapsed_s']['total']:.2f} s (ray.init {ray_init_s:.2f} s); "
          f"results in {Path(cfg.out) / 'results.json'}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = parse_args()
    try:
        main(config)
    except Mnist37Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
