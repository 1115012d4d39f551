"""PNG decode: files to `uint8 [N, H, W]` arrays, with a content digest of what was read."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist37 import Mnist37Error


class DecodeError(Mnist37Error, ValueError):
    """An image file that cannot be read or is not the expected grayscale size."""


def decode_png(data: bytes, name: str) -> np.ndarray:
    """One 8-bit grayscale PNG's bytes to `uint8 [H, W]`; `name` is used in errors."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise DecodeError(f"{name}: expected a PNG, found {image.format}")
            if image.mode != "L":
                raise DecodeError(f"{name}: expected an 8-bit grayscale PNG, found mode {image.mode}")
            return np.asarray(image)
    except UnidentifiedImageError:
        raise DecodeError(f"{name}: not an image") from None
    except OSError as e:  # Pillow's "image file is truncated", broken chunks, bad CRCs
        raise DecodeError(f"{name}: unreadable PNG ({e})") from None


def image_shape(root: Path, path: str) -> tuple[int, int]:
    """(H, W) of one image, read from disk; the shape every other image must have."""
    return decode_png((root / path).read_bytes(), path).shape


def decode_files(root: Path, paths: Sequence[str], shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Decode `paths` (relative to `root`) into `uint8 [N, H, W]`.

    Returns the images and the content digest of what was read (see `file_digest`).
    """
    images = np.empty((len(paths), *shape), dtype=np.uint8)
    digest = 0
    for i, path in enumerate(paths):
        try:
            data = (root / path).read_bytes()
        except OSError as e:
            raise DecodeError(f"{path}: cannot read file ({e.strerror})") from None
        pixels = decode_png(data, path)
        if pixels.shape != shape:
            h, w = pixels.shape
            raise DecodeError(f"{path}: expected {shape[0]}x{shape[1]}, found {h}x{w}")
        images[i] = pixels
        digest = combine_digests(digest, file_digest(path, data))
    return images, f"{digest:032x}"


def file_digest(path: str, data: bytes) -> int:
    """128-bit BLAKE2b of one file's relative path and bytes."""
    h = hashlib.blake2b(path.encode(), digest_size=16)
    h.update(b"\0")
    h.update(data)
    return int.from_bytes(h.digest(), "little")


def combine_digests(*digests: int | str) -> int:
    """Sum of digests modulo 2**128: a set hash, so a data set's fingerprint is the same
    however its files are cut into shards and in whatever order shards finish."""
    return sum(int(d, 16) if isinstance(d, str) else d for d in digests) % (1 << 128)
