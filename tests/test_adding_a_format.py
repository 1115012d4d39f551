"""Adding a format is one module and one table entry (docs/architecture.md: Adding a format).

A toy format (`<split>.npz`: NumPy arrays of pixels and label values) is written as a module of
its own in tmp_path and entered in the sources table, and nothing else: the job's own stages
(locate, plan, the decode step, the files table) then read it, and find what they find in the
same images written as a PNG folder, the other end of the protocol.
"""

from __future__ import annotations

import numpy as np
import pytest

from mnist37 import sources
from mnist37.config import load
from mnist37.evaluation import file_accounts
from mnist37.locate import locate
from mnist37.plan import plan
from mnist37.prototypes import PixelSums
from mnist37.shards import decode_shard
from tests.conftest import write_png

TOY_MODULE = '''
"""A toy format: `<split>.npz` holding `images` (uint8 [N, H, W]) and `labels` (uint8 [N])."""

import numpy as np

from mnist37.images import FirstImages
from mnist37.sources import base, check_splits
from mnist37.sources.base import ContainerShard, container_counts, record_path
from mnist37.sources.protocol import ShardRead
from mnist37.sources.keys import shard_digest

NAME = "npz"


def containers(root, listed):
    return {name[:-len(".npz")]: [name] for name in listed(root)[0] if name.endswith(".npz")}


def check(root, splits, classes):
    return base.check_containers(root, NAME, splits, classes)


def _arrays(root, source):
    with np.load(f"{root}/{source}") as f:
        return f["images"], f["labels"]


def plan(request):
    splits = check_splits(request.root, NAME, request.splits)
    classes = list(request.classes)
    mapping = base.class_map(None, classes, str(request.root))
    shards = [ContainerShard(split, 0, request.shard_size, tuple(classes), NAME, files[0], 0, -1, mapping, 0)
              for split, files in splits.items()]
    shape = _arrays(request.root, splits[request.train_split][0])[0].shape[1:]
    return base.container_plan(request, NAME, classes, shards, splits, FirstImages(shape, 1, 0),
                               "npz pixels are read as they are")


def read_shard(shard, root, decoding):
    images, labels = _arrays(root, shard.source)
    mapped = labels < len(shard.class_map)
    selected = np.full(len(labels), -1)
    selected[mapped] = shard.class_map[labels[mapped]]
    keep = selected >= 0
    found = np.bincount(selected[keep], minlength=len(shard.classes) + 1)
    return ShardRead(images[keep], selected[keep].astype(np.int32),
                     [record_path(shard.source, i) for i in np.flatnonzero(keep).tolist()], [],
                     shard_digest(shard.source, 0, -1, labels.tobytes(), images.tobytes()), "",
                     container_counts(found, np.zeros(len(shard.classes) + 1), int((~keep).sum())))


def converter_records(shard, root, shape):
    return iter(())
'''


def evaluated(data, fmt: str, chunk_dir) -> tuple[dict, np.ndarray]:
    """The files table and the prototypes the job's stages make of `data`, in this process."""
    planned = plan(locate(load(data=str(data), format=fmt, classes="3 7", train_split="train", eval_split="valid",
                               shard_size=8, chunk_dir=str(chunk_dir))))
    done = [decode_shard(shard, planned.root, planned.chunk_dir, planned.decoding, shard.split == "train")
            for shard in planned.shards]
    sums = PixelSums.zeros(len(planned.classes), planned.shape)
    for shard in done:
        if shard.pixel_sums is not None:
            sums.add(shard.pixel_sums)
    return file_accounts(planned.names, ("train", "valid"), done, planned.listed), sums.prototypes(planned.names,
                                                                                                    "train")


@pytest.fixture
def toy_format(tmp_path, monkeypatch):
    """The one module and the one table entry, and nothing else."""
    (tmp_path / "mnist37_toy_npz.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sources.FORMATS, "npz", sources.Format("npz", "mnist37_toy_npz", "<split>.npz", "npz"))


def test_a_new_format_is_one_module_and_one_table_entry(tmp_path, toy_format):
    rng = np.random.default_rng(7)
    toy, folder = tmp_path / "toy", tmp_path / "folder"
    toy.mkdir()
    for split, n in (("train", 21), ("valid", 10)):
        images = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
        labels = rng.choice(np.array([3, 7, 9], dtype=np.uint8), n)
        labels[:3] = [3, 7, 9]
        np.savez(toy / f"{split}.npz", images=images, labels=labels)
        for i, (pixels, label) in enumerate(zip(images, labels.tolist())):
            write_png(folder / split / str(label) / f"{i}.png", pixels)

    toy_accounts, toy_prototypes = evaluated(toy, "npz", tmp_path / "chunks-npz")
    folder_accounts, folder_prototypes = evaluated(folder, "folder", tmp_path / "chunks-folder")

    np.testing.assert_array_equal(toy_prototypes, folder_prototypes)
    for split in ("train", "valid"):
        for name in ("3", "7"):
            assert toy_accounts[split][name] == folder_accounts[split][name]
        # Records of class 9, not selected: ignored by the toy format's tasks, never listed by the folder's.
        assert toy_accounts[split]["(other classes)"]["ignored"] == sum(
            1 for _ in (folder / split / "9").iterdir())
