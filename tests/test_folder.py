import os
import tarfile
import time

import numpy as np
import pytest

from mnist37 import DatasetError
from mnist37.locate import find_root
from mnist37.sources.folder import SETTLED_S, list_split
from tests.conftest import make_image_folder, write_png


def test_listing_sorted_and_indexed_in_class_order(image_folder):
    listing = list_split(image_folder, "valid", ["7", "3"])
    assert len(listing) == 24 and listing.classes == ("7", "3")
    assert listing.class_indices.tolist() == [0] * 12 + [1] * 12
    paths = listing.paths()
    assert paths[0] == "valid/7/0.png" and paths[12] == "valid/3/0.png"
    assert paths[:12] == sorted(paths[:12])  # name order: 0, 1, 10, 11, 2, ...
    assert paths == list_split(image_folder, "valid", ["7", "3"]).paths()
    assert listing.paths(3, 5) == paths[3:5]
    assert listing.counts().tolist() == [12, 12]


def test_names_with_spaces_and_non_ascii_survive(tmp_path):
    for name in ("a b.png", "ü.png", "日本.png", "z.PNG"):
        write_png(tmp_path / "train" / "3" / name, np.zeros((4, 4), dtype=np.uint8))
    paths = list_split(tmp_path, "train", ["3"]).paths()
    assert paths == ["train/3/a b.png", "train/3/z.PNG", "train/3/ü.png", "train/3/日本.png"]


def test_non_png_files_and_other_classes_are_not_samples(image_folder):
    (image_folder / "valid" / "3" / "labels.csv").write_text("name,label\n")
    (image_folder / "valid" / "3" / ".DS_Store").write_bytes(b"\0")
    make_image_folder(image_folder, {"valid": {"9": 2}})
    paths = list_split(image_folder, "valid", ["3", "7"]).paths()
    assert len(paths) == 24 and all(p.endswith(".png") for p in paths)


def test_missing_split_class_and_empty_class(image_folder):
    with pytest.raises(DatasetError, match=r"Split folder 'test' not found under .*; found: train, valid"):
        list_split(image_folder, "test", ["3", "7"])
    with pytest.raises(DatasetError, match=r"Class '8' has no folder under train/; found: 3, 7"):
        list_split(image_folder, "train", ["3", "8"])
    (image_folder / "train" / "5").mkdir()
    with pytest.raises(DatasetError, match=r"Class '5' has no images under train/"):
        list_split(image_folder, "train", ["3", "5"])


def test_find_root_from_folder_wrapper_and_archive(image_folder, tmp_path):
    assert find_root(image_folder, "train") == image_folder.resolve()
    assert find_root(image_folder.parent, "train") == image_folder.resolve()  # one wrapping folder
    archive = tmp_path / "ds.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname="mnist_tiny")
    root = find_root(archive, "train", tmp_path / "cache")
    assert root.name == "mnist_tiny" and (root / "train" / "7" / "0.png").is_file()


def test_find_root_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"data: no data set given; pass --data PATH"):
        find_root("", "train")
    with pytest.raises(DatasetError, match=r"data: .*nowhere does not exist"):
        find_root(tmp_path / "nowhere", "train")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"notes.txt is neither a folder nor a .tgz"):
        find_root(tmp_path / "notes.txt", "train")


def list_settled(monkeypatch, *args):
    """list_split as it runs once SETTLED_S has passed since the folders last changed: the
    clock the listing reads is moved on for this call, instead of the test waiting."""
    now = time.time_ns
    with monkeypatch.context() as patched:
        patched.setattr(time, "time_ns", lambda: now() + int((SETTLED_S + 0.1) * 1e9))
        return list_split(*args)


def test_unchanged_folders_reuse_their_listing_and_every_change_is_listed_again(image_folder, tmp_path, monkeypatch):
    keep = tmp_path / "listings"
    first = list_split(image_folder, "train", ["3", "7"], keep)
    assert first.reused == 0 and not keep.exists()  # folders written just now: too fresh to keep
    assert list_settled(monkeypatch, image_folder, "train", ["3", "7"], keep).reused == 0  # listed, and kept now
    (image_folder / "train" / "3" / "notes.txt").write_text("")  # not an image: counted as ignored
    again = list_split(image_folder, "train", ["3", "7"], keep)
    assert again.reused == 1 and again.ignored == [1, 0]  # 3/ changed; 7/ did not

    list_settled(monkeypatch, image_folder, "train", ["3", "7"], keep)
    kept = list_split(image_folder, "train", ["3", "7"], keep)
    assert kept.reused == 2 and kept.paths() == again.paths() and kept.ignored == [1, 0]
    assert kept.class_indices.tolist() == again.class_indices.tolist()

    seven = image_folder / "train" / "7"
    write_png(seven / "new.png", np.zeros((28, 28), dtype=np.uint8))
    os.rename(image_folder / "train" / "3" / "0.png", image_folder / "train" / "3" / "zz.png")
    changed = list_split(image_folder, "train", ["3", "7"], keep)
    assert changed.reused == 0
    assert "train/7/new.png" in changed.paths() and "train/3/zz.png" in changed.paths()
    assert "train/3/0.png" not in changed.paths()
    (seven / "new.png").unlink()
    assert "train/7/new.png" not in list_split(image_folder, "train", ["3", "7"], keep).paths()


def _flip_a_name(data: bytes) -> bytes:
    """The listing with one stored file name changed (".png" to ".pnh"), its zip CRC left as it
    was: what only the CRC check tells from a good listing."""
    assert data.count(b".png") >= 1
    return data.replace(b".png", b".pnh", 1)


# What a power cut can leave of a kept listing (they are published without a flush to disk:
# storage.writes.publish, durable=False), and a file that never was one.
DAMAGES = {"torn": lambda data: data[:100], "empty": lambda data: b"", "a name flipped": _flip_a_name,
           "foreign": lambda data: b"not a listing"}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_or_foreign_kept_listing_is_listed_again(image_folder, tmp_path, monkeypatch, damage):
    keep = tmp_path / "listings"
    truth = list_settled(monkeypatch, image_folder, "valid", ["3", "7"], keep)
    files = sorted(keep.glob("*.npz"))
    assert len(files) == 2
    files[0].write_bytes(DAMAGES[damage](files[0].read_bytes()))
    listing = list_split(image_folder, "valid", ["3", "7"], keep)
    assert listing.reused == 1 and listing.paths() == truth.paths()


def test_a_listing_that_cannot_be_kept_is_still_returned(image_folder, tmp_path, caplog, monkeypatch):
    keep = tmp_path / "listings"
    keep.write_text("a file where the folder should be")
    listing = list_settled(monkeypatch, image_folder, "valid", ["3", "7"], keep)
    assert len(listing) == 24 and listing.reused == 0
    assert "listing not kept for the next run" in caplog.text
