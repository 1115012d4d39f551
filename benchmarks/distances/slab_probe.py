"""torch.cdist p=1 on slabs of 128, 256 (classify.L1_SLAB_VALUES) and 512 values, 200 images x
1,000 classes x 12,288 values, one thread, CPU seconds, two alternating rounds.

    python benchmarks/distances/slab_probe.py
"""

import argparse
import time

import torch


def slabs(a: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    out = None
    for first in range(0, a.shape[1], size):
        part = torch.cdist(a[:, first:first + size].contiguous(), b[:, first:first + size].contiguous(), p=1)
        out = part if out is None else out.add_(part)
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (200, 12288), generator=g).float() / 255
    p = torch.rand(1000, 12288, generator=g)
    for round_ in range(2):
        for size in (256, 128, 512):
            clock = time.process_time()
            slabs(x, p, size)
            print(f"round {round_ + 1}: slabs of {size}: {time.process_time() - clock:.3f} CPU s")


if __name__ == "__main__":
    main()
