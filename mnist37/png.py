"""The PNG codec: encoded bytes to `uint8 [N, H, W]` arrays. No I/O: the sources read the
bytes (mnist37.sources), this module only judges and decodes them.

Pillow is the general decoder. Plain PNGs (8-bit grayscale, one IDAT, unfiltered rows: all of
MNIST) are checked with NumPy and inflated in bulk (`plain_pngs`); other 8-bit grayscale PNGs
go to libspng (through `pyspng`, when installed), which gives identical pixels several times
faster than Pillow; anything else, and anything libspng fails on, goes to Pillow, whose
judgement is the one reported. docs/figures.md has the per-image costs and the commands that
measure them.

A bad image is a `DecodeError(path, reason)`; `decode_pngs` collects them instead of stopping,
so a job can report every bad file at once or leave them out (`on_bad_file`).
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist37 import Mnist37Error

try:
    import pyspng
except ImportError:  # the fast path is optional; Pillow decodes everything
    pyspng = None
# What pyspng.load calls, without its Python around it (decode_pngs); a pyspng without it
# leaves decode_pngs to decode_png.
_spng = getattr(pyspng, "_pyspng_c", None)
_spng_decode, _SPNG_AUTO = (_spng.spng_decode_image_bytes, _spng.SPNG_FMT_AUTO) if _spng else (None, None)

try:  # zlib-ng inflates faster than the standard library's zlib (docs/figures.md)
    from zlib_ng.zlib_ng import decompress as _inflate, error as _InflateError
except ImportError:  # the same bytes out, slower
    from zlib import decompress as _inflate, error as _InflateError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk and its CRC
_IDAT_CRC = zlib.crc32(b"IDAT")  # a chunk's CRC covers its type, then its data
_BIG_ENDIAN = 256 ** np.arange(3, -1, -1, dtype=np.int64)  # a uint32's 4 bytes, as int64
# Larger declared sizes are refused from the header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 1 << 24
_MODES = {"RGB": "RGB", "RGBA": "RGBA", "P": "palette", "PA": "palette with alpha", "LA": "grayscale with alpha",
          "1": "1-bit", "I": "32-bit grayscale", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale"}


class DecodeError(Mnist37Error, ValueError):
    """An image file that cannot be read or is not the expected grayscale size."""

    def __init__(self, path: str | bytes, reason: str):
        path = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path  # as os.fsdecode
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class BadFilesError(Mnist37Error):
    """Files that could not be used, under on_bad_file = error: one line each, up to a limit."""

    def __init__(self, rejected: list[tuple[str, str]], found: int, limit: int = 20):
        super().__init__(rejected, found, limit)
        self.rejected, self.found, self.limit = rejected, found, limit

    def __str__(self) -> str:
        lines = [f"{len(self.rejected)} of {self.found} image files cannot be used (on_bad_file = error; "
                 "--on-bad-file skip leaves them out and lists them in results.json):"]
        lines += [f"  {path}: {reason}" for path, reason in self.rejected[:self.limit]]
        if len(self.rejected) > self.limit:
            lines.append(f"  ... and {len(self.rejected) - self.limit} more")
        return "\n".join(lines)


def decode_settings(convert: bool) -> str:
    """What decoded pixels mean; part of every chunk's reuse key, so a change re-decodes."""
    return f"grayscale-8bit/v2/{'convert' if convert else 'reject'}-non-grayscale"


def png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, color type) from a PNG's IHDR, or None if not a PNG."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    return width, height, bit_depth, color_type


def decode_png(data: bytes, path: str | bytes, shape: tuple[int, int] | None = None,
               convert: bool = False) -> np.ndarray:
    """One PNG's bytes to `uint8 [H, W]`; `path` names the file in errors.

    A PNG whose header declares another shape than `shape`, or more than MAX_IMAGE_PIXELS,
    is refused without decoding. Non-grayscale PNGs (RGB, RGBA, palette, 16-bit, 1-bit) are
    refused, or with `convert` turned to 8-bit grayscale as Pillow's "L" mode does.
    """
    header = png_header(data)
    if header is not None:
        width, height = header[:2]
        if shape is not None and (height, width) != tuple(shape):
            raise DecodeError(path, f"expected {shape[0]}x{shape[1]}, found {height}x{width}")
        if width * height > MAX_IMAGE_PIXELS:
            raise DecodeError(path, f"declares {height}x{width} pixels, over the {MAX_IMAGE_PIXELS:,} "
                                    "allowed; not decoded")
        if pyspng is not None and header[2:] == (8, 0):  # 8-bit, color type 0 = grayscale
            try:
                pixels = pyspng.load(data)
            except Exception:  # noqa: BLE001 - whatever libspng rejects, Pillow judges and names
                pixels = None
            if pixels is not None and pixels.dtype == np.uint8 and pixels.shape == (height, width):
                return pixels
    pixels = decode_pillow(data, path, convert)
    if shape is not None and pixels.shape != tuple(shape):
        raise DecodeError(path, f"expected {shape[0]}x{shape[1]}, found {pixels.shape[0]}x{pixels.shape[1]}")
    return pixels


def decode_pngs(data: Sequence[bytes] | Blobs, path: Callable[[int], str], shape: tuple[int, int],
                convert: bool = False, general: Callable[[int], np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """`decode_png` of many PNGs expected to be `shape`: (uint8 [K, H, W], the K that decode,
    in order; bool [N], which those are; {index: reason} for the others). `path(i)` names the
    i-th in errors. Every item must be there (no None).

    Plain PNGs (`plain_pngs`) are decoded in bulk. Of the others, an 8-bit grayscale PNG of the
    expected size is told apart by its first 26 bytes (signature, IHDR length, type, size,
    depth, color type) and handed to libspng straight into the output array; `general(i)`
    (by default `decode_png`; mnist37.images passes its decoder of any format) judges every
    other item, and any libspng fails on, as it judges one alone."""
    h, w = shape
    done, pixels = plain_pngs(data, shape)
    if len(done) == len(data):  # all plain (MNIST): nothing more to do
        return np.ascontiguousarray(pixels), np.ones(len(data), dtype=bool), {}
    images = np.empty((len(data), h, w), dtype=np.uint8)
    kept = np.zeros(len(data), dtype=bool)
    images[done] = pixels
    kept[done] = True
    reasons = {}
    channels = images.reshape(len(data), h, w, 1)  # libspng returns [H, W, 1]
    head = PNG_SIGNATURE + struct.pack(">I4sIIBB", 13, b"IHDR", w, h, 8, 0)
    if _spng_decode is None or h * w > MAX_IMAGE_PIXELS:
        head = None  # no image goes the libspng way here
    for i in np.flatnonzero(~kept).tolist():
        png = data[i]
        if png[:26] == head:
            try:
                channels[i] = _spng_decode(png, _SPNG_AUTO)  # ValueError unless [H, W, 1]
                kept[i] = True
                continue
            except Exception:  # noqa: BLE001 - decode_png tries again and, failing, Pillow names the reason
                pass
        try:
            images[i] = decode_png(png, path(i), shape, convert) if general is None else general(i)
            kept[i] = True
        except DecodeError as e:
            reasons[i] = e.reason
    return (images if len(reasons) == 0 else images[kept]), kept, reasons


@dataclass(frozen=True, eq=False)
class Blobs:
    """N byte strings kept in one buffer, as Arrow keeps a binary column: item i is
    `buffer[starts[i]:starts[i] + lengths[i]]`, or None where `lengths[i]` is negative.

    A shard's encoded images travel this way from a container to the decoder, which checks
    and inflates them straight from the buffer: no bytes object per image (`to_pylist` of a
    Parquet column and the join before the bulk checks cost a large part of a plain PNG's
    decode: docs/figures.md)."""

    buffer: object  # bytes-like (bytes, memoryview, a pyarrow Buffer)
    starts: np.ndarray  # int64 [N]
    lengths: np.ndarray  # int64 [N]; -1 where there is no item

    @classmethod
    def of(cls, items: Sequence[bytes | None]) -> Blobs:
        """The items (None for a missing one) packed into one buffer, in order."""
        lengths = np.fromiter((-1 if b is None else len(b) for b in items), dtype=np.int64, count=len(items))
        sizes = np.maximum(lengths, 0)
        starts = np.cumsum(sizes) - sizes
        return cls(b"".join(b for b in items if b is not None), starts, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> bytes | None:
        start, length = int(self.starts[i]), int(self.lengths[i])
        return None if length < 0 else bytes(memoryview(self.buffer)[start:start + length])

    def __iter__(self) -> Iterator[bytes | None]:
        return map(self.__getitem__, range(len(self)))

    @property
    def present(self) -> np.ndarray:
        """bool [N]: where there is an item."""
        return self.lengths >= 0

    def take(self, index: np.ndarray) -> Blobs:
        """The items at `index` (int [K]; a negative index gives a missing item), sharing the buffer."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) == len(self) and (index == np.arange(len(self))).all():
            return self
        there = index >= 0
        if there.all():
            return Blobs(self.buffer, self.starts[index], self.lengths[index])
        starts, lengths = np.zeros(len(index), dtype=np.int64), np.full(len(index), -1, dtype=np.int64)
        starts[there], lengths[there] = self.starts[index[there]], self.lengths[index[there]]
        return Blobs(self.buffer, starts, lengths)

    def without(self, index: Sequence[int]) -> Blobs:
        """The same items, those at `index` made missing."""
        lengths = self.lengths.copy()
        lengths[np.asarray(index, dtype=np.int64)] = -1
        return Blobs(self.buffer, self.starts, lengths)

    def joined(self) -> bytes | memoryview:
        """The items there are, concatenated in order (a view of the buffer when they lie in
        it back to back, as Arrow and `of` put them)."""
        present = self.present
        starts, lengths = self.starts[present], self.lengths[present]
        if not len(starts):
            return b""
        view = memoryview(self.buffer).cast("B")
        if (starts[1:] == (starts + lengths)[:-1]).all():  # back to back
            return view[int(starts[0]):int(starts[-1] + lengths[-1])]
        return b"".join(view[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist()))


def plain_pngs(data: Sequence[bytes] | Blobs, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The plain PNGs among `data`, decoded: (int64 [K], their indices; uint8 [K, H, W]).

    Plain: an 8-bit grayscale, non-interlaced PNG of `shape` whose chunks are IHDR, one IDAT
    and IEND, every CRC right, and whose rows all have filter type 0 (none), so its pixels
    are the inflated IDAT without each row's filter byte. MNIST's PNGs are all plain. The
    bytes are checked for all PNGs at once with NumPy; per PNG there remain a CRC and an
    inflate, a fraction of libspng's whole decode (docs/figures.md). Anything else
    (and a missing item of `Blobs`) is left to the general path, which also names what is
    wrong with a broken file."""
    h, w = shape
    none = np.empty(0, dtype=np.int64), np.empty((0, h, w), dtype=np.uint8)
    if not len(data) or h * w > MAX_IMAGE_PIXELS:
        return none
    blobs = data if isinstance(data, Blobs) else Blobs.of(data)
    starts, lengths = blobs.starts, blobs.lengths
    view = memoryview(blobs.buffer).cast("B")
    everything = np.frombuffer(view, dtype=np.uint8)
    ihdr = struct.pack(">4sIIBBBBB", b"IHDR", w, h, 8, 0, 0, 0, 0)
    expected = np.frombuffer(PNG_SIGNATURE + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
                             + b"IDAT", dtype=np.uint8)
    candidates = np.flatnonzero(lengths >= 57)  # 33 (signature, IHDR) + 12 (empty IDAT) + 12 (IEND)
    heads = everything[starts[candidates, None] + np.arange(41)]
    sizes = heads[:, 33:37].astype(np.int64) @ _BIG_ENDIAN
    ends = starts[candidates] + lengths[candidates]
    tails = everything[ends[:, None] - 12 + np.arange(12)]
    ok = ((heads[:, :33] == expected[:33]).all(axis=1) & (heads[:, 37:41] == expected[33:]).all(axis=1)
          & (lengths[candidates] == sizes + 57) & (tails == np.frombuffer(_IEND, dtype=np.uint8)).all(axis=1))
    candidates, sizes = candidates[ok], sizes[ok]
    if not len(candidates):
        return none
    idats = [view[s:s + n] for s, n in zip((starts[candidates] + 41).tolist(), sizes.tolist())]
    crcs = everything[ends[ok][:, None] - 16 + np.arange(4)].astype(np.int64) @ _BIG_ENDIAN
    ok = np.fromiter(map(zlib.crc32, idats, itertools.repeat(_IDAT_CRC)), dtype=np.int64, count=len(idats)) == crcs
    if not ok.all():
        candidates, idats = candidates[ok], [d for d, keep in zip(idats, ok.tolist()) if keep]
    try:  # no output size given: zlib-ng's default buffer is faster than an exact one
        raws = list(map(_inflate, idats))
    except _InflateError:
        raws = [_inflated(d) for d in idats]
    raw_size = h * (w + 1)
    whole = np.fromiter(map(len, raws), dtype=np.int64, count=len(raws)) == raw_size
    if not whole.all():
        candidates, raws = candidates[whole], [r for r, keep in zip(raws, whole.tolist()) if keep]
    rows = np.frombuffer(b"".join(raws), dtype=np.uint8).reshape(len(raws), h, w + 1)
    unfiltered = ~rows[:, :, 0].any(axis=1)
    if unfiltered.all():
        return candidates, rows[:, :, 1:]
    return candidates[unfiltered], rows[unfiltered, :, 1:]


def _inflated(idat: memoryview) -> bytes:
    try:
        return _inflate(idat)
    except _InflateError:
        return b""  # left to the general path, which names the damage


def decode_pillow(data: bytes, path: str | bytes, convert: bool = False) -> np.ndarray:
    """The general path: any file Pillow reads, accepted only as a PNG."""
    if not data:
        raise DecodeError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise DecodeError(path, f"not a PNG ({image.format} data)")
            if image.mode != "L":
                if not convert:
                    raise DecodeError(path, f"expected 8-bit grayscale, found {_MODES.get(image.mode, image.mode)}")
                return np.asarray(image.convert("L"))
            return np.asarray(image)
    except UnidentifiedImageError:
        raise DecodeError(path, _broken_png(data, "not identified") if data.startswith(PNG_SIGNATURE)
                          else "not an image") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(path, f"too large to decode ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(path, _broken_png(data, str(e))) from None


def _broken_png(data: bytes, detail: str) -> str:
    """A file that starts as a PNG but does not decode: cut short (no IEND at its end) or corrupt."""
    if b"IEND" not in data[-12:] or "truncated" in detail.lower():
        return "truncated PNG"
    return f"corrupt PNG ({detail})"
