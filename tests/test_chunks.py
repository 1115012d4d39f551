import json
import os

import numpy as np
import pyarrow as pa
import pytest

from mnist37.arrays import arrow_array, arrow_strings, arrow_text, numbers, valid
from mnist37.chunks import ChunkError, chunk_table, read_chunk, read_chunk_metadata, write_chunk
from mnist37.prototypes import pixel_sums


def sample_table(n=10, shape=(4, 5)):
    images = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = [i % 2 for i in range(n)]
    paths = [f"train/{label}/{i}.png" for i, label in enumerate(labels)]
    return images, labels, paths, chunk_table(images, labels, paths, ["3", "7"], "train")


def test_schema_is_canonical_fixed_shape_tensor_with_metadata():
    _, _, _, table = sample_table()
    image_type = table.schema.field("image").type
    assert isinstance(image_type, pa.FixedShapeTensorType)
    assert image_type.extension_name == "arrow.fixed_shape_tensor"
    assert image_type.value_type == pa.uint8() and image_type.shape == [4, 5]
    meta = table.schema.metadata
    assert json.loads(meta[b"mnist37.held"]) == [[0, "3", 5], [1, "7", 5]]
    assert meta[b"mnist37.num_classes"] == b"2" and b"mnist37.classes" not in meta
    assert json.loads(meta[b"mnist37.image_shape"]) == [4, 5]
    assert meta[b"mnist37.split"] == b"train"


def test_round_trip_through_a_file_is_zero_copy(tmp_path):
    images, labels, paths, table = sample_table()
    num_bytes = write_chunk(tmp_path / "c" / "x.arrow", table)
    assert num_bytes == (tmp_path / "c" / "x.arrow").stat().st_size > images.nbytes
    allocated = pa.total_allocated_bytes()
    chunk = read_chunk(tmp_path / "c" / "x.arrow")
    # The pixels are a view of the memory-mapped file: no Arrow allocation, not writable.
    assert pa.total_allocated_bytes() - allocated < images.nbytes
    assert not chunk.images.flags.writeable
    np.testing.assert_array_equal(chunk.images, images)
    assert chunk.class_indices.tolist() == labels and chunk.paths == paths
    assert (chunk.classes, chunk.split, len(chunk)) == ({0: "3", 1: "7"}, "train", 10)


def test_plain_pyarrow_reads_the_tensor_column(tmp_path):
    images, _, _, table = sample_table()
    write_chunk(tmp_path / "x.arrow", table)
    read = pa.ipc.open_file(pa.memory_map(str(tmp_path / "x.arrow"))).read_all()
    np.testing.assert_array_equal(read.column("image").chunk(0).to_numpy_ndarray(), images)


def test_multi_batch_chunk_written_elsewhere_still_reads(tmp_path):
    images, labels, _, table = sample_table()
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    chunk = read_chunk(tmp_path / "x.arrow")
    np.testing.assert_array_equal(chunk.images, images)
    assert chunk.class_indices.tolist() == labels


def test_write_is_atomic_and_leaves_no_partial_file(tmp_path):
    _, _, _, table = sample_table()
    write_chunk(tmp_path / "x.arrow", table)
    write_chunk(tmp_path / "x.arrow", table)  # overwriting is a rename too
    assert os.listdir(tmp_path) == ["x.arrow"]
    (tmp_path / "y.arrow").mkdir()  # the final rename fails after the data was written
    with pytest.raises(OSError):
        write_chunk(tmp_path / "y.arrow", table)
    assert sorted(os.listdir(tmp_path)) == ["x.arrow", "y.arrow"]
    assert os.listdir(tmp_path / "y.arrow") == []


def test_bad_inputs_and_foreign_files(tmp_path):
    images, labels, paths, _ = sample_table()
    with pytest.raises(ValueError, match=r"expected uint8 \[N, H, W\] or \[N, 3, H, W\], got float32"):
        chunk_table(images.astype(np.float32), labels, paths, ["3", "7"], "train")
    with pytest.raises(ValueError, match="differ in length: 10, 9, 10"):
        chunk_table(images, labels[:9], paths, ["3", "7"], "train")
    with pytest.raises(ChunkError, match=r"missing.arrow: chunk file not found"):
        read_chunk(tmp_path / "missing.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(ChunkError, match=r"junk.arrow: not an Arrow IPC file"):
        read_chunk(tmp_path / "junk.arrow")
    other = pa.table({"a": [1, 2]})
    with pa.OSFile(str(tmp_path / "other.arrow"), "wb") as sink, pa.ipc.new_file(sink, other.schema) as w:
        w.write_table(other)
    with pytest.raises(ChunkError, match=r"other.arrow: not an mnist37 chunk"):
        read_chunk(tmp_path / "other.arrow")


def reuse_record(counts, sums, **more) -> dict:
    return {"files_key": "k" * 32, "digest": "d" * 32, "counts": np.array(counts), "pixel_sums": sums, **more}


def test_reuse_record_round_trips_through_the_footer(tmp_path):
    images, labels, paths, _ = sample_table()
    sums = pixel_sums(images, labels)
    sums.sums *= 10**9  # beyond int32
    table = chunk_table(images, labels, paths, ["3", "7"], "train", reuse=reuse_record([5, 5], sums))
    num_bytes = write_chunk(tmp_path / "x.arrow", table)
    meta = read_chunk_metadata(tmp_path / "x.arrow")
    assert (meta["num_images"], meta["num_bytes"], meta["files_key"], meta["digest"]) == (10, num_bytes, "k" * 32, "d" * 32)
    assert meta["counts"].tolist() == [5, 5] and meta["counts"].dtype == np.int64
    assert meta["pixel_sums"].classes.tolist() == [0, 1] and meta["pixel_sums"].counts.tolist() == [5, 5]
    np.testing.assert_array_equal(meta["pixel_sums"].sums, sums.sums)
    assert meta["pixel_sums"].sums.dtype == np.int64
    write_chunk(tmp_path / "plain.arrow", sample_table()[3])
    with pytest.raises(ChunkError, match=r"plain.arrow: chunk has no reuse record"):
        read_chunk_metadata(tmp_path / "plain.arrow")


def test_uri_chunk_store_and_bytes_round_trip(tmp_path):
    from mnist37.chunks import chunk_bytes, join

    images, labels, paths, table = sample_table()
    location = join((tmp_path / "store").as_uri(), "train", "x.arrow")
    assert location.startswith("file://") and not (tmp_path / "store" / "train" / "x.arrow").exists()
    num_bytes = write_chunk(location, table)
    assert (tmp_path / "store" / "train" / "x.arrow").stat().st_size == num_bytes
    assert [p.name for p in (tmp_path / "store" / "train").iterdir()] == ["x.arrow"]  # no partial left
    for source in (location, chunk_bytes(location)):
        chunk = read_chunk(source)
        np.testing.assert_array_equal(chunk.images, images)
        assert chunk.paths == paths
    with pytest.raises(ChunkError, match=r"chunk store 'nosuch://x/y': not a filesystem pyarrow can open"):
        write_chunk("nosuch://x/y", table)


def test_the_footer_keeps_sums_only_for_the_classes_with_images(tmp_path):
    """5 of 1,000 classes: 5 rows of sums in the footer; and a footer with a row for every
    class (as chunks written before held) reads as the same 5."""
    images = np.random.default_rng(1).integers(0, 256, (12, 3, 4, 5), dtype=np.uint8)
    labels = [3, 3, 17, 17, 17, 400, 400, 998, 998, 998, 999, 999]
    paths = [f"train/{label}/{i}.png" for i, label in enumerate(labels)]
    classes = [str(c) for c in range(1000)]
    sums, counts = pixel_sums(images, labels), np.bincount(labels, minlength=1000)
    write_chunk(tmp_path / "x.arrow", chunk_table(images, labels, paths, classes, "train",
                                                  reuse=reuse_record(counts, sums)))
    footer = pa.ipc.open_file(pa.memory_map(str(tmp_path / "x.arrow"))).schema.metadata
    assert footer[b"mnist37.pixel_sums_dtype"] == b"<u2"  # at most 3 images a class: 765 at most
    assert len(footer[b"mnist37.pixel_sums"]) == 5 * 2 * 3 * 4 * 5
    read = read_chunk_metadata(tmp_path / "x.arrow")["pixel_sums"]
    assert read.classes.tolist() == [3, 17, 400, 998, 999] and read.counts.tolist() == [2, 3, 2, 3, 2]
    np.testing.assert_array_equal(read.sums, sums.sums)
    # The earlier layout: a row per class of the data set, zeros where a class has no images.
    dense = np.zeros((1000, 3, 4, 5), dtype=np.int64)
    dense[sums.classes] = sums.sums
    table = chunk_table(images, labels, paths, classes, "train", reuse=reuse_record(counts, sums))
    older = {k: v for k, v in table.schema.metadata.items() if k != b"mnist37.pixel_sums_dtype"}  # int64 then
    write_chunk(tmp_path / "old.arrow", table.replace_schema_metadata(
        {**older, b"mnist37.pixel_sums": dense.astype("<i8").tobytes()}))
    old = read_chunk_metadata(tmp_path / "old.arrow")["pixel_sums"]
    assert old.classes.tolist() == read.classes.tolist() and old.counts.tolist() == read.counts.tolist()
    np.testing.assert_array_equal(old.sums, read.sums)


def test_the_footer_grows_with_the_classes_held_not_with_the_data_sets(tmp_path):
    """The same 5 classes of 10 or of 1,000 (names of one length): footers of the same size,
    naming only the 5; container records hold their nonzero counts. A chunk of the earlier
    layout (every class named, a count per class) reads as the same record."""
    images = np.random.default_rng(2).integers(0, 256, (12, 4, 5), dtype=np.uint8)
    labels = [3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 9, 9]
    paths = [f"train/{label}/{i}.png" for i, label in enumerate(labels)]
    sizes, metas = [], []
    for num_classes in (10, 1000):
        classes = [f"n{c:08d}" for c in range(num_classes)]
        counts = np.bincount(labels, minlength=num_classes)
        found = np.concatenate([counts, [1]])
        record = {**reuse_record(counts, pixel_sums(images, labels)),
                  "records": {"found": found.tolist(), "rejected_per_class": (found - np.append(counts, 0)).tolist(),
                              "ignored": 0}}
        table = chunk_table(images, labels, paths, classes, "train", reuse=record)
        sizes.append(sum(len(k) + len(v) for k, v in table.schema.metadata.items()))
        write_chunk(tmp_path / f"{num_classes}.arrow", table)
        metas.append(read_chunk_metadata(tmp_path / f"{num_classes}.arrow"))
        assert metas[-1]["counts"].tolist() == counts.tolist()
        assert metas[-1]["held_classes"] == {c: classes[c] for c in (3, 4, 5, 6, 9)}
        assert metas[-1]["records"]["found"] == found.tolist()
        assert (metas[-1]["num_classes"], read_chunk(tmp_path / f"{num_classes}.arrow").classes) == (
            num_classes, {c: classes[c] for c in (3, 4, 5, 6, 9)})
    assert abs(sizes[1] - sizes[0]) < 16, sizes  # only digits of the class count and a digest differ
    # The earlier layout, as chunks written before it hold it
    classes = [f"n{c:08d}" for c in range(1000)]
    counts = np.bincount(labels, minlength=1000)
    table = chunk_table(images, labels, paths, classes, "train", reuse=reuse_record(counts, pixel_sums(images, labels)))
    meta = {k: v for k, v in table.schema.metadata.items()
            if k not in (b"mnist37.held", b"mnist37.num_classes", b"mnist37.classes_digest")}
    meta |= {b"mnist37.classes": json.dumps(classes).encode(), b"mnist37.counts": json.dumps(counts.tolist()).encode()}
    write_chunk(tmp_path / "old.arrow", table.replace_schema_metadata(meta))
    old = read_chunk_metadata(tmp_path / "old.arrow")
    for key in ("classes_digest", "num_classes", "held_classes"):
        assert old[key] == metas[1][key], key
    assert old["counts"].tolist() == counts.tolist()


def test_a_footer_with_sums_of_another_size_does_not_parse(tmp_path):
    images, labels, paths, _ = sample_table()
    labels = np.array(labels)
    table = chunk_table(images, labels, paths, ["3", "7"], "train",
                        reuse=reuse_record([5, 5], pixel_sums(images, labels)))
    one_class = chunk_table(images[labels == 1], labels[labels == 1], paths[:5], ["3", "7"], "train",
                            reuse=reuse_record([0, 5], pixel_sums(images[labels == 1], labels[labels == 1])))
    assert table.schema.metadata[b"mnist37.pixel_sums_dtype"] == b"<u2"  # rows of 20 values, 40 bytes
    for base, raw, rows in ((table, b"\0" * (3 * 40), "2"), (table, b"\0" * 17, "2"),
                            (one_class, b"\0" * (3 * 40), r"1 \(a class with images each\) or 2 \(every class\)")):
        write_chunk(tmp_path / "x.arrow", base.replace_schema_metadata({**base.schema.metadata,
                                                                        b"mnist37.pixel_sums": raw}))
        with pytest.raises(ChunkError, match=rf"x.arrow: the reuse record in its footer does not parse \(ValueError: "
                                             rf"pixel sums of {len(raw)} bytes, expected {rows} rows of 40 bytes\)"):
            read_chunk_metadata(tmp_path / "x.arrow")


def test_sums_must_be_those_of_the_classes_with_images():
    images, labels, paths, _ = sample_table()
    with pytest.raises(ValueError, match=r"pixel sums of classes \[0, 1\], but images of classes \[1\]"):
        chunk_table(images, labels, paths, ["3", "7"], "train", reuse=reuse_record([0, 10], pixel_sums(images, labels)))


def checksummed_chunk(tmp_path, name="x.arrow"):
    images, labels, paths, _ = sample_table()
    table = chunk_table(images, labels, paths, ["3", "7"], "train",
                        reuse=reuse_record([5, 5], pixel_sums(images, labels)))
    write_chunk(tmp_path / name, table)
    return tmp_path / name, images, read_chunk_metadata(tmp_path / name)["checksum"]


def test_the_checksum_covers_pixels_labels_paths_and_the_footer_record(tmp_path):
    from mnist37.chunks import checksum

    path, images, stored = checksummed_chunk(tmp_path)
    assert stored.startswith("xxh3_128:") and len(stored) == len("xxh3_128:") + 32
    original = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    assert checksum(original) == stored
    # Any change to what a later run trusts changes the checksum.
    changed_meta = original.replace_schema_metadata({**original.schema.metadata, b"mnist37.counts": b"[5, 6]"})
    relabelled = original.set_column(1, "class_index", pa.array([1] * 10, pa.int32()))
    renamed = original.set_column(2, "path", pa.array([f"train/x/{i}.png" for i in range(10)]))
    assert len({stored, checksum(changed_meta), checksum(relabelled), checksum(renamed)}) == 4
    # The same rows cut into other record batches hash the same.
    assert checksum(pa.Table.from_batches(original.to_batches(max_chunksize=3))) == stored


def test_damaged_pixels_or_footer_are_refused_wherever_the_chunk_comes_from(tmp_path):
    from mnist37.chunks import chunk_bytes, verify_chunk

    path, images, stored = checksummed_chunk(tmp_path)
    data = bytearray(path.read_bytes())
    start = data.find(images.tobytes())
    data[start + 50] ^= 0xFF  # one pixel
    damaged = tmp_path / "damaged.arrow"
    damaged.write_bytes(data)
    for source in (damaged, damaged.as_uri(), chunk_bytes(str(damaged))):
        with pytest.raises(ChunkError, match=r": contents do not match the checksum written with them "
                                             rf"\({stored} in its footer, xxh3_128:[0-9a-f]{{32}} computed\)"):
            read_chunk(source)
    data = bytearray(path.read_bytes())
    at = data.rfind(b'[0, "3", 5]')  # the counts in the footer (the schema at the start has them too)
    data[at + 9:at + 10] = b"6"
    (tmp_path / "footer.arrow").write_bytes(data)
    assert read_chunk_metadata(tmp_path / "footer.arrow")["counts"].tolist() == [6, 5]  # it still parses
    with pytest.raises(ChunkError, match=r"footer.arrow: contents do not match the checksum"):
        verify_chunk(tmp_path / "footer.arrow")
    verify_chunk(path, stored)


def test_read_chunk_checks_it_is_the_chunk_decode_reported(tmp_path):
    path, images, stored = checksummed_chunk(tmp_path)
    other = "xxh3_128:" + "0" * 32
    with pytest.raises(ChunkError, match=rf"x.arrow: not the chunk that was decoded \(checksum {stored}, "
                                         rf"expected {other}\); was it replaced since\?"):
        read_chunk(path, expected_checksum=other)
    np.testing.assert_array_equal(read_chunk(path, expected_checksum=stored).images, images)


def test_a_chunk_of_an_older_schema_says_so(tmp_path):
    from mnist37.chunks import ChunkVersionError

    _, _, _, table = sample_table()
    old = table.replace_schema_metadata({**table.schema.metadata, b"mnist37.schema_version": b"1"})
    with pa.OSFile(str(tmp_path / "old.arrow"), "wb") as sink, pa.ipc.new_file(sink, old.schema) as w:
        w.write_table(old)
    with pytest.raises(ChunkVersionError, match=r"old.arrow: chunk schema version 1, expected 2 "
                                                r"\(written by another mnist37 version\)"):
        read_chunk(tmp_path / "old.arrow")


def test_arrow_conversions_without_pandas_give_what_pyarrow_gives():
    """The chunk's own conversions (no pandas import) against pa.array / pa.scalar /
    to_numpy / is_valid, on numbers, bytes with NULs, offsets, nulls and several chunks."""
    for values in [np.arange(5, dtype=np.int64), np.arange(9, dtype=np.int32)[::2], np.array([1.5, -2.0]),
                   np.arange(300).astype(np.uint8), np.array([], dtype=np.int16),
                   np.array([True, False, True] * 5), np.array([], dtype=bool),
                   np.array([b"a", b"bc\x00", b"", b"x\x00y", b"\xff\xfe"], dtype="S4"), np.array([b"abc"], dtype="S3")]:
        got = arrow_array(values)
        got.validate(full=True)
        assert got.equals(pa.array(values)), values
    assert arrow_strings(["a/1.png", "", "ü/2.png"]).equals(pa.array(["a/1.png", "", "ü/2.png"], pa.string()))
    assert arrow_text("train/x.tar:").equals(pa.scalar("train/x.tar:"))
    columns = [pa.array([1, None, 3, 4], pa.int8()), pa.array([5, 6, 7, 8, 9], pa.int64()).slice(2),
               pa.array([True, None, False, True, True, False, True, False, True]),
               pa.array([True, False, None, True, True, False, True, False, True, None, True]).slice(3),
               pa.array([1, None, 3, 4, None, 6, 7, 8, 9, 10], pa.int32()).slice(1, 7), pa.array([0.5, None])]
    for column in [*columns, pa.chunked_array([pa.array([1, 2], pa.uint16()), pa.array([None, 5], pa.uint16())])]:
        whole = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        expected = whole.fill_null(False if pa.types.is_boolean(whole.type) else 0).to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(numbers(column), expected)
        assert numbers(column).dtype == expected.dtype
        np.testing.assert_array_equal(valid(column), whole.is_valid().to_numpy(zero_copy_only=False))
    with pytest.raises(TypeError):
        numbers(pa.array(["a"]))


@pytest.mark.parametrize("images, dtype", [(1, "<u2"), (257, "<u2"), (258, "<u4"), (16_843_009, "<u4"),
                                           (16_843_010, "<i8")])
def test_footer_sums_take_the_narrowest_type_that_holds_them(images, dtype):
    """Sums of white pixels over `images` images of a class: uint16 up to 257 images, uint32
    up to 16,843,009, else int64 (as every chunk before the type was recorded)."""
    from mnist37.chunks import sums_dtype

    assert sums_dtype(np.array([[0, 255 * images], [7, 3]], dtype=np.int64)) == dtype
    assert sums_dtype(np.array([-1, 3], dtype=np.int64)) == "<i8"


def test_sums_of_a_class_of_300_images_round_trip_as_uint32(tmp_path):
    """300 white 2x3 images of one class sum to 76,500 a pixel: past uint16, kept as uint32
    and read back as the same int64 sums; a footer whose type is not one of ours is refused."""
    images = np.full((301, 2, 3), 255, dtype=np.uint8)
    labels = [0] * 300 + [1]
    paths = [f"train/{label}/{i}.png" for i, label in enumerate(labels)]
    sums, counts = pixel_sums(images, labels), np.bincount(labels)
    table = chunk_table(images, labels, paths, ["a", "b"], "train", reuse=reuse_record(counts, sums))
    write_chunk(tmp_path / "x.arrow", table)
    assert table.schema.metadata[b"mnist37.pixel_sums_dtype"] == b"<u4"
    read = read_chunk_metadata(tmp_path / "x.arrow")["pixel_sums"]
    assert read.sums.dtype == np.int64 and read.sums[0].tolist() == [[76_500] * 3] * 2
    np.testing.assert_array_equal(read.sums, sums.sums)
    write_chunk(tmp_path / "odd.arrow", table.replace_schema_metadata(
        {**table.schema.metadata, b"mnist37.pixel_sums_dtype": b"<f8"}))
    with pytest.raises(ChunkError, match=r"odd\.arrow: the reuse record in its footer does not parse "
                                         r"\(ValueError: pixel sums of type '<f8', expected one of"):
        read_chunk_metadata(tmp_path / "odd.arrow")
