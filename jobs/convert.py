"""Convert a data set the job reads into Parquet (Hugging Face layout), WebDataset tar shards or IDX.

    python jobs/convert.py --data ../shared/data/mnist_png.tgz --train-split training \
        --eval-split testing --to webdataset --dest data/mnist-wds --shard-size 8192

Reads what jobs/evaluate.py reads (--data, --format, --classes, the splits; every config key
is a flag, --classes defaults to all here) and writes one file per --shard-size images into
--dest, which must not exist yet (see mnist37/convert.py). Then:

    python jobs/evaluate.py --data data/mnist-wds --train-split training --eval-split testing --classes all
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37 import Mnist37Error  # noqa: E402
from mnist37.config import build_parser, from_args  # noqa: E402
from mnist37.convert import TARGETS, convert  # noqa: E402


def parse_args(argv: list[str] | None = None):
    parser = build_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, choices=TARGETS, help="output format")
    parser.add_argument("--dest", required=True, type=Path, help="output folder (must not exist)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.classes is None:
        args.classes = ["all"]
    try:
        return from_args(args), args
    except Mnist37Error as e:
        parser.error(str(e))


def main(cfg, args) -> dict:
    summary = convert(cfg, args.dest, args.to, args.workers or None)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))
    print(f"{sum(summary['records'].values())} records in {summary['files']} files at {summary['dest']} "
          f"in {summary['elapsed_s']:.1f} s; {len(summary['skipped'])} left out, {summary['ignored']} of other classes")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, arguments = parse_args()
    try:
        main(config, arguments)
    except Mnist37Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
