"""The image codec: encoded images of any common format to uint8 arrays, told apart by their bytes.

Which files are images is the sources' business (by extension: `EXTENSIONS`); which codec
decodes one is decided here, by its bytes (`sniff`). A file whose bytes are another format
than its name says is decoded by its bytes and noted (`Images.notes`). No I/O: the sources read
the bytes, this module only judges and decodes them.

Every image becomes what `Decoding` asks for, as Pillow makes it: one channel (`convert("L")`)
or three (`convert("RGB")`: CMYK, palette, gray, gray with alpha, 16-bit included; alpha
dropped as `convert` drops it), then, with `Decoding.resize`, `Image.resize((W, H), filter)`,
so any Pillow-based reference gets identical pixels. With `Decoding.draft` (config `jpeg_draft`),
a JPEG is first decoded for its target size through libjpeg-turbo's DCT scaling, exactly as
Pillow's `Image.thumbnail` does it: `box = image.draft(mode, (W, H))[1]` (1/2, 1/4 or 1/8 of the
size, never below (W, H); gray straight from the luma for one channel), `convert(mode)` where
still needed, then `resize((W, H), filter, box=box)`; other formats are decoded as without it. An image converted is used and its
conversion counted per kind (`Images.conversions`); one-channel data sets may still refuse
non-grayscale images (`Decoding.convert` false), as before. Arrays are channel-first:
`uint8 [N, H, W]` for one channel, `uint8 [N, 3, H, W]` for three.

One-channel images of the expected size keep the PNG fast paths (mnist37.png: plain PNGs in
bulk, libspng). A JPEG whose components are the target's (YCbCr to RGB, gray to gray) is
decoded by libjpeg-turbo through simplejpeg, with Pillow's own settings (accurate DCT, fancy
upsampling), so its pixels are Pillow's (tests/test_images.py checks them) at a fraction of
Pillow's per-image cost (docs/figures.md); simplejpeg refuses anything it would only recover
from, and Pillow then judges it. Everything else goes through Pillow, whose judgement is the
one reported. An image declaring more than MAX_IMAGE_PIXELS, or no pixels at all, is
refused from its header, before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libjpeg-turbo without Pillow's per-image overhead; without it, Pillow decodes every JPEG
    import simplejpeg
except ImportError:
    simplejpeg = None

from mnist37.png import MAX_IMAGE_PIXELS, Blobs, DecodeError, decode_png, decode_pngs, decode_settings, png_header
from mnist37.threads import run_spread, threads_for

# Images per decode thread, at least: fewer are decoded in the calling thread.
THREAD_IMAGES = 64
# warnings.catch_warnings swaps the process's warning filters: one decode thread at a time.
_FILTERS = threading.Lock()

# File name extensions of images (lower case): what a folder listing takes as an image file.
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The format each extension names, as Pillow names formats.
NAMED = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
         ".tif": "TIFF", ".tiff": "TIFF"}
# Pillow formats decoded (MPO: a JPEG with extra frames, as some cameras write).
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")
# Resize filters by the name --resize-filter takes.
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
# Pillow modes that are one channel of gray; any other is color.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_MODE_NAMES = {"RGB": "RGB", "RGBA": "RGBA", "P": "palette", "PA": "palette with alpha", "LA": "grayscale with alpha",
               "1": "1-bit", "I": "32-bit grayscale", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale",
               "I;16L": "16-bit grayscale", "CMYK": "CMYK", "YCbCr": "YCbCr", "L": "8-bit grayscale", "F": "float"}
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


@dataclass(frozen=True)
class Decoding:
    """How a shard is decoded, the same for every shard of a run: the settings that travel
    from the config down to the codec, in one record."""

    shape: tuple[int, int]  # (H, W) every image must have, or is resized to (`resize`)
    convert: bool = False  # images of another mode converted and counted (else, one channel: rejected)
    reuse: bool = True  # reuse a chunk written from the same files (else decode again)
    verify: bool = True  # hash a chunk against its checksum before reusing it
    channels: int = 1  # 1 (gray) or 3 (RGB)
    resize: bool = False  # resize every image to `shape` (else another size is rejected)
    resample: str = "bilinear"  # the resize filter, a key of FILTERS
    draft: bool = False  # with `resize`, JPEGs decoded for their target size (Pillow's draft)

    @property
    def array_shape(self) -> tuple[int, ...]:
        """One image's array: (H, W), or (3, H, W) for color."""
        return tuple(self.shape) if self.channels == 1 else (3, *self.shape)

    @property
    def settings(self) -> str:
        """What decoded pixels mean; part of every chunk's reuse key, so a change decodes again.
        One channel at its own size keeps the words chunks have always recorded."""
        if self.channels == 1 and not self.resize:
            return decode_settings(self.convert)
        target = "rgb" if self.channels == 3 else "gray"
        size = f"/resize-{self.shape[0]}x{self.shape[1]}-{self.resample}" if self.resize else ""
        draft = "/jpeg-draft" if self.resize and self.draft else ""
        return f"{target}-8bit/v3/{'convert' if self.convert else 'reject'}{size}{draft}"

    @property
    def drafts(self) -> bool:
        """JPEGs are decoded for the target size (`draft` only means something with `resize`)."""
        return self.draft and self.resize


@dataclass
class Images:
    """What `decode_images` made of N encoded images."""

    images: np.ndarray  # uint8 [K, *array_shape]: the K that decoded, in order
    kept: np.ndarray  # bool [N]: which of the N those are
    reasons: dict[int, str]  # index -> why it was left out
    conversions: Counter = field(default_factory=Counter)  # "CMYK to RGB" -> images converted so
    notes: dict[int, str] = field(default_factory=dict)  # index -> "JPEG data named .png"


def sniff(data: bytes | memoryview) -> str | None:
    """The image format `data` starts like, as Pillow names it, or None."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), None)


def named_format(path: str) -> str | None:
    """The format a file's name says (by its extension, any case), or None."""
    dot = path.rfind(".")
    return NAMED.get(path[dot:].lower()) if dot > path.rfind("/") else None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) from a JPEG's first frame header (SOF), or None when none is found."""
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return struct.unpack(">HH", data[i + 5:i + 9])
        i += 2 + length
    return None


def declared_size(data: bytes, kind: str | None) -> tuple[int, int] | None:
    """(H, W) an image's header declares, read without decoding (PNG, JPEG), or None."""
    if kind == "PNG" and (header := png_header(data)) is not None:
        return header[1], header[0]
    if kind == "JPEG":
        return jpeg_size(bytes(data[:1 << 16]))
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) an image's header declares, no pixel decoded (PNG and JPEG from their headers,
    other formats from Pillow's lazy open, which reads only the header); None for bytes that
    are not a readable image (the decode judges those)."""
    kind = sniff(data)
    if (size := declared_size(data, kind)) is not None:
        return size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.height, image.width
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError):
        return None


def _check_size(path: str, size: tuple[int, int], decoding: Decoding) -> None:
    """Refuse, before decoding, an image of no pixels, of more than MAX_IMAGE_PIXELS, or
    (without resizing) of another size than expected."""
    h, w = size
    if h == 0 or w == 0:
        raise DecodeError(path, f"declares a {h}x{w} image (no pixels); not decoded")
    if not decoding.resize and (h, w) != tuple(decoding.shape):
        raise DecodeError(path, f"expected {decoding.shape[0]}x{decoding.shape[1]}, found {h}x{w}")
    if h * w > MAX_IMAGE_PIXELS:
        raise DecodeError(path, f"declares {h}x{w} pixels, over the {MAX_IMAGE_PIXELS:,} allowed; not decoded")


@contextlib.contextmanager
def _opened(data: bytes, path: str, kind: str | None) -> Iterator[Image.Image]:
    """The image Pillow opens from `data` (a format of FORMATS), closed after the block; any
    failure inside, Pillow's or ours, becomes one DecodeError naming `path` and why (`kind`,
    the format the bytes start like, names a broken one)."""
    try:
        with _FILTERS, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused, not warned
            image = Image.open(io.BytesIO(data))
        with image:
            if image.format not in FORMATS:
                raise DecodeError(path, f"not a supported image ({image.format} data)")
            yield image
    except UnidentifiedImageError:
        raise DecodeError(path, _broken(data, kind, "not identified") if kind else "not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(path, f"too large to decode ({e})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(path, _broken(data, kind, str(e))) from None


def decode_image(data: bytes, path: str, decoding: Decoding) -> tuple[np.ndarray, str | None]:
    """One image's bytes to its array (`Decoding.array_shape`) and its conversion ("CMYK to
    RGB"), or None when it needed none. DecodeError, naming `path` and why, for an image
    that cannot be used."""
    if not data:
        raise DecodeError(path, "empty file (0 bytes)")
    kind = sniff(data)
    if kind == "JPEG" and simplejpeg is not None and (done := _jpeg(data, path, decoding)) is not None:
        return done
    if (size := declared_size(data, kind)) is not None:
        _check_size(path, size, decoding)
    if kind == "PNG" and decoding.channels == 1 and not decoding.resize:
        header = png_header(data)
        if header is not None and header[2:] == (8, 0):  # 8-bit gray: the PNG path (libspng, else Pillow)
            return decode_png(data, path, decoding.shape, decoding.convert), None
    target = "L" if decoding.channels == 1 else "RGB"
    size = (decoding.shape[1], decoding.shape[0])  # (W, H), as Pillow says sizes
    with _opened(data, path, kind) as image:
        _check_size(path, (image.height, image.width), decoding)
        mode, conversion, box = image.mode, None, None
        if mode != target:
            if not decoding.convert:
                raise DecodeError(path, f"expected 8-bit grayscale, found {_MODE_NAMES.get(mode, mode)}")
            conversion = f"{_MODE_NAMES.get(mode, mode)} to {'8-bit grayscale' if target == 'L' else 'RGB'}"
        if decoding.drafts and image.format in ("JPEG", "MPO") and (drafted := image.draft(target, size)):
            box = drafted[1]  # the part of the scaled image the whole original maps to
        if image.mode != target:
            converted = image.convert(target)
        else:
            image.load()
            converted = image
        if decoding.resize and (converted.size != size or box is not None):
            converted = converted.resize(size, FILTERS[decoding.resample], box=box)
        pixels = np.asarray(converted)
    return (pixels if decoding.channels == 1 else pixels.transpose(2, 0, 1)), conversion


# libjpeg-turbo's output colorspace by (the JPEG's components, the channels wanted): where the
# JPEG already is what is wanted, its pixels are the ones Pillow's decode gives.
_SIMPLE = {("YCbCr", 3): "RGB", ("Gray", 1): "GRAY"}


def _jpeg(data: bytes, path: str, decoding: Decoding) -> tuple[np.ndarray, str | None] | None:
    """A JPEG through simplejpeg, in the run's layout, with its conversion (as `decode_image`),
    its declared size checked first (from the header libjpeg-turbo reads: no parse of our
    own); None where Pillow must do it (other components, a header or data libjpeg-turbo
    refuses or would have to recover from)."""
    try:
        height, width, components, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    _check_size(path, (height, width), decoding)
    if decoding.drafts:
        return _jpeg_draft(data, (height, width), components, decoding)
    colorspace = _SIMPLE.get((components, decoding.channels))
    if colorspace is None:
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace, fastdct=False, fastupsample=False, strict=True)
    except ValueError:
        return None
    if decoding.resize and (height, width) != tuple(decoding.shape):
        image = Image.fromarray(pixels[..., 0] if decoding.channels == 1 else pixels)
        pixels = np.asarray(image.resize((decoding.shape[1], decoding.shape[0]), FILTERS[decoding.resample]))
    elif decoding.channels == 1:
        return pixels[..., 0], None
    return (pixels if decoding.channels == 1 else pixels.transpose(2, 0, 1)), None


# The same for a draft: Pillow's draft("L") of a YCbCr JPEG has libjpeg-turbo decode its luma
# alone (no color conversion), which is what simplejpeg's GRAY gives.
_SIMPLE_DRAFT = {**_SIMPLE, ("YCbCr", 1): "GRAY"}


def draft_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's `draft` picks to decode an image of (H, W) `size`
    for (H, W) `target`: the largest that leaves the image at least the target's size."""
    fits = min(size[0] // target[0], size[1] // target[1])
    return next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)


def _jpeg_draft(data: bytes, size: tuple[int, int], components: str,
                decoding: Decoding) -> tuple[np.ndarray, str | None] | None:
    """`decode_image`'s draft of a JPEG through simplejpeg: libjpeg-turbo's scaled decode at
    Pillow's scale (checked by its output size), then Pillow's resize with the same box; None
    where Pillow must do it (or judge it: color refused by a gray data set)."""
    colorspace = _SIMPLE_DRAFT.get((components, decoding.channels))
    conversion = "RGB to 8-bit grayscale" if (components, decoding.channels) == ("YCbCr", 1) else None
    if colorspace is None or (conversion is not None and not decoding.convert):
        return None
    scale = draft_scale(size, decoding.shape)
    scaled = (-(-size[0] // scale), -(-size[1] // scale))  # libjpeg rounds up, as Pillow's draft does
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace, fastdct=False, fastupsample=False,
                                        min_height=scaled[0], min_width=scaled[1], min_factor=scale, strict=True)
    except ValueError:
        return None
    if pixels.shape[:2] != scaled:  # another scale than Pillow's: Pillow decides
        return None
    image = Image.fromarray(pixels[..., 0] if decoding.channels == 1 else pixels)
    box = (0, 0, size[1] / scale, size[0] / scale)
    if scaled != tuple(decoding.shape) or scale != 1:
        image = image.resize((decoding.shape[1], decoding.shape[0]), FILTERS[decoding.resample], box=box)
    pixels = np.asarray(image)
    return (pixels if decoding.channels == 1 else pixels.transpose(2, 0, 1)), conversion


def _broken(data: bytes, kind: str | None, detail: str) -> str:
    """An image that starts as a format but does not decode: cut short, or corrupt."""
    if kind == "PNG":
        return "truncated PNG" if b"IEND" not in data[-12:] or "truncated" in detail.lower() else \
            f"corrupt PNG ({detail})"
    if kind == "JPEG" and ("truncated" in detail.lower() or not bytes(data[-2:]) == b"\xff\xd9"):
        return "truncated JPEG"
    return f"corrupt {kind or 'image'} ({detail})"


def decode_images(data: Sequence[bytes] | Blobs, path: Callable[[int], str], decoding: Decoding,
                  names: Sequence[str] | None = None) -> Images:
    """`decode_image` of many images (every item there: no None), in order. `path(i)` names the
    i-th in errors; `names`, when the images have file names, lets a file whose bytes are
    another format than its extension says be noted.

    One channel at the expected size goes the PNG fast paths first (png.decode_pngs: plain PNGs
    in bulk, libspng), which hand every other image to `decode_image`."""
    conversions: Counter = Counter()
    counting = threading.Lock()

    def general(i: int) -> np.ndarray:
        pixels, conversion = decode_image(data[i], path(i), decoding)
        if conversion is not None:
            with counting:
                conversions[conversion] += 1
        return pixels

    if decoding.channels == 1 and not decoding.resize:
        images, kept, reasons = decode_pngs(data, path, decoding.shape, decoding.convert, general)
    else:
        images = np.empty((len(data), *decoding.array_shape), dtype=np.uint8)
        kept, reasons = np.zeros(len(data), dtype=bool), {}

        def decode_some(indices: Sequence[int]) -> None:
            for i in indices:
                try:
                    images[i] = general(i)
                    kept[i] = True
                except DecodeError as e:
                    reasons[i] = e.reason

        # Resized and color images cost milliseconds each in codecs that release the GIL: a
        # shard is spread over the node's idle cores (mnist37.threads).
        run_spread(decode_some, len(data), threads_for(len(data), THREAD_IMAGES))
        reasons = dict(sorted(reasons.items()))
        if reasons:
            images = images[kept]
    return Images(images, kept, reasons, conversions, _notes(data, names) if names is not None else {})


def _notes(data: Sequence[bytes] | Blobs, names: Sequence[str]) -> dict[int, str]:
    """index -> "JPEG data named .png" for each image whose bytes are another format than its
    name says. Names ending in .png whose bytes start as a PNG (all of MNIST) are passed over
    in bulk; the others are looked at one by one."""
    array = np.asarray(names, dtype=str) if len(names) else np.empty(0, dtype=str)
    lower = np.strings.lower(array)
    look = np.flatnonzero(~np.strings.endswith(lower, ".png"))
    blobs = data if isinstance(data, Blobs) else None
    if blobs is not None:
        starts, present = blobs.starts, blobs.present
        view = np.frombuffer(memoryview(blobs.buffer).cast("B"), dtype=np.uint8)
        first = np.where(present & (blobs.lengths > 0), view[np.minimum(starts, max(len(view) - 1, 0))], 0)
    else:
        first = np.fromiter((d[0] if d else 0 for d in data), dtype=np.uint8, count=len(data))
    look = np.union1d(look, np.flatnonzero(first != 0x89))  # 0x89: a PNG's first byte
    notes = {}
    for i in look.tolist():
        named, found = named_format(names[i]), sniff(data[i] or b"")
        if named and found and found != named and {named, found} != {"JPEG", "MPO"}:
            notes[i] = f"{found} data named {names[i][names[i].rfind('.'):]}"
    return notes


def probe(data: bytes, path: str) -> tuple[tuple[int, int], bool]:
    """((H, W), whether it is color) of an image that decodes: what the planner looks at in
    the first training images. DecodeError, naming why, for one that does not decode."""
    if not data:
        raise DecodeError(path, "empty file (0 bytes)")
    kind = sniff(data)
    header = png_header(data) if kind == "PNG" else None
    if header is not None and header[2:] == (8, 0):  # 8-bit gray PNG: the PNG path judges it
        return decode_png(data, path).shape, False
    with _opened(data, path, kind) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS or not image.width or not image.height:
            raise DecodeError(path, f"declares {image.height}x{image.width} pixels; not decoded")
        image.load()
        return (image.height, image.width), image.mode not in GRAY_MODES


@dataclass
class FirstImages:
    """What the planner learns from the first training images that decode."""

    shape: tuple[int, int]  # (H, W) of the first
    decoded: int  # how many were looked at and decoded
    colored: int  # how many of those are color

    @property
    def color(self) -> bool:
        """A color data set: most of the first images are color (a gray set with a stray RGB
        file stays gray, and its RGB files are judged by the non-grayscale policy; a color set
        with a few gray images is color)."""
        return 2 * self.colored > self.decoded


def first_images(items, wanted: int, unit: str = "files") -> FirstImages:
    """`probe` the (path, bytes) `items` in order until `wanted` decode (fewer when fewer
    do): the first's size and how many are color. An item whose bytes could not be read comes
    as the DecodeError that says why. DecodeError, naming the first failure, when none decodes."""
    shape, decoded, colored, first_error, seen = None, 0, 0, None, 0
    for path, data in items:
        seen += 1
        try:
            if isinstance(data, DecodeError):
                raise data
            size, is_color = probe(data, path)
        except DecodeError as e:
            first_error = first_error or e
            continue
        shape, decoded, colored = shape or size, decoded + 1, colored + is_color
        if decoded >= wanted:
            break
    if shape is not None:
        return FirstImages(shape, decoded, colored)
    if first_error is None:
        raise ValueError("first_images: no images given")
    raise DecodeError(first_error.path, f"{first_error.reason}; and none of the first {seen} "
                                        f"{unit} decodes, so the image shape is unknown (set image_shape)")
