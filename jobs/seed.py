"""fastbook's baseline as the book writes it (one process, Pillow, torch.stack): the benchmark's
reference. Prints correct predictions per evaluation class as JSON.

    python jobs/seed.py --data runs/bench/data-x10 [--classes 3 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37.seed import evaluate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="ImageFolder root (a folder)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="valid")
    parser.add_argument("--classes", nargs="+", default=["3", "7"])
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    clock = time.perf_counter()
    correct = evaluate(args.data, args.train_split, args.eval_split, tuple(args.classes))
    result = {"correct": correct, "elapsed_s": time.perf_counter() - clock}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
