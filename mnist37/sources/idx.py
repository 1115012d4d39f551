"""MNIST's IDX files: `<split>-images-idx3-ubyte` and `<split>-labels-idx1-ubyte`, plain or `.gz`.

Class names are the label values as text ("0".."9"); pixels are read as they are (no
decoding). A shard is a range of records; a local plain file's pixels are mapped, not read.
The converter writes this layout (mnist37.sources.idx_writer).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import mmap
import os
import re
import struct

import numpy as np
import pyarrow as pa

from mnist37.arrays import arrow_array, arrow_text
from mnist37.storage.retries import ObjectStoreError
from mnist37.storage.locations import is_uri
from mnist37.images import Decoding, FirstImages
from mnist37.sources.base import (ContainerShard, FormatError, check_containers, check_splits, class_map,
                                  container_counts, container_plan, record_path)
from mnist37.storage.files import Root, entries, open_input, stat
from mnist37.sources.keys import shard_digest
from mnist37.sources.protocol import PlanRequest, ShardRead, SourcePlan

NAME = "idx"
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
IMAGES_FILE = re.compile(r"^(?P<split>.+)-images[-.]idx3-ubyte(?P<gz>\.gz)?$")
_LABELS_FILE = "{split}-labels-idx1-ubyte"


def containers(root: Root, listed) -> dict[str, list[str]]:
    """split -> [its images file], for each images file right in the root."""
    found: dict[str, list[str]] = {}
    for name in listed(root)[0]:
        if m := IMAGES_FILE.match(name):
            found.setdefault(m["split"], []).append(name)
    return found


# Bytes per request when an object is read front to back (an IDX .gz up to a task's records).
OBJECT_READ = 1 << 22


@contextlib.contextmanager
def _open(root: Root, path: str, front_to_back: bool = False):
    """An IDX file, decompressed when it is a .gz, closed on leaving the block. An object's .gz
    is read through a buffer, so gzip's small reads become few requests: 64 KiB for a header,
    OBJECT_READ bytes at a time when `front_to_back` (up to a task's records)."""
    with open_input(root, path) as f:
        if not path.endswith(".gz"):
            yield f
            return
        buffered = io.BufferedReader(f, OBJECT_READ if front_to_back else 1 << 16) if is_uri(root) else f
        with gzip.GzipFile(fileobj=buffered, mode="rb") as gz:
            yield gz


def _header(root: Root, path: str, magic: int, ndim: int) -> tuple[int, ...]:
    """The sizes an IDX header declares; checks the magic and, for a plain file, the length."""
    with _open(root, path) as f:
        try:
            head = f.read(4 + 4 * ndim)
        except ObjectStoreError:
            raise
        except (OSError, EOFError) as e:
            raise FormatError(f"{path}: not a readable IDX file ({e})") from None
    if len(head) < 4 + 4 * ndim:
        raise FormatError(f"{path}: IDX header cut short ({len(head)} of {4 + 4 * ndim} bytes)")
    found, *sizes = struct.unpack(f">I{ndim}I", head)
    if found != magic:
        raise FormatError(f"{path}: expected IDX magic 0x{magic:08x}, found 0x{found:08x}")
    if not path.endswith(".gz"):
        expected = 4 + 4 * ndim + int(np.prod(sizes))
        actual = stat(root, path)[0]
        if actual != expected:
            raise FormatError(f"{path}: header declares {' x '.join(map(str, sizes))} bytes of data "
                              f"({expected} bytes in all), but the file has {actual}")
    return tuple(sizes)


def _labels_file(root: Root, images: str) -> str:
    match = IMAGES_FILE.match(images.rpartition("/")[2])
    base = _LABELS_FILE.format(split=match["split"])
    # The labels file is named as its images file is: train-labels-idx1-ubyte or train-labels.idx1-ubyte.
    separator = images[len(match["split"]) + len("-images")]
    files = set(entries(root)[0])
    for name in (base.replace("-idx1", separator + "idx1"), base.replace("-idx1", separator + "idx1") + ".gz"):
        if name in files:
            return name
    raise FormatError(f"{root}: {images} has no labels file ({base} or {base}.gz)")


def _read(root: Root, path: str, offset: int, size: int) -> bytes | memoryview:
    """Up to `size` bytes at `offset` of an IDX file: a local plain file's are mapped, not
    copied (the chunk is written straight from the page cache); an object's are one ranged
    request; a .gz is decompressed from its start up to there."""
    if not is_uri(root) and not path.endswith(".gz"):
        with open(os.path.join(root, path), "rb") as f:
            length = os.fstat(f.fileno()).st_size
            if offset >= length or size <= 0:
                return b""
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(mapped)[offset:offset + size]
    with _open(root, path, front_to_back=True) as f:
        f.seek(offset)
        return f.read(size)


def check(root: Root, splits, classes) -> list[str]:
    """Every split has its images file (base.check_containers)."""
    return check_containers(root, NAME, splits, classes)


# Why decode settings do not apply to IDX data (SourcePlan.as_stored).
AS_STORED = "IDX images are read as they are (gray, their own size)"


def plan(request: PlanRequest) -> SourcePlan:
    """Both splits' headers checked against each other and the file sizes; shards of
    `shard_size` records; classes = all takes the label values of the training split."""
    root, shape, classes = request.root, request.shape, list(request.classes)
    splits = check_splits(root, NAME, request.splits)
    pairs = {}
    for split, files in splits.items():
        images = files[0]
        labels = _labels_file(root, images)
        n, rows, cols = _header(root, images, IMAGES_MAGIC, 3)
        (m,) = _header(root, labels, LABELS_MAGIC, 1)
        if n != m:
            raise FormatError(f"{images}: {n} images, but {labels} has {m} labels")
        if shape is not None and tuple(shape) != (rows, cols):
            raise FormatError(f"{images}: images are {rows}x{cols}, image_shape says {shape[0]}x{shape[1]}")
        pairs[split] = (images, labels, n, (rows, cols))
    shapes = {p[3] for p in pairs.values()}
    if len(shapes) > 1:
        raise FormatError(f"{root}: IDX splits differ in image shape: {sorted(shapes)}")
    if classes == ["all"]:
        images, labels, n, _ = pairs[request.train_split]
        values = _read(root, labels, 8, n)
        classes = [str(v) for v in np.unique(np.frombuffer(values, dtype=np.uint8))]
    mapping = class_map(None, classes, f"{root}/{pairs[request.train_split][1]}")
    mapping = np.concatenate([mapping, np.full(256 - len(mapping), -1, dtype=np.int32)])
    shards = []
    for split, (images, labels, n, _) in pairs.items():
        for index, start in enumerate(range(0, n, request.shard_size)):
            stop = min(start + request.shard_size, n)
            shards.append(ContainerShard(split, index, request.shard_size, tuple(classes), NAME, images, start, stop,
                                         mapping, 256, labels_source=labels, num_records=stop - start))
    return container_plan(request, NAME, classes, shards, splits, FirstImages(shapes.pop(), 1, 0),  # gray, as stored
                          AS_STORED)


def read_idx(shard: ContainerShard, root: Root, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 [N, H, W] pixels, uint8 [N] labels, content digest) of the shard's records."""
    n, size = shard.stop - shard.start, shape[0] * shape[1]
    pixels = _read(root, shard.source, 16 + shard.start * size, n * size)
    labels = _read(root, shard.labels_source, 8 + shard.start, n)
    for path, data, expected in ((shard.source, pixels, n * size), (shard.labels_source, labels, n)):
        if len(data) != expected:  # a .gz whose header promises more than it holds
            raise FormatError(f"{path}: header declares more records than the file holds "
                              f"(records {shard.start}..{shard.stop - 1} cut short)")
    return (np.frombuffer(pixels, dtype=np.uint8).reshape(n, *shape), np.frombuffer(labels, dtype=np.uint8),
            shard_digest(shard.source, shard.start, shard.stop, labels, pixels))


def read_shard(shard: ContainerShard, root: Root, decoding: Decoding) -> ShardRead:
    """The shard's records: pixels as they are, every record of a selected class used."""
    import pyarrow.compute as pc  # here, not at the top: its import is paid by IDX shards alone

    classes = len(shard.classes)
    pixels, labels, digest = read_idx(shard, root, decoding.shape)
    selected = shard.class_map[labels]
    keep = selected >= 0
    idx = np.flatnonzero(keep)
    found = np.bincount(selected[keep], minlength=classes + 1)
    paths = pc.binary_join_element_wise(arrow_text(record_path(shard.source, "")),
                                        pc.cast(arrow_array(idx + shard.start), pa.string()), arrow_text(""))
    return ShardRead(pixels[keep] if len(idx) < len(labels) else pixels, selected[keep].astype(np.int32), paths, [],
                     digest, "", container_counts(found, np.zeros(classes + 1), int(len(labels) - len(idx))))


def converter_records(shard: ContainerShard, root: Root, shape: tuple[int, int]):
    """The converter's records (ContainerShard.records): each IDX image encoded as a PNG."""
    from PIL import Image

    pixels, labels, _ = read_idx(shard, root, shape)
    for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
        c = int(shard.class_map[label])
        if c < 0:
            yield record_path(shard.source, shard.start + i), None, None, None
            continue
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        yield record_path(shard.source, shard.start + i), c, out.getvalue(), None
