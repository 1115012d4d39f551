"""Real MNIST converted to each format: confusion matrices and prototypes identical to the PNG
folder's. Parquet and tar shards come from jobs/convert.py's library, IDX is written here from
the decoded PNGs (as MNIST's own files are).

The data is a slice of full MNIST (mnist_png.tgz) in its own layout: all ten digits, the first
SLICE[split] PNGs of each class folder as the archive holds them, cut into shards of
SHARD_SIZE so that each split spans several Parquet files, tars and IDX shards, as the whole
set does with its default shard size. Equality across formats needs no more images than that
(it took 4 conversions and 4 evaluations of 70,000, ~40 s of a 2-core machine); the whole set's
figures are checked against an independent computation in tests/test_mnist_full.py."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist37.config import load
from mnist37.convert import convert
from mnist37.locate import find_root
from tests.test_formats import evaluate
from tests.test_formats import folder_records, idx_bytes


SLICE = {"training": 300, "testing": 100}  # images per class
SHARD_SIZE = 400  # training: 8 shards, testing: 3


@pytest.fixture(scope="module")
def mnist_png_tgz(mnist_sample_tgz):
    path = mnist_sample_tgz.with_name("mnist_png.tgz")
    if not path.is_file():
        pytest.fail(f"{path} not found beside mnist_sample.tgz")
    return path


@pytest.fixture(scope="module")
def mnist_slice(mnist_png_tgz, cache_dir, tmp_path_factory) -> Path:
    """SLICE[split] images of each class of full MNIST, linked from its extraction (the one the
    job's run on the whole set in tests/test_mnist_full.py uses too)."""
    whole = find_root(mnist_png_tgz, "training", cache_dir)
    root = tmp_path_factory.mktemp("mnist-slice") / "mnist_png"
    for split, n in SLICE.items():
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True)
            for path in sorted((whole / split / str(digit)).iterdir())[:n]:
                os.link(path, root / split / str(digit) / path.name)
    return root


def test_every_format_gives_the_folders_figures(ray_local, mnist_slice, cache_dir, tmp_path):
    settings = dict(cache_dir=str(cache_dir), shard_size=SHARD_SIZE)

    def job(data, name, **extra):
        cfg = load("configs/mnist.toml", data=str(data), out=str(tmp_path / name),
                   chunk_dir=str(tmp_path / f"chunks-{name}"), **settings, **extra)
        return evaluate(cfg)

    expected, expected_protos, _ = job(mnist_slice, "png")
    root = expected["data"]["root"]
    assert sum(expected["counts"]["testing"].values()) == 10 * SLICE["testing"]
    sources = {}
    for target in ("parquet", "webdataset"):
        sources[target] = tmp_path / target
        convert(load("configs/mnist.toml", data=root, chunk_dir=str(tmp_path / "chunks-convert"), **settings),
                sources[target], target)
    sources["idx"] = tmp_path / "idx"
    sources["idx"].mkdir()
    classes = [str(d) for d in range(10)]
    for split, name in (("training", "train"), ("testing", "t10k")):
        records = folder_records(Path(root), split, classes)
        images = np.stack([np.array(Image.open(io.BytesIO(data))) for _, data, _ in records])
        labels = np.array([label for *_, label in records])
        image_file, label_file = idx_bytes(images, labels)
        (sources["idx"] / f"{name}-images-idx3-ubyte").write_bytes(image_file)
        (sources["idx"] / f"{name}-labels-idx1-ubyte").write_bytes(label_file)
    for fmt, data in sources.items():
        splits = dict(train_split="train", eval_split="t10k") if fmt == "idx" else {}
        results, protos, _ = job(data, fmt, **splits)
        assert results["data"]["format"] == fmt and results["classes"] == classes
        assert protos.tobytes() == expected_protos.tobytes(), fmt
        for metric in ("l1", "l2"):
            assert results["metrics"][metric]["confusion"] == expected["metrics"][metric]["confusion"], (fmt, metric)
        assert list(results["counts"].values()) == list(expected["counts"].values())
