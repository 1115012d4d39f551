"""The converter as a process: its flags, the conversion, and how it ends.

    python jobs/convert.py --data ../shared/data/mnist_png.tgz --train-split training \
        --eval-split testing --to webdataset --dest data/mnist-wds --shard-size 8192
    mnist37-convert ...                 (the same, from an installed mnist37)

It reads what the evaluation job reads, so it takes the job's data and decoding flags (--classes
defaults to all here) plus its own --to, --dest and --workers; the job's classify, Ray and
output flags do nothing here and are not listed by --help (they are still accepted, as every
config key is). Ends with 0 and a summary; 2 for a bad flag or config; 1 for a data or
destination problem (`error: ...`). The conversion itself is mnist37.convert.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mnist37 import Mnist37Error
from mnist37.config import DATA, DECODING, Config, build_parser, from_args

# The converter's own defaults: every class of the data set, not fastbook's pair.
DEFAULTS = {"classes": ["all"]}
# Decoding keys the converter does not read: it copies encoded images as they are, leaving out
# and reporting records it cannot use whatever on_bad_file says, and writes no chunks.
UNUSED = ("on_bad_file", "verify_chunks")
# What three decoding keys mean to the converter, in its --help.
HELPS = {"shard_size": "images per output file; 0: 8192, fewer where --image-size or --image-shape makes them over "
                       "16 MiB decoded",
         "chunk_dir": "where folder listings are kept for reuse: a path or URI",
         "reuse_chunks": "reuse a class folder's listing while the folder is unchanged"}


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """(the config to read from, the namespace with --to, --dest and --workers)."""
    from mnist37.convert import TARGETS

    parser = build_parser(description="Convert a data set the job reads into Parquet (Hugging Face layout), "
                                      "WebDataset tar shards or IDX.",
                          groups=(DATA, DECODING), hidden=UNUSED, defaults=DEFAULTS, helps=HELPS)
    parser.epilog = ("The data and decoding flags are also keys of a --config file (--shard-size: shard_size); "
                     "--to, --dest and --workers are flags only. Lists take spaces or commas.")
    own = parser.add_argument_group("conversion", "what is written, and by how many processes")
    own.add_argument("--to", required=True, choices=TARGETS, help="output format (required)")
    own.add_argument("--dest", required=True, type=Path, metavar="DIR",
                     help="output folder, which must not exist yet (required)")
    own.add_argument("--workers", type=int, default=0, metavar="N",
                     help="processes writing files (default: one per CPU)")
    args = parser.parse_args(argv)
    try:
        return from_args(args, DEFAULTS), args
    except Mnist37Error as e:
        parser.error(str(e))


def main(cfg: Config, args: argparse.Namespace) -> dict:
    """Convert; print the summary; return it. Raises Mnist37Error for a data or destination problem."""
    from mnist37.convert import convert

    summary = convert(cfg, args.dest, args.to, args.workers or None)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))
    print(f"{sum(summary['records'].values())} records in {summary['files']} files at {summary['dest']} "
          f"in {summary['elapsed_s']:.1f} s; {len(summary['skipped'])} left out, {summary['ignored']} of other classes")
    return summary


def run(argv: list[str] | None = None) -> int:
    """The command line: returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg, args = parse_args(argv)
    try:
        main(cfg, args)
        return 0
    except Mnist37Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
