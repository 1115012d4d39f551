"""Convert a data set the job reads into Parquet (Hugging Face layout), WebDataset tar shards or IDX.

    python jobs/convert.py --data ../shared/data/mnist_png.tgz --train-split training \
        --eval-split testing --to webdataset --dest data/mnist-wds --shard-size 8192

Reads what jobs/evaluate.py reads (its data and decoding flags; --classes defaults to all here)
and writes one file per --shard-size images into --dest, which must not exist yet (see
mnist37/convert.py). `python jobs/convert.py --help` lists the flags. Then:

    python jobs/evaluate.py --data data/mnist-wds --train-split training --eval-split testing --classes all

The converter's command line is mnist37.convert_job (`mnist37-convert` from an installed mnist37).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37.convert_job import main, parse_args, run  # noqa: E402, F401 - main and parse_args for callers

if __name__ == "__main__":
    sys.exit(run())
