"""Do the decode's and classify's kernels release the GIL? A pure-Python thread counts while the
main thread makes one long call of each (a 3000x3000 JPEG decode, a resize to 64x64, a
2000x500x4096 cdist p=1): a count that goes on at its rate alone means the call released the GIL,
so threads within a task (tried for issue 33, not kept) could run in parallel.

    python benchmarks/many_classes/gil_probe.py
"""
import argparse
import threading
import time

import numpy as np
import simplejpeg
import torch
from PIL import Image


class Spinner:
    """A pure-Python thread counting as fast as it can get the GIL."""

    def __init__(self):
        self.count, self.stopped = 0, False
        self.thread = threading.Thread(target=self._spin)

    def _spin(self) -> None:
        while not self.stopped:
            self.count += 1

    def __enter__(self):
        self.thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.stopped = True
        self.thread.join()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    big = np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)
    jpeg = simplejpeg.encode_jpeg(big, quality=90)
    image = Image.fromarray(big)
    a, b = torch.rand(2000, 4096), torch.rand(500, 4096)
    calls = [("simplejpeg.decode_jpeg 3000x3000", lambda: simplejpeg.decode_jpeg(jpeg, colorspace="RGB")),
             ("Pillow resize 3000x3000 -> 64x64", lambda: image.resize((64, 64), Image.Resampling.BILINEAR)),
             ("torch.cdist p=1 2000x500x4096", lambda: torch.cdist(a, b, p=1))]
    with Spinner() as spinner:
        for name, call in calls:
            for _ in range(2):
                before, clock = spinner.count, time.perf_counter()
                call()
                wall, steps = time.perf_counter() - clock, spinner.count - before
                print(f"{name}: {wall * 1000:.0f} ms, spinning thread advanced {steps:,} steps "
                      f"({steps / wall / 1e6:.1f} M/s)")
    with Spinner() as spinner:
        before = spinner.count
        time.sleep(0.5)
        print(f"spinning alone: {(spinner.count - before) / 0.5 / 1e6:.1f} M/s")


if __name__ == "__main__":
    main()
