import os

import pytest

from mnist37.sources.folder import list_split
from mnist37.replicate import replicate


def test_replicas_are_hard_links_with_prefixed_names(image_folder, tmp_path):
    made = replicate(image_folder, tmp_path / "x3", 3, ["train", "valid"], ["3", "7"])
    assert made == {"files": 3 * 152, "reused": False, "linked": True}
    listing = list_split(tmp_path / "x3", "valid", ["3", "7"])
    assert listing.counts().tolist() == [36, 36]
    original = image_folder / "valid" / "3" / "4.png"
    for r in range(3):
        copy = tmp_path / "x3" / "valid" / "3" / f"r{r:03d}-4.png"
        assert os.path.samefile(copy, original)


def test_rerun_reuses_and_other_arguments_rebuild(image_folder, tmp_path):
    replicate(image_folder, tmp_path / "x", 2, ["train"], ["3"])
    assert replicate(image_folder, tmp_path / "x", 2, ["train"], ["3"]) == {"files": 128, "reused": True}
    assert replicate(image_folder, tmp_path / "x", 1, ["train"], ["3"])["files"] == 64
    assert len(os.listdir(tmp_path / "x" / "train" / "3")) == 64


def test_copies_must_be_positive(image_folder, tmp_path):
    with pytest.raises(ValueError, match="copies: expected a positive count, got 0"):
        replicate(image_folder, tmp_path / "x", 0, ["train"], ["3"])
