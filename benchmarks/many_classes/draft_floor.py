"""What could beat the draft decode's 1.8x at 400x350 -> 64x64? Every decode within the
dependencies, at every DCT scale, against the full decode + resize: CPU ms per image.

    python benchmarks/many_classes/draft_floor.py --work /dev/shm/many-classes --count 100

On the 1,000-class set's RGB training JPEGs of at least 320 px a side (imagenet_like.py, made
first), alternating rounds, medians of CPU time (process_time, so the machine's other load
counts less than in wall time). The "alone" rows decode and stop: no resize, so not the target
pixels at all; they bound from below what any decode of that scale can cost (libjpeg-turbo still
entropy-decodes every coefficient of the file). Findings: benchmarks/many_classes/README.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import simplejpeg
from PIL import Image

SIZE = 64


def full(b: bytes, h: int, w: int):
    """The job's full decode: simplejpeg at scale 1, Pillow's resize."""
    pixels = simplejpeg.decode_jpeg(b, colorspace="RGB", fastdct=False, fastupsample=False)
    return Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def draft(b: bytes, h: int, w: int):
    """The job's draft (--jpeg-draft): Pillow's scale, then Pillow's resize with the draft's box."""
    fits = min(h // SIZE, w // SIZE)
    s = next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)
    pixels = simplejpeg.decode_jpeg(b, colorspace="RGB", min_height=-(-h // s), min_width=-(-w // s), min_factor=s)
    return Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(0, 0, w / s, h / s))


def alone(factor: int, fast: bool = False, colorspace: str = "RGB"):
    def decode(b: bytes, h: int, w: int):
        return simplejpeg.decode_jpeg(b, colorspace=colorspace, fastdct=fast, fastupsample=fast,
                                      min_height=-(-h // factor), min_width=-(-w // factor), min_factor=factor)
    return decode


def pillow_draft(b: bytes, h: int, w: int):
    with Image.open(io.BytesIO(b)) as image:
        box = image.draft("RGB", (SIZE, SIZE))[1]
        return image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box)


def pillow_draft_ycbcr(b: bytes, h: int, w: int):
    with Image.open(io.BytesIO(b)) as image:
        image.draft("YCbCr", (SIZE, SIZE))
        image.load()
        return image


VARIANTS = {
    "full (simplejpeg + resize)": full,
    "draft (the job's --jpeg-draft)": draft,
    "decode at 1/1 alone": alone(1),
    "decode at 1/4 alone": alone(4),
    "decode at 1/8 alone": alone(8),
    "decode at 1/8 alone, luma only (GRAY)": alone(8, colorspace="GRAY"),
    "decode at 1/4 alone, fastdct + fastupsample": alone(4, True),
    "decode at 1/8 alone, fastdct + fastupsample": alone(8, True),
    "Pillow draft RGB + resize": pillow_draft,
    "Pillow draft YCbCr, decode only": pillow_draft_ycbcr,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/dev/shm/many-classes"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = []
    for path in sorted((args.work / "imagenet-like" / "train").glob("*/*.JPEG")):
        b = path.read_bytes()
        h, w, components, _ = simplejpeg.decode_jpeg_header(b)
        if components == "YCbCr" and min(h, w) >= 320:
            data.append((b, h, w))
        if len(data) == args.count:
            break
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, decode in VARIANTS.items():
            clock = time.process_time()
            for b, h, w in data:
                decode(b, h, w)
            times[name].append((time.process_time() - clock) / len(data) * 1000)
    base = statistics.median(times["full (simplejpeg + resize)"])
    print(f"{len(data)} RGB JPEGs >= 320 px a side to {SIZE}x{SIZE}, CPU ms/image, medians of {args.repeats} "
          "alternating rounds")
    for name, t in times.items():
        print(f"  {name:<46} {statistics.median(t):6.3f} ms   full / this {base / statistics.median(t):5.2f}")


if __name__ == "__main__":
    main()
