"""The decode of photo-sized JPEGs for a small target: the full decode then resize (the
default) against `--jpeg-draft` (libjpeg-turbo's DCT scaling first), through the job's own
codec (mnist37.images.decode_images, as a decode task runs it), in one process.

    python benchmarks/many_classes/draft_benchmark.py --count 300 --repeats 7

The JPEGs are made in memory by imagenet_like.render (a class's colour field, noised),
--width x --height (default 400x350, ImageNet's mean), quality 90, 4:2:0. Each round decodes
all of them once per variant, alternating the variants, so the machine's load falls on both
alike; the figures are medians over rounds, of this process's CPU time (`time.process_time`:
on a shared machine, wall time mostly measures the other processes) and of wall time. `pillow` variants disable simplejpeg (the codec's
fallback, and what a set of CMYK or gray JPEGs gets).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import imagenet_like  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="JPEGs decoded per variant and round")
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=350)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="target sides")
    parser.add_argument("--repeats", type=int, default=7, help="rounds")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    import mnist37.images as images
    from mnist37.images import Decoding, decode_images

    spec = imagenet_like.Spec()
    data = []
    for i in range(args.count):
        out = io.BytesIO()
        Image.fromarray(imagenet_like.render(spec, i % 50, args.width, args.height, i)).save(out, "JPEG", quality=90)
        data.append(out.getvalue())
    print(f"{args.count} JPEGs {args.width}x{args.height} (WxH), {sum(map(len, data)) / args.count / 1e3:.0f} kB "
          f"each; {args.repeats} rounds, medians", flush=True)
    simplejpeg = images.simplejpeg
    paths = [f"{i}.JPEG" for i in range(args.count)].__getitem__
    for side in args.sizes:
        full = Decoding((side, side), convert=True, channels=3, resize=True)
        variants = {"full": (full, simplejpeg), "draft": (dataclasses.replace(full, draft=True), simplejpeg),
                    "full pillow": (full, None), "draft pillow": (dataclasses.replace(full, draft=True), None)}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        wall: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (decoding, codec) in variants.items():
                images.simplejpeg = codec
                clock, cpu_clock = time.perf_counter(), time.process_time()
                done = decode_images(data, paths, decoding)
                cpu[name].append(time.process_time() - cpu_clock)
                wall[name].append(time.perf_counter() - clock)
                assert len(done.images) == args.count and not done.reasons
        images.simplejpeg = simplejpeg
        base, base_wall = statistics.median(cpu["full"]), statistics.median(wall["full"])
        print(f"\nto {side}x{side}: {'variant':<13} {'CPU ms/image':>12} {'x full':>7} {'wall ms/image':>13} {'x full':>7}")
        for name in variants:
            t, w = statistics.median(cpu[name]), statistics.median(wall[name])
            print(f"{'':>{len(str(side)) * 2 + 5}} {name:<13} {1e3 * t / args.count:>12.3f} {base / t:>7.2f} "
                  f"{1e3 * w / args.count:>13.3f} {base_wall / w:>7.2f}")
        drafted = decode_images(data[:1], paths, variants["draft"][0]).images[0].astype(int)
        fully = decode_images(data[:1], paths, full).images[0].astype(int)
        print(f"{'':>{len(str(side)) * 2 + 5}} draft vs full, first image: mean |difference| "
              f"{np.abs(drafted - fully).mean():.2f}, max {np.abs(drafted - fully).max()} (of 255)")


if __name__ == "__main__":
    main()
