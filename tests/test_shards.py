import numpy as np
import pytest

from mnist37.chunks import read_chunk
from mnist37.decode import DecodeError, decode_files
from mnist37.folder import list_samples
from mnist37.prototypes import pixel_sums
from mnist37.shards import chunk_path, decode_shard, make_shards


@pytest.mark.parametrize("shard_size, expected_sizes", [(128, [128]), (19, [19] * 6 + [14]), (2, [2] * 64), (500, [128])])
def test_shards_cover_every_sample_once_in_order(image_folder, shard_size, expected_sizes):
    samples = list_samples(image_folder, "train", ["3", "7"])
    shards = make_shards(samples, "train", shard_size)
    assert [len(s) for s in shards] == expected_sizes
    assert [s.index for s in shards] == list(range(len(shards)))
    assert [p for s in shards for p in s.paths] == [s.path for s in samples]
    assert [c for s in shards for c in s.class_indices] == [s.class_index for s in samples]


def test_decode_shard_writes_its_chunk_and_sums(image_folder, tmp_path):
    samples = list_samples(image_folder, "train", ["3", "7"])
    shard = make_shards(samples, "train", 50)[1]
    done = decode_shard(shard, image_folder, ["3", "7"], (8, 8), tmp_path / "chunks", with_sums=True)
    assert done.chunk_path == str(chunk_path(tmp_path / "chunks", shard)) == str(tmp_path / "chunks/train/train-000001.arrow")
    chunk = read_chunk(done.chunk_path)
    expected, digest = decode_files(image_folder, shard.paths, (8, 8))
    np.testing.assert_array_equal(chunk.images, expected)
    assert chunk.paths == list(shard.paths) and chunk.class_indices.tolist() == list(shard.class_indices)
    assert done.digest == digest and done.num_images == 50
    sums, counts = pixel_sums(expected, np.array(shard.class_indices), 2)
    np.testing.assert_array_equal(done.pixel_sums, sums)
    assert done.counts.tolist() == counts.tolist() == [14, 36]


def test_evaluation_shards_count_without_sums(image_folder, tmp_path):
    shard = make_shards(list_samples(image_folder, "valid", ["3", "7"]), "valid", 100)[0]
    done = decode_shard(shard, image_folder, ["3", "7"], (8, 8), tmp_path, with_sums=False)
    assert done.pixel_sums is None and done.counts.tolist() == [12, 12]


def test_a_bad_file_fails_the_shard_without_a_chunk(image_folder, tmp_path):
    shard = make_shards(list_samples(image_folder, "valid", ["3", "7"]), "valid", 100)[0]
    (image_folder / shard.paths[5]).write_bytes(b"garbage")
    with pytest.raises(DecodeError, match=rf"{shard.paths[5]}: not an image"):
        decode_shard(shard, image_folder, ["3", "7"], (8, 8), tmp_path / "chunks", with_sums=False)
    assert not (tmp_path / "chunks").exists()
