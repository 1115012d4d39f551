import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist37 import png as decode
from mnist37.png import DecodeError, decode_pillow, decode_png
from mnist37.images import Decoding
from mnist37.sources.folder import first_images, groups_key
from mnist37.sources.keys import combine_digests
from tests.conftest import PROJECT_ROOT, decode_files, groups_of, write_png


def pixels(shape=(8, 8), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_bytes(array, mode=None, fmt="PNG"):
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def huge_png(width, height):
    """A valid PNG signature and IHDR that declare width x height, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return decode.PNG_SIGNATURE + chunk + b"\0" * 16


def test_decodes_what_was_written(tmp_path):
    expected = [pixels(seed=i) for i in range(3)]
    for i, p in enumerate(expected):
        write_png(tmp_path / f"{i}.png", p)
        write_png(tmp_path / "d" / f"{i}.png", p)
    decoded = decode_files(tmp_path, ["0.png", "1.png", "d/2.png", "d/0.png"], (8, 8))
    assert decoded.images.dtype == np.uint8 and decoded.images.shape == (4, 8, 8)
    np.testing.assert_array_equal(decoded.images, np.stack(expected + [expected[0]]))
    assert decoded.paths == ["0.png", "1.png", "d/2.png", "d/0.png"]
    assert decoded.kept.all() and decoded.rejected == []
    assert first_images(tmp_path, ["1.png"]).shape == (8, 8) == first_images(tmp_path, ["d/1.png"]).shape


def test_digest_follows_content_not_just_names(tmp_path):
    write_png(tmp_path / "a.png", pixels(seed=1))
    first = decode_files(tmp_path, ["a.png"], (8, 8)).digest
    again = decode_files(tmp_path, ["a.png"], (8, 8)).digest
    write_png(tmp_path / "a.png", pixels(seed=2))
    changed = decode_files(tmp_path, ["a.png"], (8, 8)).digest
    assert first == again != changed


def test_digests_combine_the_same_however_files_are_split(tmp_path):
    for i in range(5):
        write_png(tmp_path / f"{i}.png", pixels(seed=i))
    names = [f"{i}.png" for i in range(5)]
    whole = decode_files(tmp_path, names, (8, 8)).digest
    parts = [decode_files(tmp_path, names[a:b], (8, 8)).digest for a, b in [(3, 5), (0, 1), (1, 3)]]
    assert f"{combine_digests(*parts):032x}" == whole


@pytest.mark.parametrize("mode, found", [("RGB", "RGB"), ("RGBA", "RGBA"), ("P", "palette"),
                                         ("I;16", "16-bit grayscale"), ("LA", "grayscale with alpha"),
                                         ("1", "1-bit")])
def test_non_grayscale_is_rejected_by_name_or_converted_like_pillow(mode, found):
    data = png_bytes(pixels(), mode)
    with pytest.raises(DecodeError, match=rf"^c.png: expected 8-bit grayscale, found {found}$"):
        decode_png(data, "c.png")
    converted = decode_png(data, "c.png", convert=True)
    np.testing.assert_array_equal(converted, np.asarray(Image.open(io.BytesIO(data)).convert("L")))
    assert converted.dtype == np.uint8 and converted.shape == (8, 8)


@pytest.mark.parametrize("data, reason", [
    (b"", r"empty file \(0 bytes\)"),
    (os.urandom(300), "not an image"),
    (png_bytes(pixels(), fmt="JPEG"), r"not a PNG \(JPEG data\)"),
    (png_bytes(pixels(), mode="P", fmt="GIF"), r"not a PNG \(GIF data\)"),
    (png_bytes(pixels())[:-30], "truncated PNG"),
    (png_bytes(pixels((9, 7))), "expected 8x8, found 9x7"),
    (huge_png(100_000, 100_000), "expected 8x8, found 100000x100000"),
])
def test_bad_bytes_get_a_reason(data, reason):
    with pytest.raises(DecodeError, match=rf"^x/y.png: {reason}$"):
        decode_png(data, "x/y.png", shape=(8, 8))


def test_a_decompression_bomb_is_refused_from_its_header_alone():
    with pytest.raises(DecodeError, match=r"declares 100000x100000 pixels, over the 16,777,216 allowed; not decoded"):
        decode_png(huge_png(100_000, 100_000), "bomb.png")  # no expected shape: the size cap applies


def test_bad_files_are_collected_not_raised(tmp_path):
    write_png(tmp_path / "a.png", pixels(seed=1))
    (tmp_path / "b.png").write_bytes(b"")
    write_png(tmp_path / "c.png", pixels(seed=3))
    (tmp_path / "d.png").mkdir()
    os.symlink("loop.png", tmp_path / "loop.png")
    decoded = decode_files(tmp_path, ["a.png", "b.png", "c.png", "d.png", "gone.png", "loop.png"], (8, 8))
    assert decoded.paths == ["a.png", "c.png"] and decoded.kept.tolist() == [True, False, True, False, False, False]
    np.testing.assert_array_equal(decoded.images[1], pixels(seed=3))
    assert decoded.rejected == [("b.png", "empty file (0 bytes)"),
                                ("d.png", "cannot read file (Is a directory)"),
                                ("gone.png", "file disappeared after listing"),
                                ("loop.png", "cannot read file (Too many levels of symbolic links)")]


def test_a_fifo_named_png_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "f.png")
    assert decode_files(tmp_path, ["f.png"], (8, 8)).rejected == [("f.png", "cannot read file (not a regular file)")]


def test_an_unreadable_file_names_the_permission(tmp_path):
    """chmod 000 stops everyone but root; as root (CI), the read runs after dropping to nobody."""
    folder = tmp_path / "open"
    write_png(folder / "secret.png", pixels())
    os.chmod(folder / "secret.png", 0)
    if os.geteuid() == 0:  # the folder must be reachable for nobody: a world-readable one in /tmp
        folder = Path(tempfile.mkdtemp(prefix="mnist37-perm-"))
        (folder / "secret.png").write_bytes((tmp_path / "open" / "secret.png").read_bytes())
        os.chmod(folder, 0o755)
        os.chmod(folder / "secret.png", 0)
    drop = "import os; os.setgid(65534); os.setuid(65534); " if os.geteuid() == 0 else ""
    code = (f"from tests.conftest import decode_files; import mnist37.sources.folder; {drop}"
            f"print(decode_files({str(folder)!r}, ['secret.png'], (8, 8)).rejected)")
    try:
        run = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    finally:
        if folder != tmp_path / "open":
            shutil.rmtree(folder)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[('secret.png', 'cannot read file (Permission denied)')]"


def test_the_image_shape_is_the_first_file_that_decodes(tmp_path):
    (tmp_path / "0.png").write_bytes(b"junk")
    write_png(tmp_path / "1.png", pixels((5, 6)))
    assert first_images(tmp_path, ["0.png", "1.png"]).shape == (5, 6)
    with pytest.raises(DecodeError, match=r"0.png: not an image; and none of the first 1 files decodes"):
        first_images(tmp_path, ["0.png"])
    with pytest.raises(DecodeError, match=r"nope/: cannot open folder \(No such file or directory\)"):
        first_images(tmp_path, ["nope/a.png"])


def test_decode_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(DecodeError("a/b.png", "truncated PNG")))
    assert (error.path, error.reason, str(error)) == ("a/b.png", "truncated PNG", "a/b.png: truncated PNG")


REJECT, CONVERT = Decoding((8, 8)).settings, Decoding((8, 8), convert=True).settings


def test_files_key_follows_names_sizes_mtimes_and_settings(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", pixels(seed=i))
    paths = ["0.png", "1.png", "2.png"]
    decoded = decode_files(tmp_path, paths, (8, 8))
    assert groups_key(tmp_path, groups_of(paths), REJECT) == decoded.files_key  # stat agrees with fstat
    assert groups_key(tmp_path, groups_of(paths), CONVERT) != decoded.files_key
    assert groups_key(tmp_path, groups_of(paths[:2]), REJECT) != decoded.files_key
    stat = (tmp_path / "1.png").stat()
    os.utime(tmp_path / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert groups_key(tmp_path, groups_of(paths), REJECT) != decoded.files_key
    with pytest.raises(FileNotFoundError):
        groups_key(tmp_path, groups_of(["0.png", "gone.png"]), REJECT)


def test_the_fast_decoder_is_installed_and_falls_back_to_pillow(monkeypatch):
    assert decode.pyspng is not None, "pyspng is a dependency: the fast path must be there"
    gray = png_bytes(pixels())
    np.testing.assert_array_equal(decode_png(gray, "g.png"), decode_pillow(gray, "g.png"))
    monkeypatch.setattr(decode, "pyspng", None)  # the Pillow-only install
    np.testing.assert_array_equal(decode_png(gray, "g.png"), pixels())


def test_fast_decoder_agrees_with_pillow_on_every_mnist_sample_image(mnist_sample_tgz, cache_dir):
    from mnist37.locate import find_root

    root = find_root(mnist_sample_tgz, "train", cache_dir)
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == 14434
    data = [path.read_bytes() for path in files]
    by_pillow = []
    for path, png in zip(files, data):
        assert decode.png_header(png)[2:] == (8, 0)  # every one takes the fast path
        by_pillow.append(decode_pillow(png, path.name))
        np.testing.assert_array_equal(decode_png(png, path.name), by_pillow[-1])
    # Read as shards are, they all take the bulk path, with the same pixels.
    plain, images = decode.plain_pngs(data, (28, 28))
    assert plain.tolist() == list(range(len(files)))
    np.testing.assert_array_equal(images, np.stack(by_pillow))


def _filtered(rows: np.ndarray, filters: list[int]) -> bytes:
    """The PNG scanlines of 8-bit grayscale `rows`, row r filtered with type filters[r]
    (0 none, 1 sub, 2 up, 3 average, 4 Paeth), written from the PNG specification."""
    h, w = rows.shape
    out, prior = bytearray(), np.zeros(w, dtype=np.int64)
    for r in range(h):
        x = rows[r].astype(np.int64)
        a = np.concatenate([[0], x[:-1]])  # the pixel to the left
        c = np.concatenate([[0], prior[:-1]])  # the one above it
        p = a + prior - c
        pa, pb, pc = abs(p - a), abs(p - prior), abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, prior, c))
        predicted = [np.zeros(w, dtype=np.int64), a, prior, (a + prior) // 2, paeth][filters[r]]
        out += bytes([filters[r]]) + ((x - predicted) % 256).astype(np.uint8).tobytes()
        prior = x
    return bytes(out)


def _chunk(kind: bytes, data: bytes, crc_delta: int = 0) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", (zlib.crc32(kind + data) + crc_delta) % 2**32)


def built_png(rows: np.ndarray, filters: list[int] | None = None, idats: int = 1, before_idat: bytes = b"",
              idat_crc_delta: int = 0, stream: bytes | None = None, after: bytes = b"") -> bytes:
    """An 8-bit grayscale PNG of `rows`, byte by byte: its filters, its IDAT cut in `idats`
    chunks, a chunk before them, a wrong IDAT CRC, another zlib stream, bytes after IEND."""
    h, w = rows.shape
    stream = zlib.compress(_filtered(rows, filters or [0] * h)) if stream is None else stream
    cuts = np.linspace(0, len(stream), idats + 1).astype(int)
    body = b"".join(_chunk(b"IDAT", stream[a:b], idat_crc_delta) for a, b in zip(cuts[:-1], cuts[1:]))
    return (decode.PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + before_idat
            + body + _chunk(b"IEND", b"") + after)


def test_plain_pngs_are_decoded_in_bulk_and_every_other_png_as_before():
    """Only plain PNGs (IHDR, one IDAT, IEND, right CRCs, every row unfiltered) take the bulk
    path; decode_pngs gives every PNG, plain or not, the pixels or the reason it had before."""
    rows = pixels((6, 7), seed=5)
    other = pixels((6, 7), seed=6)
    cases = {
        "plain": built_png(rows),
        "plain, another image": built_png(other),
        "sub filter on one row": built_png(rows, [0, 1, 0, 0, 0, 0]),
        "up, average, Paeth": built_png(rows, [0, 2, 3, 4, 2, 3]),
        "two IDAT chunks": built_png(rows, idats=2),
        "a text chunk first": built_png(rows, before_idat=_chunk(b"tEXt", b"Comment\0hi")),
        "bytes after IEND": built_png(rows, after=b"\0" * 3),
        "written by Pillow": png_bytes(rows),
        "wrong IDAT CRC": built_png(rows, idat_crc_delta=1),
        "not a zlib stream": built_png(rows, stream=b"\x78\x9c" + b"\xff" * 20),
        "too few pixels": built_png(rows, stream=zlib.compress(_filtered(rows, [0] * 6)[:-1])),
        "cut short": built_png(rows)[:-20],
        "another size": built_png(pixels((7, 7))),
    }
    names, data = list(cases), list(cases.values())
    plain, bulk = decode.plain_pngs(data, (6, 7))
    assert [names[i] for i in plain] == ["plain", "plain, another image"]
    np.testing.assert_array_equal(bulk, np.stack([rows, other]))
    # The same PNGs as views of one buffer, scattered among other bytes (as in a mapped tar):
    # the same ones decode, to the same pixels.
    scattered, starts = bytearray(b"\xff" * 100), []
    for png in data:
        starts.append(len(scattered))
        scattered += png + b"\x89PNG" * 30
    blobs = decode.Blobs(bytes(scattered), np.array(starts), np.array([len(d) for d in data]))
    plain_views, bulk_views = decode.plain_pngs(blobs, (6, 7))
    assert plain_views.tolist() == plain.tolist()
    np.testing.assert_array_equal(bulk_views, bulk)
    # Every PNG gets what decode_png, the one-at-a-time judge (libspng, then Pillow), gives it.
    images, kept, reasons = decode.decode_pngs(data, names.__getitem__, (6, 7))
    expected, refused = [], {}
    for name, png in cases.items():
        try:
            expected.append(decode_png(png, name, (6, 7)))
        except DecodeError as e:
            refused[name] = e.reason
    np.testing.assert_array_equal(images, np.stack(expected))
    assert {names[i]: r for i, r in reasons.items()} == refused
    assert set(refused) >= {"not a zlib stream", "too few pixels", "another size"}
    assert kept.tolist() == [n not in refused for n in names]
    from_views = decode.decode_pngs(blobs, names.__getitem__, (6, 7))
    np.testing.assert_array_equal(from_views[0], images)
    assert from_views[1].tolist() == kept.tolist() and from_views[2] == reasons


def test_blobs_are_the_items_they_were_made_from():
    """Blobs: items and missing items (None) as views of one buffer; taking (a negative index
    gives a missing item), dropping, and joining give what the same list operations give."""
    items = [b"ab", None, b"", b"cde", None, b"f"]
    blobs = decode.Blobs.of(items)
    assert len(blobs) == 6 and list(blobs) == items and blobs[3] == b"cde" and blobs[1] is None
    assert blobs.present.tolist() == [i is not None for i in items]
    assert bytes(blobs.joined()) == b"abcdef"
    index = np.array([5, -1, 0, 3, 3])
    assert list(blobs.take(index)) == [b"f", None, b"ab", b"cde", b"cde"]
    assert blobs.take(np.arange(6)) is blobs
    assert list(blobs.without([0, 5])) == [None, None, b"", b"cde", None, None]
    assert list(blobs) == items  # unchanged
    # Items out of order in their buffer, or with bytes between them, are joined in item order.
    scattered = decode.Blobs(b"xxCDEyyAB", np.array([7, 2]), np.array([2, 3]))
    assert bytes(scattered.joined()) == b"ABCDE"
    assert bytes(decode.Blobs.of([]).joined()) == b"" and list(decode.Blobs.of([None]).take(np.array([-1]))) == [None]


def test_folder_decode_reports_unreadable_and_undecodable_files_in_file_order(tmp_path):
    write_png(tmp_path / "a.png", pixels(seed=1))
    (tmp_path / "b.png").write_bytes(b"junk")
    (tmp_path / "c.png").mkdir()
    (tmp_path / "d.png").write_bytes(built_png(pixels(), stream=b"\x78\x9c" + b"\xff" * 20))
    write_png(tmp_path / "e.png", pixels(seed=2))
    decoded = decode_files(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png"], (8, 8))
    assert [path for path, _ in decoded.rejected] == ["b.png", "c.png", "d.png"]
    assert decoded.rejected[1] == ("c.png", "cannot read file (Is a directory)")
    assert decoded.paths == ["a.png", "e.png"] and decoded.kept.tolist() == [True, False, False, False, True]
    np.testing.assert_array_equal(decoded.images, np.stack([pixels(seed=1), pixels(seed=2)]))
