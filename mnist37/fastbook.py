"""fastbook's pixel-similarity baseline, written plainly as the book does it: one process,
Pillow per file, `torch.stack`, mean images, L1 distance. The benchmark's baseline and the
tests' independent check; mnist37's distributed job must agree with it. Prints correct
predictions per evaluation class as JSON:

    python jobs/fastbook.py --data runs/bench/data-x10 [--classes 3 7]
    python -m mnist37.fastbook ...        (the same, from an installed mnist37)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def mnist_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean((-1, -2))


def stacked(folder: Path) -> torch.Tensor:
    """Every PNG in `folder` as one float tensor [N, H, W] in [0, 1]."""
    tensors = [torch.tensor(np.array(Image.open(o))) for o in sorted(folder.glob("*.png"))]
    return torch.stack(tensors).float() / 255


def evaluate(root: Path, train_split: str = "train", eval_split: str = "valid",
             classes: tuple[str, ...] = ("3", "7")) -> dict[str, int]:
    """Correct predictions per evaluation class: nearest mean image by L1 distance.

    With two classes this is fastbook's `is_3(x) = mnist_distance(x, mean3) < mnist_distance(x, mean7)`;
    ties go to the later class there, as `<` does.
    """
    means = torch.stack([stacked(root / train_split / c).mean(0) for c in classes])
    correct = {}
    for index, name in enumerate(classes):
        valid = stacked(root / eval_split / name)
        dists = torch.stack([mnist_distance(valid, m) for m in means], dim=1)
        # argmin over reversed columns gives the last of equal minima, like fastbook's `<`.
        nearest = len(classes) - 1 - dists.flip(1).argmin(dim=1)
        correct[name] = int((nearest == index).sum())
    return correct


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mnist37.config import HelpFormatter

    parser = argparse.ArgumentParser(description="fastbook's baseline as the book writes it (one process)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="ImageFolder root, a folder (required)")
    parser.add_argument("--train-split", default="train", metavar="SPLIT", help="split averaged into the class means")
    parser.add_argument("--eval-split", default="valid", metavar="SPLIT", help="split that is classified")
    parser.add_argument("--classes", nargs="+", default=["3", "7"], metavar="CLASS", help="class folders")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    clock = time.perf_counter()
    correct = evaluate(args.data, args.train_split, args.eval_split, tuple(args.classes))
    result = {"correct": correct, "elapsed_s": time.perf_counter() - clock}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
