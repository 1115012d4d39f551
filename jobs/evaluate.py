"""Evaluate fastbook's pixel-similarity baseline (nearest mean image) as a Ray job.

On a laptop (starts a local Ray when no cluster is running):
    python jobs/evaluate.py --data ../shared/data/mnist_sample.tgz --out runs/sample

On a Ray cluster (README: "On a Ray cluster"):
    ray job submit --address http://127.0.0.1:8265 --runtime-env configs/runtime_env.yaml -- \
        python jobs/evaluate.py --data /data/mnist_sample.tgz --out /data/runs/sample

Every config key is also a flag (--shard-size 97, --device cpu, --on-bad-file skip); `--help`
lists them by group (data, decoding, classify, Ray, output) with their choices and defaults;
configs/ holds example config files. With no --data it downloads mnist_sample. The job itself
is mnist37.job (`mnist37-evaluate`, or `python -m mnist37.job`, from an installed mnist37).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (python jobs/evaluate.py, or under `ray job submit`), the project root is
# not on sys.path unless mnist37 was pip-installed; Ray passes the driver's sys.path on to
# its workers, so this one line serves both.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37.job import main, parse_args, run  # noqa: E402, F401 - main and parse_args for callers

if __name__ == "__main__":
    sys.exit(run())
