"""Any image classification data set: JPEG and color images, other sizes, resizing, class names.

A color corpus is built here with Pillow (RGB JPEGs baseline and progressive, gray and CMYK
JPEGs, palette and RGBA PNGs, WebP, BMP, GIF, TIFF, one image of another size, one JPEG named
.png), and every figure the job reports is checked against a computation in this file with
NumPy and Pillow alone: each file opened, `convert("RGB")`, (resized,) summed per class,
divided once; each evaluation image given to the prototype of least mean absolute difference.
The same corpus as Parquet (written by `datasets` with its Image feature) and as WebDataset
shards (written by `webdataset`) gives the same figures.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mnist37
from mnist37.config import ConfigError, load
from mnist37.images import Decoding, decode_image, decode_images, draft_scale, jpeg_size, sniff
from mnist37.png import DecodeError
from tests.test_evaluate_job import run_job
from tests.test_formats import evaluate

SHAPE = (10, 12)  # (H, W): not square, so a swapped size would show
CLASSES = ["cat", "dog", "owl"]
COUNTS = {"train": 9, "valid": 4}  # images of each class in each split, besides the odd ones below


def pattern(c: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: a color per class, a band per class, noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros((*SHAPE, 3), dtype=np.float64)
    base[..., c] = 150
    base[:, 2 + 3 * c:4 + 3 * c, :] = 230
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str, mode: str | None = None, **options) -> bytes:
    image = Image.fromarray(pixels)
    if mode == "P":
        image = image.quantize(16)
    elif mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


# The odd files of each train class folder: (name, format, mode, options). Names sort after
# the plain ones ("a-..." < "z-...").
ODD = [
    ("z1-progressive.jpg", "JPEG", None, {"progressive": True, "quality": 90}),
    ("z2-gray.jpeg", "JPEG", "L", {"quality": 90}),
    ("z3-cmyk.jpg", "JPEG", "CMYK", {"quality": 95}),
    ("z4-palette.png", "PNG", "P", {}),
    ("z5-alpha.png", "PNG", "RGBA", {}),
    ("z6-lossless.webp", "WEBP", None, {"lossless": True}),
    ("z7-plain.bmp", "BMP", None, {}),
    ("z8-first-frame.gif", "GIF", "P", {}),
    ("z9-scan.tiff", "TIFF", None, {}),
]


def build_corpus(root: Path) -> Path:
    """An ImageFolder of the three classes (see the module doc); every file written once."""
    seed = 0
    for split, n in COUNTS.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                seed += 1
                (folder / f"a{i:02d}.jpg").write_bytes(encoded(pattern(c, seed), "JPEG", quality=90))
            if split != "train":
                continue
            for file, fmt, mode, options in ODD:
                seed += 1
                (folder / file).write_bytes(encoded(pattern(c, seed), fmt, mode, **options))
    big = np.kron(pattern(0, 999), np.ones((2, 2, 1), dtype=np.uint8))[:14, :16]
    (root / "train" / "cat" / "b-other-size.jpg").write_bytes(encoded(big, "JPEG", quality=90))
    (root / "train" / "dog" / "b-jpeg-named.png").write_bytes(encoded(pattern(1, 1234), "JPEG", quality=90))
    (root / "labels.csv").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("color") / "set")


def files(root: Path, split: str) -> list[tuple[str, int]]:
    """(path relative to root, class index) of every image, in the job's listing order."""
    return [(f"{split}/{name}/{f}", c) for c, name in enumerate(CLASSES)
            for f in sorted(os.listdir(root / split / name), key=os.fsencode)]


def reference(root: Path, size: tuple[int, int] | None = None, resample=Image.Resampling.BILINEAR,
              mode: str = "RGB") -> dict:
    """Everything the job should report, from Pillow and NumPy alone."""
    def load(path: str) -> np.ndarray | None:
        with Image.open(root / path) as image:
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size[1], size[0]), resample)
            elif image.size != (SHAPE[1], SHAPE[0]):
                return None  # another size: rejected
            pixels = np.asarray(image)
        return pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels

    out = {}
    for split in COUNTS:
        loaded = [(path, c, load(path)) for path, c in files(root, split)]
        out[split] = {"images": np.stack([p for _, _, p in loaded if p is not None]),
                      "labels": np.array([c for _, c, p in loaded if p is not None]),
                      "rejected": [path for path, _, p in loaded if p is None]}
    train = out["train"]
    sums = np.stack([train["images"][train["labels"] == c].astype(np.int64).sum(axis=0) for c in range(3)])
    counts = np.bincount(train["labels"], minlength=3)
    prototypes = (sums / counts.reshape(-1, *[1] * (sums.ndim - 1)) / 255.0).astype(np.float32)
    valid = out["valid"]
    x = valid["images"].reshape(len(valid["images"]), -1).astype(np.float64) / 255
    distances = np.abs(x[:, None, :] - prototypes.reshape(3, -1)[None].astype(np.float64)).mean(axis=2)
    predicted = distances.argmin(axis=1)
    per_class = {name: float((predicted[valid["labels"] == c] == c).mean()) for c, name in enumerate(CLASSES)}
    return {"prototypes": prototypes, "per_class": per_class, "counts": counts.tolist(),
            "rejected": out["train"]["rejected"] + out["valid"]["rejected"], "shape": list(prototypes.shape[1:])}  # one image


def run(tmp_path, data, name, **overrides):
    cfg = load(data=str(data), out=str(tmp_path / f"out-{name}"), chunk_dir=str(tmp_path / f"chunks-{name}"),
               classes="all", on_bad_file="skip", **overrides)
    return evaluate(cfg)


# ------------------------------------------------------------------------- the codec alone


def test_every_file_decodes_to_the_pixels_pillow_gives(corpus):
    """decode_image of each corpus file, one channel and three, equals Pillow's convert."""
    for split in COUNTS:
        for path, _ in files(corpus, split):
            data = (corpus / path).read_bytes()
            for channels, mode in ((3, "RGB"), (1, "L")):
                decoding = Decoding(SHAPE, convert=True, channels=channels, resize=True)
                with Image.open(io.BytesIO(data)) as image:
                    expected = np.asarray(image.convert(mode).resize((SHAPE[1], SHAPE[0]),
                                                                     Image.Resampling.BILINEAR))
                pixels, _ = decode_image(data, path, decoding)
                np.testing.assert_array_equal(pixels, expected.transpose(2, 0, 1) if channels == 3 else expected,
                                              err_msg=path)


@pytest.mark.parametrize("resample", ["bilinear", "nearest", "bicubic", "lanczos", "box"])
def test_resizing_equals_pillows_resize_with_each_filter(corpus, resample):
    data = (corpus / "train" / "cat" / "b-other-size.jpg").read_bytes()
    pixels, conversion = decode_image(data, "x.jpg", Decoding((7, 9), channels=3, resize=True, resample=resample))
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(image.resize((9, 7), getattr(Image.Resampling, resample.upper())))
    np.testing.assert_array_equal(pixels, expected.transpose(2, 0, 1))
    assert conversion is None  # already RGB


def test_conversions_are_counted_per_kind_and_misnamed_files_noted(corpus):
    names = [path for path, _ in files(corpus, "train") if path.startswith("train/dog/")]
    data = [(corpus / n).read_bytes() for n in names]
    done = decode_images(data, names.__getitem__, Decoding(SHAPE, convert=True, channels=3), names)
    assert done.reasons == {}
    assert dict(done.conversions) == {"8-bit grayscale to RGB": 1, "CMYK to RGB": 1, "palette to RGB": 2,
                                      "RGBA to RGB": 1}
    assert done.notes == {names.index("train/dog/b-jpeg-named.png"): "JPEG data named .png"}


def jpeg_with_size(height: int, width: int) -> bytes:
    """A real small JPEG whose frame header (SOF) is made to declare height x width."""
    data = bytearray(encoded(pattern(0, 5), "JPEG", quality=90))
    i = 2
    while not (data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xC2):
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_huffman() -> bytes:
    """A JPEG whose first Huffman table (DHT) has its code counts scrambled."""
    data = bytearray(encoded(pattern(1, 6), "JPEG", quality=90))
    i = data.index(b"\xff\xc4")
    data[i + 5:i + 21] = bytes([255] * 16)
    return bytes(data)


def cmyk_with_a_broken_icc_profile() -> bytes:
    return encoded(pattern(2, 7), "JPEG", "CMYK", quality=95, icc_profile=b"\x00\x01not an ICC profile" * 8)


@pytest.mark.parametrize("data, reason", [
    (encoded(pattern(0, 1), "JPEG", quality=90)[:150], "truncated JPEG"),
    (jpeg_with_size(60000, 60000), "declares 60000x60000 pixels, over the 16,777,216 allowed; not decoded"),
    (jpeg_with_size(0, 12), r"declares a 0x12 image \(no pixels\); not decoded"),
    (corrupt_huffman(), r"corrupt JPEG \(.+\)"),
    (b"", r"empty file \(0 bytes\)"),
    (b"\xff\xd8\xff\xe0" + bytes(60), "truncated JPEG"),
])
def test_bad_images_are_one_reason_each(data, reason):
    with pytest.raises(DecodeError, match=rf"^bad/x.jpg: {reason}$"):
        decode_image(data, "bad/x.jpg", Decoding(SHAPE, convert=True, channels=3, resize=True))


def test_a_cmyk_jpeg_with_a_broken_icc_profile_is_converted_and_counted():
    data = cmyk_with_a_broken_icc_profile()
    pixels, conversion = decode_image(data, "x.jpg", Decoding(SHAPE, convert=True, channels=3))
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "CMYK" and image.info.get("icc_profile")
        np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGB")).transpose(2, 0, 1))
    assert conversion == "CMYK to RGB"


def test_a_large_declared_size_is_refused_before_decoding_even_when_resizing():
    with pytest.raises(DecodeError, match="declares 60000x60000 pixels"):
        decode_image(jpeg_with_size(60000, 60000), "x.jpg", Decoding((8, 8), convert=True, channels=3, resize=True))
    assert jpeg_size(jpeg_with_size(321, 123)) == (321, 123)
    assert sniff(jpeg_with_size(1, 1)) == "JPEG"


def test_the_new_keys_are_checked_by_name(tmp_path):
    assert load(image_size="24x32").image_size == [24, 32] == load(image_size="24 32").image_size
    with pytest.raises(ConfigError, match=r"^image_size: give image_size .* or image_shape .*not both$"):
        load(image_size="8x8", image_shape="8 8")
    with pytest.raises(ConfigError, match=r"^channels: unknown channels 'cmyk'; expected one of auto, gray, rgb$"):
        load(channels="cmyk")
    with pytest.raises(ConfigError, match=r"^resize_filter: unknown filter 'sinc'"):
        load(resize_filter="sinc")
    (tmp_path / "names.txt").write_text("cat\n\ndog food\nowl\n")
    assert load(class_names=f"@{tmp_path / 'names.txt'}").class_names == ["cat", "dog food", "owl"]
    assert load(class_names="cat, dog food,owl").class_names == ["cat", "dog food", "owl"]
    with pytest.raises(ConfigError, match=r"^class_names: cannot read @/no/such/file"):
        load(class_names="@/no/such/file")


# ------------------------------------------------------------------------- the job


def check_against_reference(results, prototypes, expected):
    assert results["channels"] == 3 and results["image_shape"] == expected["shape"]
    np.testing.assert_array_equal(prototypes, expected["prototypes"])
    assert [results["counts"]["train"][name] for name in CLASSES] == expected["counts"]
    assert results["metrics"]["l1"]["per_class"] == expected["per_class"]


def test_a_color_folder_matches_pillow_and_numpy(ray_local, corpus, tmp_path):
    results, prototypes, _ = run(tmp_path, corpus, "folder")
    expected = reference(corpus)
    check_against_reference(results, prototypes, expected)
    assert results["classes"] == CLASSES and results["resized_to"] is None
    assert [r["path"] for r in results["rejected"]] == expected["rejected"] == ["train/cat/b-other-size.jpg"]
    assert results["rejected"][0]["reason"] == "expected 10x12, found 14x16"
    assert results["conversions"] == {"train": {"8-bit grayscale to RGB": 3, "CMYK to RGB": 3, "palette to RGB": 6,
                                                "RGBA to RGB": 3}, "valid": {}}
    assert results["formats_by_content"] == [{"path": "train/dog/b-jpeg-named.png", "found": "JPEG data named .png"}]
    assert results["files"]["train"]["cat"] == {"found": 19, "used": 18, "rejected": 1, "ignored": 0}


def test_resizing_and_gray_in_the_job(ray_local, corpus, tmp_path):
    results, prototypes, _ = run(tmp_path, corpus, "resized", image_size="6x7", resize_filter="bicubic")
    expected = reference(corpus, (6, 7), Image.Resampling.BICUBIC)
    check_against_reference(results, prototypes, expected)
    assert results["rejected"] == [] and results["resized_to"] == [6, 7]
    results, prototypes, _ = run(tmp_path, corpus, "gray", channels="gray", image_size="10x12")
    expected = reference(corpus, SHAPE, mode="L")
    assert results["channels"] == 1 and results["image_shape"] == [10, 12]
    np.testing.assert_array_equal(prototypes, expected["prototypes"])
    assert results["metrics"]["l1"]["per_class"] == expected["per_class"]
    assert results["conversions"]["train"]["RGB to 8-bit grayscale"] > 0


def write_parquet(corpus: Path, target: Path) -> Path:
    """The corpus as `datasets` writes an image classification set: Image and ClassLabel."""
    from datasets import ClassLabel, Dataset, Image as HFImage

    for split in COUNTS:
        records = files(corpus, split)
        ds = Dataset.from_dict({"image": [{"bytes": (corpus / p).read_bytes(), "path": p} for p, _ in records],
                                "label": [c for _, c in records]})
        ds = ds.cast_column("image", HFImage()).cast_column("label", ClassLabel(names=CLASSES))
        out = target / "data" / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out))
    return target


def write_webdataset(corpus: Path, target: Path, class_names: bool = True) -> Path:
    """The corpus as `webdataset` shards, each image under the extension of its file."""
    import webdataset as wds

    target.mkdir(parents=True)
    for split in COUNTS:
        with wds.TarWriter(str(target / f"{split}-000000.tar")) as sink:
            for i, (path, c) in enumerate(files(corpus, split)):
                sink.write({"__key__": f"{i:06d}", path.rsplit(".", 1)[1].lower(): (corpus / path).read_bytes(),
                            "cls": c})
    if class_names:
        (target / "classes.txt").write_text("".join(c + "\n" for c in CLASSES))
    return target


def test_parquet_and_webdataset_give_the_folders_figures(ray_local, corpus, tmp_path):
    folder = run(tmp_path, corpus, "folder")
    for name, data in (("parquet", write_parquet(corpus, tmp_path / "parquet")),
                       ("webdataset", write_webdataset(corpus, tmp_path / "wds"))):
        results, prototypes, _ = run(tmp_path, data, name)
        assert results["data"]["format"] == name
        np.testing.assert_array_equal(prototypes, folder[1])
        assert results["counts"] == folder[0]["counts"] and results["metrics"] == folder[0]["metrics"]
        assert results["conversions"] == folder[0]["conversions"]
        assert [r["reason"] for r in results["rejected"]] == ["expected 10x12, found 14x16"]


@pytest.mark.ray
def test_class_names_name_numbered_classes_in_every_output(corpus, tmp_path):
    """WebDataset shards without classes.txt (classes are label values) named by --class-names:
    results.json, table.txt, report.html and the prototype files use the names."""
    data = write_webdataset(corpus, tmp_path / "wds", class_names=False)
    (tmp_path / "names.txt").write_text("".join(c + "\n" for c in CLASSES))
    out = tmp_path / "out"
    run = run_job("--data", str(data), "--classes", "0", "1", "2", "--class-names",
                  f"@{tmp_path / 'names.txt'}", "--on-bad-file", "skip", "--out", str(out),
                  "--cache-dir", str(tmp_path / "c"))
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == CLASSES and list(results["counts"]["valid"]) == CLASSES
    assert list(results["metrics"]["l1"]["per_class"]) == CLASSES
    table = (out / "table.txt").read_text()
    assert all(f"{name}  (n=4)" in table for name in CLASSES)
    assert "ideal owl" in (out / "report.html").read_text()
    with Image.open(out / "prototype_dog.png") as image:
        assert image.mode == "RGB" and image.size == (SHAPE[1], SHAPE[0])
    assert "cat" in run.stdout


def test_the_converter_copies_encoded_bytes_as_they_are(corpus, tmp_path):
    """Folder to WebDataset and Parquet: each image's bytes unchanged (a JPEG stays that JPEG,
    named by its format), the one of another size still there for the job to judge."""
    import tarfile

    import pyarrow.parquet as pq

    from mnist37.convert import convert

    cfg = load(data=str(corpus), classes="all", shard_size=1000, chunk_dir=str(tmp_path / "chunks"))
    originals = {(corpus / p).read_bytes() for split in COUNTS for p, _ in files(corpus, split)}
    convert(cfg, tmp_path / "wds", "webdataset", workers=1)
    with tarfile.open(tmp_path / "wds" / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    images = {name: data for name, data in members.items() if not name.endswith(".cls")}
    assert set(images.values()) <= originals and len(images) == sum(1 for _ in files(corpus, "train"))
    assert all(name.rsplit(".", 1)[1] == {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                                          "TIFF": "tif"}[sniff(data)] for name, data in images.items())
    convert(cfg, tmp_path / "parquet", "parquet", workers=1)
    table = pq.read_table(next((tmp_path / "parquet" / "data").glob("valid-*.parquet")))
    assert {row["bytes"] for row in table.column("image").to_pylist()} <= originals


def test_idx_refuses_color_and_resizing_in_one_line(tmp_path):
    from mnist37.locate import locate
    from mnist37.plan import plan
    from mnist37.sources.base import FormatError
    from tests.test_formats import write_idx
    from tests.conftest import make_image_folder

    clean = make_image_folder(tmp_path / "png", {"train": {"3": 4, "7": 4}, "valid": {"3": 2, "7": 2}})
    data = write_idx(clean, tmp_path / "idx", ["3", "7"], [3, 7])
    for key, value in (("channels", "rgb"), ("image_size", "4x4")):
        with pytest.raises(FormatError, match=r"IDX images are read as they are \(gray, their own size\)"):
            plan(locate(load(data=str(data), chunk_dir=str(tmp_path / "c"), **{key: value})))


@pytest.mark.ray
def test_a_color_set_in_object_storage_gives_the_figures_on_disk(corpus, ray_local, tmp_path):
    """The folder as objects in the S3 test server: the same figures, conversions and rejections
    as the folder on disk (that run in this process on the session's Ray: mnist37.evaluate)."""
    from tests.s3server import aws_env, serving

    disk = mnist37.evaluate(corpus, out=tmp_path / "disk", cache_dir=str(tmp_path / "c-disk"), classes="all",
                            on_bad_file="skip").results
    with serving("mnist37-color") as s3:
        s3.upload(corpus, "mnist37-color", "set")
        # the session's Ray: credentials, no endpoint (the job brings it in its driver's environment)
        done = run_job("--classes", "all", "--on-bad-file", "skip", "--data", "s3://mnist37-color/set", "--out",
                       str(tmp_path / "store"), "--cache-dir", str(tmp_path / "c-store"), env_extra=aws_env(s3.endpoint))
    assert done.returncode == 0, done.stderr
    store = json.loads((tmp_path / "store" / "results.json").read_text())
    for key in ("classes", "channels", "image_shape", "counts", "metrics", "conversions", "formats_by_content",
                "files", "prototypes_sha256"):
        assert store[key] == disk[key], key
    assert [r["reason"] for r in store["rejected"]] == [r["reason"] for r in disk["rejected"]]


@pytest.mark.parametrize("options", [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2},
                                     {"progressive": True}, {"quality": 40, "optimize": True},
                                     {"restart_marker_blocks": 1}])
@pytest.mark.parametrize("size", [(7, 13), (32, 32), (224, 200)])
def test_the_jpeg_fast_path_gives_pillows_pixels(options, size):
    """libjpeg-turbo through simplejpeg against Pillow, on the layouts JPEG writers use: each
    chroma subsampling, progressive, restart markers, odd sizes; color and gray, resized too."""
    import mnist37.images as images

    assert images.simplejpeg is not None, "simplejpeg is a dependency: the fast path must be there"
    rng = np.random.default_rng(sum(size))
    color = np.clip(np.kron(rng.integers(0, 256, (size[0] // 4 + 1, size[1] // 4 + 1, 3)),
                            np.ones((4, 4, 1)))[:size[0], :size[1]] + rng.normal(0, 12, (*size, 3)), 0, 255)
    for mode, channels in (("RGB", 3), ("L", 1)):
        data = encoded(color.astype(np.uint8), "JPEG", mode, **options)
        for resize in (False, True):
            shape = (5, 6) if resize else size
            decoding = Decoding(shape, convert=True, channels=channels, resize=resize)
            fast, conversion = images._jpeg(data, "x.jpg", decoding)
            assert conversion is None
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert(mode)
                expected = np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR) if resize else image)
            np.testing.assert_array_equal(fast, expected.transpose(2, 0, 1) if channels == 3 else expected)
    assert images._jpeg(encoded(color.astype(np.uint8), "JPEG", "CMYK"), "x.jpg", Decoding(size, channels=3)) is None
    assert images._jpeg(encoded(color.astype(np.uint8), "JPEG")[:200], "x.jpg", Decoding(size, channels=3)) is None


# ------------------------------------------------------------------------- jpeg_draft


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: a smooth colour field with noise, as a photo would decode."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    return np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)


# Large JPEGs of every kind a photo set holds: (name, H, W, mode, save options). Odd sizes, so
# that a draft's rounding up (ceil(W / scale)) and its box matter; no EXIF.
DRAFTED = [
    ("rgb-420", 350, 400, None, {"quality": 90}),
    ("rgb-444", 333, 401, None, {"quality": 90, "subsampling": 0}),
    ("rgb-422-progressive", 257, 509, None, {"quality": 85, "subsampling": 1, "progressive": True}),
    ("gray", 311, 176, "L", {"quality": 90}),
    ("cmyk", 130, 272, "CMYK", {"quality": 95}),
    ("small", 41, 37, None, {"quality": 90}),  # smaller than some targets: scale 1
]


def drafted_by_pillow(data: bytes, size: tuple[int, int], mode: str, resample) -> np.ndarray:
    """What jpeg_draft defines: Pillow's draft for (W, H), convert, resize with draft's box."""
    with Image.open(io.BytesIO(data)) as image:
        _, box = image.draft(mode, (size[1], size[0]))
        converted = image.convert(mode) if image.mode != mode else image
        pixels = np.asarray(converted.resize((size[1], size[0]), resample, box=box))
    return pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def full_by_pillow(data: bytes, size: tuple[int, int], mode: str, resample) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert(mode).resize((size[1], size[0]), resample))
    return pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


@pytest.mark.parametrize("pillow_only", [False, True], ids=["simplejpeg", "pillow"])
@pytest.mark.parametrize("name, height, width, mode, options", DRAFTED, ids=[d[0] for d in DRAFTED])
def test_a_draft_is_pillows_draft_then_resize(monkeypatch, pillow_only, name, height, width, mode, options):
    """Every kind of JPEG, one channel and three, to sizes that take scales 8, 4, 2 and 1,
    with several filters: decode_image's draft equals Pillow's draft + resize, whether
    simplejpeg decodes it or Pillow does; the default (no draft) stays the full decode."""
    import mnist37.images as images

    if pillow_only:
        monkeypatch.setattr(images, "simplejpeg", None)
    data = encoded(photo(height, width, len(name)), "JPEG", mode, **options)
    scaled = 0
    for size, resample in (((32, 32), "bilinear"), ((64, 64), "bilinear"), ((64, 48), "bicubic"),
                           ((224, 224), "bilinear"), ((100, 150), "lanczos"), ((7, 9), "box")):
        for channels, target in ((3, "RGB"), (1, "L")):
            filter_ = getattr(Image.Resampling, resample.upper())
            drafted = Decoding(size, convert=True, channels=channels, resize=True, resample=resample, draft=True)
            pixels, conversion = images.decode_image(data, f"{name}.JPEG", drafted)
            expected = drafted_by_pillow(data, size, target, filter_)
            np.testing.assert_array_equal(pixels, expected, err_msg=f"{name} to {size} {target}")
            full = full_by_pillow(data, size, target, filter_)
            if not pillow_only and (mode or "RGB", target) in (("RGB", "RGB"), ("RGB", "L"), ("L", "L")):
                # the fast path is taken, not only allowed (CMYK, and gray to RGB: Pillow's)
                assert images._jpeg(data, f"{name}.JPEG", drafted) is not None
            default, _ = images.decode_image(data, f"{name}.JPEG", dataclasses.replace(drafted, draft=False))
            np.testing.assert_array_equal(default, full)
            if images.draft_scale((height, width), size) > 1:
                scaled += 1
                assert not np.array_equal(pixels, full)  # the draft really decoded less
            named = {"L": "8-bit grayscale", "RGB": "RGB", "CMYK": "CMYK"}
            source = mode or "RGB"
            assert conversion == (None if source == target else f"{named[source]} to {named[target]}")
    assert scaled > 0 or name == "small"


def test_draft_scale_is_pillows():
    """The scale Pillow's draft picks (decoderconfig), for sizes around each threshold."""
    for height, width in ((350, 400), (128, 128), (127, 300), (64, 64), (513, 1025), (2000, 300)):
        data = encoded(photo(height, width, 1), "JPEG", quality=80)
        for target in ((64, 64), (32, 128), (224, 224), (1, 1)):
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (target[1], target[0]))
                assert draft_scale((height, width), target) == image.decoderconfig[0], (height, width, target)


def test_a_gray_set_still_refuses_color_jpegs_with_a_draft():
    data = encoded(photo(200, 300, 3), "JPEG", quality=90)
    with pytest.raises(DecodeError, match=r"^x.jpg: expected 8-bit grayscale, found RGB$"):
        decode_image(data, "x.jpg", Decoding((32, 32), convert=False, channels=1, resize=True, draft=True))


def test_other_formats_decode_as_without_a_draft(corpus):
    """A PNG, WebP, ... has no draft: the same pixels with jpeg_draft or without."""
    for path, _ in files(corpus, "train"):
        if path.endswith((".png", ".webp", ".bmp", ".gif", ".tiff")):
            data = (corpus / path).read_bytes()
            if sniff(data) == "JPEG":
                continue
            decoding = Decoding((5, 6), convert=True, channels=3, resize=True)
            np.testing.assert_array_equal(decode_image(data, path, dataclasses.replace(decoding, draft=True))[0],
                                          decode_image(data, path, decoding)[0], err_msg=path)


def test_a_draft_decodes_again_under_other_keys():
    """A draft means other pixels, so other chunk keys; the full decode's settings (and so
    every chunk already written with image_size) stay as they were."""
    full = Decoding((64, 64), convert=True, channels=3, resize=True)
    assert full.settings == "rgb-8bit/v3/convert/resize-64x64-bilinear"  # pinned: chunks written so far
    assert dataclasses.replace(full, draft=True).settings == "rgb-8bit/v3/convert/resize-64x64-bilinear/jpeg-draft"
    gray = Decoding((28, 28))
    assert dataclasses.replace(gray, draft=True).settings == gray.settings  # no resize: no draft


def test_jpeg_draft_is_a_key_and_needs_image_size():
    assert load(image_size="64x64", jpeg_draft="true").jpeg_draft is True
    assert load(image_size="64x64").jpeg_draft is False
    with pytest.raises(ConfigError, match=r"^jpeg_draft: decodes JPEGs for the size they are resized to; "
                                          r"give image_size too$"):
        load(jpeg_draft=True)


def test_the_job_with_jpeg_draft_decodes_again_and_matches_pillow(ray_local, tmp_path):
    """The same folder of large JPEGs, one chunk folder: the full decode, then jpeg_draft (which
    must decode every shard again, not reuse the full decode's chunks), jpeg_draft again
    (reusing its own), the full decode again (decoding again); prototypes equal Pillow's full
    and draft references."""
    root = tmp_path / "photos"
    for split, n in (("train", 4), ("valid", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                kind = DRAFTED[(c + i) % len(DRAFTED)]
                (root / split / name / f"{i}.jpg").write_bytes(
                    encoded(photo(kind[1] + i, kind[2] + c, 10 * c + i), "JPEG", kind[3], **kind[4]))
    size = (24, 32)

    def job(**overrides):
        cfg = load(data=str(root), out=str(tmp_path / "out"), chunk_dir=str(tmp_path / "chunks"), classes="all",
                   channels="rgb", image_size="24x32", **overrides)
        return evaluate(cfg)

    def prototypes(decode) -> np.ndarray:
        sums = [np.sum([decode((root / "train" / name / f).read_bytes(), size, "RGB", Image.Resampling.BILINEAR)
                        .astype(np.int64) for f in sorted(os.listdir(root / "train" / name))], axis=0)
                for name in CLASSES]
        return (np.stack(sums) / 4 / 255.0).astype(np.float32)

    full, full_prototypes, _ = job()
    np.testing.assert_array_equal(full_prototypes, prototypes(full_by_pillow))
    drafted, drafted_prototypes, _ = job(jpeg_draft=True)
    assert drafted["shards"]["files_reused"] == 0 and drafted["shards"]["files_decoded"] == 18
    assert drafted["config"]["jpeg_draft"] is True
    np.testing.assert_array_equal(drafted_prototypes, prototypes(drafted_by_pillow))
    assert not np.array_equal(drafted_prototypes, full_prototypes)
    again, again_prototypes, _ = job(jpeg_draft=True)
    assert again["shards"]["files_reused"] == 18  # the draft's own chunks are reused
    np.testing.assert_array_equal(again_prototypes, drafted_prototypes)
    back, back_prototypes, _ = job()  # a shard keeps one chunk: the full decode's was replaced
    assert back["shards"]["files_reused"] == 0
    np.testing.assert_array_equal(back_prototypes, full_prototypes)
