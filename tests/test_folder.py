import tarfile

import pytest

from mnist37.folder import DatasetError, Sample, find_root, list_samples
from tests.conftest import make_image_folder


def test_samples_sorted_and_indexed_in_class_order(image_folder):
    samples = list_samples(image_folder, "valid", ["7", "3"])
    assert len(samples) == 24
    assert samples[0] == Sample("valid/7/0.png", 0)
    assert [s.class_index for s in samples] == [0] * 12 + [1] * 12
    sevens = [s.path for s in samples[:12]]
    assert sevens == sorted(sevens)  # name order: 0, 1, 10, 11, 2, ...
    assert samples == list_samples(image_folder, "valid", ["7", "3"])


def test_non_png_files_and_other_classes_are_not_samples(image_folder):
    (image_folder / "valid" / "3" / "labels.csv").write_text("name,label\n")
    (image_folder / "valid" / "3" / ".DS_Store").write_bytes(b"\0")
    make_image_folder(image_folder, {"valid": {"9": 2}})
    samples = list_samples(image_folder, "valid", ["3", "7"])
    assert len(samples) == 24 and all(s.path.endswith(".png") for s in samples)


def test_missing_split_class_and_empty_class(image_folder):
    with pytest.raises(DatasetError, match=r"Split folder 'test' not found under .*; found: train, valid"):
        list_samples(image_folder, "test", ["3", "7"])
    with pytest.raises(DatasetError, match=r"Class '8' has no folder under train/; found: 3, 7"):
        list_samples(image_folder, "train", ["3", "8"])
    (image_folder / "train" / "5").mkdir()
    with pytest.raises(DatasetError, match=r"Class '5' has no images under train/"):
        list_samples(image_folder, "train", ["3", "5"])


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
