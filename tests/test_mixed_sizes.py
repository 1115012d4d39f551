"""Images of several sizes without --image-size: said so at planning, from a few headers,
before anything is decoded, naming the flag that resizes them (issue 33, item 5).

Real folders of JPEGs (and PNGs) written here with Pillow; the planner runs in-process (no
Ray), the job as a user runs it (jobs/evaluate.py on the test session's Ray).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from mnist37 import DatasetError
from mnist37.config import load
from mnist37.locate import locate
from mnist37.plan import plan
from mnist37.sources.folder import SIZE_PROBES, header_sizes, list_split
from tests.test_evaluate_job import run_job

CLASSES = [f"n{1440764 + 37 * i:08d}" for i in range(6)]


def jpeg(height: int, width: int, seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format=fmt)
    return out.getvalue()


def photo_folder(root, sizes, per_class=(5, 2)):
    """train/ and val/ of CLASSES, ImageNet's names; `sizes(split, c, i)` is each file's (H, W)."""
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = sizes(split, c, i)
                (folder / f"{name}_{i}.JPEG").write_bytes(jpeg(h, w, 100 * c + i, "L" if (c + i) % 7 == 3 else "RGB"))
    return root


def mixed(split, c, i):
    rng = np.random.default_rng((c, i, split == "train"))
    return int(rng.integers(20, 60)), int(rng.integers(20, 60))


def config(root, tmp_path, **overrides):
    return load(data=str(root), classes="all", train_split="train", eval_split="val", channels="rgb",
                chunk_dir=str(tmp_path / "chunks"), **overrides)


MESSAGE = (r"^train/ in {root}: images of different sizes \((\d+x\d+, ){{3}}\d+x\d+ and \d+ more of 12 looked at\), "
           r"where every image must have the first training image's size \(\d+x\d+\) unless --image-size is given; "
           r"pass --image-size HxW \(e\.g\. --image-size 64x64\) to resize them all to one size$")


def test_a_set_of_mixed_sizes_is_stopped_at_planning(tmp_path):
    root = photo_folder(tmp_path / "photos", mixed)
    with pytest.raises(DatasetError, match=MESSAGE.format(root=re.escape(str(root)))):
        plan(locate(config(root, tmp_path)))
    assert not list((tmp_path / "chunks").glob("**/*.arrow"))
    # With --image-size they are resized: planned as before; with image_shape the user asked
    # for the others to be rejected.
    assert plan(locate(config(root, tmp_path, image_size="16x16"))).decoding.shape == (16, 16)
    assert plan(locate(config(root, tmp_path, image_shape="30 30"))).decoding.shape == (30, 30)


def test_uniform_sets_and_a_stray_file_plan_as_before(tmp_path):
    root = photo_folder(tmp_path / "uniform", lambda split, c, i: (24, 32))
    assert plan(locate(config(root, tmp_path))).decoding.shape == (24, 32)
    # One file of another size (the first of a class the probe reads) is left to the decode,
    # which rejects and counts it, as before.
    (root / "train" / CLASSES[3] / f"{CLASSES[3]}_0.JPEG").write_bytes(jpeg(40, 40, 1))
    assert plan(locate(config(root, tmp_path))).decoding.shape == (24, 32)


def test_an_eval_split_of_another_size_is_stopped_too(tmp_path):
    root = photo_folder(tmp_path / "photos", lambda split, c, i: (24, 32) if split == "train" else (48, 64))
    with pytest.raises(DatasetError, match=r"^val/ in .*: images of 48x64 \(all of 12 looked at\), where every image "
                                           r"must have the first training image's size \(24x32\) unless "
                                           r"--image-size is given; pass --image-size HxW"):
        plan(locate(config(root, tmp_path)))


def test_sizes_come_from_headers_spread_over_the_classes(tmp_path):
    """The probe reads SIZE_PROBES files, from classes spread over the whole split (first and
    last included), each one's size from its header alone: a PNG, a JPEG, a WebP, a file cut
    after its header, and a file that is not an image (left to the decode)."""
    root = photo_folder(tmp_path / "photos", lambda split, c, i: (10 + c, 20 + i), per_class=(3, 1))
    listing = list_split(root, "train", CLASSES)
    paths = listing.spread_paths(SIZE_PROBES)
    assert len(paths) == min(SIZE_PROBES, 3 * len(CLASSES))
    assert {p.split("/")[1] for p in paths} == set(CLASSES)
    assert paths[:len(CLASSES)] == [f"train/{c}/{c}_0.JPEG" for c in CLASSES]  # first files first
    assert listing.spread_paths(2) == [f"train/{CLASSES[0]}/{CLASSES[0]}_0.JPEG",
                                      f"train/{CLASSES[-1]}/{CLASSES[-1]}_0.JPEG"]
    files = {"a.png": jpeg(7, 9, 1, "L", "PNG"), "b.webp": jpeg(11, 13, 2, fmt="WEBP"),
             "c.JPEG": jpeg(300, 200, 3)[:400], "d.JPEG": b"not an image", "e.bmp": jpeg(5, 6, 4, fmt="BMP")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert header_sizes(tmp_path, list(files)) == [(7, 9), (11, 13), (300, 200), (5, 6)]


@pytest.mark.ray
def test_the_job_says_so_before_decoding(tmp_path):
    root = photo_folder(tmp_path / "photos", mixed)
    run = run_job("--data", str(root), "--classes", "all", "--channels", "rgb", "--train-split", "train",
                  "--eval-split", "val", "--out", str(tmp_path / "out"), "--chunk-dir", str(tmp_path / "chunks"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(MESSAGE.format(root=re.escape(str(root))), errors[0][len("error: "):])
    assert "decode:" not in run.stderr  # no decode progress: nothing was decoded
    assert not list((tmp_path / "chunks").glob("**/*.arrow")) and not (tmp_path / "out" / "results.json").exists()
