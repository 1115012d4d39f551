"""Full MNIST (mnist_png.tgz, 70,000 images) converted to each format: confusion matrices and
prototypes identical to the PNG folder's. Parquet and tar shards come from jobs/convert.py's
library, IDX is written here from the decoded PNGs (as MNIST's own files are)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist37.config import load
from mnist37.convert import convert
from tests.test_formats import evaluate
from tests.test_formats import folder_records, idx_bytes


@pytest.fixture(scope="module")
def mnist_png_tgz(mnist_sample_tgz):
    path = mnist_sample_tgz.with_name("mnist_png.tgz")
    if not path.is_file():
        pytest.fail(f"{path} not found beside mnist_sample.tgz")
    return path


def test_every_format_gives_the_folders_figures(ray_local, mnist_png_tgz, cache_dir, tmp_path):
    settings = dict(config="configs/mnist.toml", cache_dir=str(cache_dir))

    def job(data, name, **extra):
        cfg = load(settings["config"], data=str(data), cache_dir=settings["cache_dir"], out=str(tmp_path / name),
                   chunk_dir=str(tmp_path / f"chunks-{name}"), **extra)
        return evaluate(cfg)

    expected, expected_protos, _ = job(mnist_png_tgz, "png")
    root = expected["data"]["root"]
    assert sum(expected["counts"]["testing"].values()) == 10_000
    sources = {}
    for target in ("parquet", "webdataset"):
        sources[target] = tmp_path / target
        convert(load(settings["config"], data=root, cache_dir=settings["cache_dir"],
                     chunk_dir=str(tmp_path / "chunks-convert")), sources[target], target)
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
