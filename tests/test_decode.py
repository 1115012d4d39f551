import numpy as np
import pytest
from PIL import Image

import os

from mnist37 import decode
from mnist37.decode import DecodeError, decode_files, decode_pillow, decode_png, files_key, groups_of, image_shape
from tests.conftest import write_png


def pixels(shape=(8, 8), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_decodes_what_was_written(tmp_path):
    expected = [pixels(seed=i) for i in range(3)]
    for i, p in enumerate(expected):
        write_png(tmp_path / f"{i}.png", p)
    (tmp_path / "d").mkdir()
    for i, p in enumerate(expected):
        write_png(tmp_path / "d" / f"{i}.png", p)
    decoded = decode_files(tmp_path, ["0.png", "1.png", "d/2.png", "d/0.png"], (8, 8))
    assert decoded.images.dtype == np.uint8 and decoded.images.shape == (4, 8, 8)
    np.testing.assert_array_equal(decoded.images, np.stack(expected + [expected[0]]))
    assert decoded.paths == ["0.png", "1.png", "d/2.png", "d/0.png"]
    assert image_shape(tmp_path, "1.png") == (8, 8) == image_shape(tmp_path, "d/1.png")


def test_digest_follows_content_not_just_names(tmp_path):
    write_png(tmp_path / "a.png", pixels(seed=1))
    first = decode_files(tmp_path, ["a.png"], (8, 8)).digest
    again = decode_files(tmp_path, ["a.png"], (8, 8)).digest
    write_png(tmp_path / "a.png", pixels(seed=2))
    changed = decode_files(tmp_path, ["a.png"], (8, 8)).digest
    assert first == again != changed


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16"])
def test_non_grayscale_png_is_named(tmp_path, mode):
    write_png(tmp_path / "c.png", pixels(), mode=mode)
    with pytest.raises(DecodeError, match=rf"c.png: expected an 8-bit grayscale PNG, found mode {mode}"):
        decode_files(tmp_path, ["c.png"], (8, 8))


def test_other_size_is_named(tmp_path):
    write_png(tmp_path / "big.png", pixels((9, 7)))
    with pytest.raises(DecodeError, match=r"big.png: expected 8x8, found 9x7"):
        decode_files(tmp_path, ["big.png"], (8, 8))


def test_jpeg_named_png(tmp_path):
    Image.fromarray(pixels()).save(tmp_path / "j.png", format="JPEG")
    with pytest.raises(DecodeError, match=r"j.png: expected a PNG, found JPEG"):
        decode_png((tmp_path / "j.png").read_bytes(), "j.png")


def test_unreadable_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DecodeError, match=r"empty.png: not an image"):
        decode_files(tmp_path, ["empty.png"], (8, 8))
    whole = write_png(tmp_path / "t.png", pixels((28, 28))).read_bytes()
    (tmp_path / "t.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DecodeError, match=r"t.png: unreadable PNG"):
        decode_files(tmp_path, ["t.png"], (28, 28))
    with pytest.raises(DecodeError, match=r"gone.png: cannot read file \(No such file or directory\)"):
        decode_files(tmp_path, ["gone.png"], (8, 8))
    with pytest.raises(DecodeError, match=r"nope/: cannot open folder \(No such file or directory\)"):
        decode_files(tmp_path, ["nope/a.png"], (8, 8))


def test_digests_combine_the_same_however_files_are_split(tmp_path):
    from mnist37.decode import combine_digests

    for i in range(5):
        write_png(tmp_path / f"{i}.png", pixels(seed=i))
    names = [f"{i}.png" for i in range(5)]
    whole = decode_files(tmp_path, names, (8, 8)).digest
    parts = [decode_files(tmp_path, names[a:b], (8, 8)).digest for a, b in [(3, 5), (0, 1), (1, 3)]]
    assert f"{combine_digests(*parts):032x}" == whole


def test_files_key_follows_names_sizes_and_mtimes(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", pixels(seed=i))
    paths = ["0.png", "1.png", "2.png"]
    decoded = decode_files(tmp_path, paths, (8, 8))
    assert files_key(tmp_path, groups_of(paths)) == decoded.files_key  # stat agrees with fstat
    assert files_key(tmp_path, groups_of(paths[:2])) != decoded.files_key
    stat = (tmp_path / "1.png").stat()
    os.utime(tmp_path / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert files_key(tmp_path, groups_of(paths)) != decoded.files_key
    with pytest.raises(FileNotFoundError):
        files_key(tmp_path, groups_of(["0.png", "gone.png"]))


def test_the_fast_decoder_is_installed_and_falls_back_to_pillow(tmp_path, monkeypatch):
    assert decode.pyspng is not None, "pyspng is a dependency: the fast path must be there"
    gray = write_png(tmp_path / "g.png", pixels()).read_bytes()
    np.testing.assert_array_equal(decode_png(gray, "g.png"), decode_pillow(gray, "g.png"))
    monkeypatch.setattr(decode, "pyspng", None)  # the Pillow-only install
    np.testing.assert_array_equal(decode_png(gray, "g.png"), pixels())


def test_fast_decoder_agrees_with_pillow_on_every_mnist_sample_image(mnist_sample_tgz, cache_dir):
    from mnist37.folder import find_root

    root = find_root(mnist_sample_tgz, "train", cache_dir)
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == 14434
    for path in files:
        data = path.read_bytes()
        assert decode.png_header(data)[2:] == (8, 0)  # every one takes the fast path
        np.testing.assert_array_equal(decode_png(data, path.name), decode_pillow(data, path.name))
