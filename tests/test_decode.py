import numpy as np
import pytest
from PIL import Image

from mnist37.decode import DecodeError, decode_files, decode_png, image_shape
from tests.conftest import write_png


def pixels(shape=(8, 8), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_decodes_what_was_written(tmp_path):
    expected = [pixels(seed=i) for i in range(3)]
    for i, p in enumerate(expected):
        write_png(tmp_path / f"{i}.png", p)
    images, _ = decode_files(tmp_path, ["0.png", "1.png", "2.png"], (8, 8))
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8)
    np.testing.assert_array_equal(images, np.stack(expected))
    assert image_shape(tmp_path, "1.png") == (8, 8)


def test_digest_follows_content_not_just_names(tmp_path):
    write_png(tmp_path / "a.png", pixels(seed=1))
    _, first = decode_files(tmp_path, ["a.png"], (8, 8))
    _, again = decode_files(tmp_path, ["a.png"], (8, 8))
    write_png(tmp_path / "a.png", pixels(seed=2))
    _, changed = decode_files(tmp_path, ["a.png"], (8, 8))
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


def test_digests_combine_the_same_however_files_are_split(tmp_path):
    from mnist37.decode import combine_digests

    for i in range(5):
        write_png(tmp_path / f"{i}.png", pixels(seed=i))
    names = [f"{i}.png" for i in range(5)]
    _, whole = decode_files(tmp_path, names, (8, 8))
    parts = [decode_files(tmp_path, names[a:b], (8, 8))[1] for a, b in [(3, 5), (0, 1), (1, 3)]]
    assert f"{combine_digests(*parts):032x}" == whole
