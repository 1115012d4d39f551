"""Per-image CPU of JPEG decoding, side by side in one process: Pillow's `Image.open` +
`np.asarray` (what a plain loop and torchvision's ImageFolder do), mnist37's decode of a
shard (`images.decode_images`, as a decode task runs it: libjpeg-turbo through simplejpeg where
the JPEG is already what is wanted, into the chunk's channel-first array), and libjpeg-turbo's own time for the same files (`tjbench`, from Debian's
libjpeg-turbo-progs, when installed: the floor). Medians of --repeats rounds, each over every
file, on 32x32 and 224x224 color JPEGs made here (quality 90, 4:2:0).

    python benchmarks/jpeg_decode/jpeg_benchmark.py
    python benchmarks/jpeg_decode/jpeg_benchmark.py --images 2000 --repeats 7 --sizes 32 224 512
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
from mnist37.images import Decoding, decode_images  # noqa: E402


def corpus(size: int, count: int, seed: int = 0) -> list[bytes]:
    """Photo-like color JPEGs: 4x4 blocks of color plus noise, quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        blocks = rng.integers(0, 256, (size // 4 + 1, size // 4 + 1, 3))
        pixels = np.kron(blocks, np.ones((4, 4, 1)))[:size, :size] + rng.normal(0, 12, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def per_image_us(decode, data: list[bytes], repeats: int) -> float:
    """CPU µs an image of `decode(data)` (the whole list at once), the median of the rounds."""
    rounds = []
    for _ in range(repeats):
        clock = time.process_time()
        decode(data)
        rounds.append((time.process_time() - clock) / len(data) * 1e6)
    return statistics.median(rounds)


def pillow_loop(data: list[bytes]) -> list[np.ndarray]:
    return [pillow(d) for d in data]


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def binding_us(data: list[bytes], size: int, repeats: int) -> float | None:
    """The per-image Python binding bound (module docstring), or None without libturbojpeg."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("turbojpeg")
    if name is None:
        return None
    tj = ctypes.CDLL(name)
    tj.tjInitDecompress.restype = ctypes.c_void_p
    handle = ctypes.c_void_p(tj.tjInitDecompress())
    header, decompress = tj.tjDecompressHeader3, tj.tjDecompress2
    header.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_void_p] * 4
    decompress.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p] + [ctypes.c_int] * 5
    fields = [ctypes.c_int() for _ in range(4)]
    width, height, subsampling, colorspace = (ctypes.byref(f) for f in fields)
    out = np.empty((len(data), size, size, 3), dtype=np.uint8)
    base, step = out.ctypes.data, size * size * 3

    def decode(items: list[bytes]) -> None:
        for i, d in enumerate(items):
            if header(handle, d, len(d), width, height, subsampling, colorspace) or \
                    decompress(handle, d, len(d), base + i * step, size, 0, size, 0, 0):  # TJPF_RGB, accurate DCT
                raise RuntimeError(f"libturbojpeg refused image {i}")
    try:
        us = per_image_us(decode, data, repeats)
        if not np.array_equal(out, np.stack(pillow_loop(data))):
            raise RuntimeError("libturbojpeg's pixels differ from Pillow's")
        return us
    finally:
        tj.tjDestroy(handle)


def tjbench_us(data: list[bytes]) -> float | None:
    """libjpeg-turbo's own decompression time per image (tjbench -quiet on each file, the
    median of its per-file figures), or None without tjbench."""
    tool = shutil.which("tjbench")
    if tool is None:
        return None
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for i, d in enumerate(data[:50]):
            path = Path(folder) / f"{i}.jpg"
            path.write_bytes(d)
            run = subprocess.run([tool, str(path), "-quiet", "-benchtime", "0.2", "-warmup", "0.1"],
                                 capture_output=True, text=True, cwd=folder)
            # -quiet prints: <format> <subsamp> <qual> <width> <height> <comp perf> <comp ratio> <decomp perf>
            # (Mpixels/s); the last number is decompression throughput.
            numbers = re.findall(r"[\d.]+", run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else []
            if numbers:
                with Image.open(io.BytesIO(d)) as image:
                    pixels = image.width * image.height
                times.append(pixels / (float(numbers[-1]) * 1e6) * 1e6)
    return statistics.median(times) if times else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="JPEGs per size (default: 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median is shown (default: 5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="square sizes (default: 32 224)")
    args = parser.parse_args(argv)
    print(f"{'size':>7} {'Pillow µs':>10} {'mnist37 µs':>11} {'binding µs':>11} {'floor µs':>9} "
          f"{'Pillow/mnist37':>15} {'floor/mnist37':>14} {'floor/binding':>14}")
    for size in args.sizes:
        data = corpus(size, args.images)
        decoding = Decoding((size, size), channels=3)
        ours = per_image_us(lambda d: decode_images(d, lambda i: f"{i}.jpg", decoding), data, args.repeats)
        theirs = per_image_us(pillow_loop, data, args.repeats)
        bound = binding_us(data, size, args.repeats)
        floor = tjbench_us(data)
        nan = float("nan")
        print(f"{size}x{size:<4} {theirs:10.1f} {ours:11.1f} {bound or nan:11.1f} {floor or nan:9.1f} "
              f"{theirs / ours:15.2f} {(floor or nan) / ours:14.2f} {(floor or nan) / (bound or nan):14.2f}")


if __name__ == "__main__":
    main()
