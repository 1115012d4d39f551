"""What container sources share: their shards, their records, class maps and the bulk decode.

The protocol every format implements, the folder's included, is mnist37.sources.protocol.
A container data set (Parquet, WebDataset tar shards, IDX: one module each in this package)
is planned into `ContainerShard`s, each a piece of one container file decoded by one task into
one chunk. A format module reads a shard's records in bulk as columns (`Records`: keys,
labels, encoded images in one buffer, problems), and `decode_records` decodes and counts them
as the folder path does (images.decode_images): every record used, rejected
(with its class when known and a reason) or ignored (a class not selected). Per record, little
but the image decode is left.

A record is named `<container path>:<key>`: the tar member key, the Parquet row, the IDX
record index (`train-00000-of-00001.parquet:17`, `train-000000.tar:000042`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from mnist37 import DatasetError, Mnist37Error
from mnist37.arrays import arrow_array, arrow_text
from mnist37 import images
from mnist37.images import Decoding, FirstImages, decode_images
from mnist37.png import Blobs
from mnist37.sources import check_splits, format_module
from mnist37.storage.files import Root, stat
from mnist37.sources.keys import container_key, shard_digest
from mnist37.sources.protocol import PlanRequest, ShardRead, SourcePlan
from mnist37.storage.locations import under


class FormatError(Mnist37Error, ValueError):
    """A container file that is not what its format says (one line: the file and what is wrong)."""


def text(name: bytes) -> str:
    """A name read from a container as text (bytes that are not UTF-8 kept, as os.fsdecode keeps them)."""
    return name.decode("utf-8", "surrogateescape")


def record_path(source: str, key: str | int) -> str:
    """How a record is named in rejections, chunks and reports: `<container>:<key>`."""
    return f"{source}:{key}"


@dataclass(eq=False)
class ContainerShard:
    """A piece of one container file, decoded by one task into one chunk."""

    split: str
    index: int
    shard_size: int  # as configured (container shards are cut near it, at row-group or file ends)
    classes: tuple[str, ...]  # selected classes, in index order
    format: str  # "parquet" | "webdataset" | "idx"
    source: str  # the container file, relative to the root
    start: int  # first row group (Parquet) or record (IDX); 0 for a tar
    stop: int  # one past the last; -1 for a tar (read to its end)
    class_map: np.ndarray  # int32 [L]: label value -> selected class index, -1 = not selected
    declared: int  # labels the format declares (values 0..declared-1); 0 = names not declared
    labels_source: str = ""  # IDX: the labels file
    image_column: str = "image"
    label_column: str = "label"
    num_records: int = 0  # when known before reading (Parquet, IDX); 0 for a tar

    @property
    def name(self) -> str:
        return f"{self.split}-{self.format}-{self.shard_size}-{self.index:06d}"

    def __len__(self) -> int:
        return self.num_records

    changed = "written from other records (container files, range or settings differ)"

    def found(self) -> None:
        """None: no listing on the driver counts a container's records per class; its chunk
        records how many of each class it found."""
        return None

    def resolved(self, get) -> ContainerShard:
        """Itself: a container shard holds all it needs."""
        return self

    def key(self, root: Root, decoding: Decoding) -> str:
        """What the chunk is made from (keys.container_key): the container files' (path, size,
        mtime), the range, the columns, the class selection, the decode settings and how the
        digest is made (a chunk recording another kind of digest is decoded again, so that a
        fingerprint never mixes the two). Raises OSError when a container cannot be stat'ed."""
        stamps = [(path, *stat(root, path)) for path in filter(None, (self.source, self.labels_source))]
        return container_key(stamps, [self.format, self.start, self.stop, self.image_column, self.label_column,
                                      self.declared, list(decoding.shape)], self.class_map, decoding.settings)

    def read(self, root: Root, decoding: Decoding) -> ShardRead:
        """Every record of the shard, decoded and counted, by its format's module."""
        try:
            key = self.key(root, decoding)
        except OSError as e:
            if isinstance(e, Mnist37Error):  # a store's refusal: one line naming the object, as it is
                raise
            raise FormatError(f"{self.source}: cannot read ({e.strerror or e})") from None
        done = format_module(self.format).read_shard(self, root, decoding)
        done.files_key = key
        return done

    def records(self, root: Root, shape: tuple[int, int]):
        """(record path, class index or None, encoded bytes or None, reason) of each record, for
        the converter; None as class index means a class not selected (ignored), -1 a record
        without a usable class."""
        return format_module(self.format).converter_records(self, root, shape)


def check_containers(root: Root, fmt: str, splits: Sequence[str], classes: Sequence[str]) -> list[str]:
    """`Source.check` of a container format: every split has its files (sources.check_splits);
    the classes as given ("all" is resolved by `plan`, from the headers)."""
    check_splits(root, fmt, tuple(splits))
    return list(classes)


def container_plan(request: PlanRequest, fmt: str, classes: list[str], shards: list[ContainerShard],
                   splits: dict[str, list[str]], first: FirstImages | None = None, as_stored: str = "") -> SourcePlan:
    """A container format's SourcePlan; unless its headers said (`first`: IDX), what the first
    `request.wanted` training images that decode say of size and color."""
    if first is None and request.wanted:
        first = first_images(request.root, [s for s in shards if s.split == request.train_split], request.wanted)
    summary = ", ".join(f"{split} {len(files)} files" for split, files in splits.items())
    return SourcePlan(fmt, list(classes), shards, summary, first, as_stored=as_stored)


def check_sizes(root: Root, split: str, sizes: list[tuple[int, int]], expected: tuple[int, int]) -> None:
    """DatasetError, naming the sizes found and --image-size, when the images looked at in
    `split` (their (H, W) `sizes`) show a data set of several sizes: without image_size every
    image must have the `expected` size, so most would be rejected after the whole decode.
    A stray file of another size (at most one of those looked at, or under a quarter of them)
    is left to the decode, which rejects and counts it."""
    other = [size for size in sizes if size != expected]
    if len(other) < 2 or 4 * len(other) < len(sizes):
        return
    found = list(dict.fromkeys(sizes))
    shown = ", ".join(f"{h}x{w}" for h, w in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    what = f"images of different sizes ({shown}" if len(found) > 1 else f"images of {shown} (all"
    raise DatasetError(f"{split}/ in {root}: {what} of {len(sizes)} looked at), where every image must have the "
                       f"first training image's size ({expected[0]}x{expected[1]}) unless --image-size is given; "
                       f"pass --image-size HxW (e.g. --image-size 64x64) to resize them all to one size")


def class_map(declared_names: list[str] | None, classes: list[str], where: str,
               size: int | None = None) -> np.ndarray:
    """int32 [L]: for each label value, its index in `classes`, or -1."""
    if declared_names is not None:
        index = {name: i for i, name in enumerate(declared_names)}
        missing = [c for c in classes if c not in index]
        if missing:
            raise FormatError(f"{where}: class {missing[0]!r} is not among its class names {declared_names}")
        mapping = np.full(size or len(declared_names), -1, dtype=np.int32)
        for i, c in enumerate(classes):
            mapping[index[c]] = i
        return mapping
    values = []
    for c in classes:
        if not c.isdigit():
            raise FormatError(f"{where}: declares no class names, so classes are label values; got {c!r}")
        values.append(int(c))
    mapping = np.full(max(values) + 1, -1, dtype=np.int32)
    mapping[values] = np.arange(len(values), dtype=np.int32)
    return mapping


@dataclass
class Records:
    """A Parquet or tar shard's records, in order, undecoded: one entry each, as columns, so
    that a shard is read, checked and counted in bulk rather than a record at a time."""

    source: str  # the container file, relative to the root
    keys: np.ndarray  # int64 [N] Parquet rows, or 'S' [N] tar keys: record_path(source, key)
    labels: np.ndarray  # int64 [N]: the label value as stored; meaningless where not has_label
    has_label: np.ndarray  # bool [N]: False where the label is missing or cannot be read
    data: Blobs  # [N] encoded images; missing where the record has none (or a problem)
    problems: dict[int, str]  # record index -> why it cannot be used before decoding

    def __len__(self) -> int:
        return len(self.data)

    def path(self, i: int) -> str:
        key = self.keys[i]
        return record_path(self.source, text(key) if isinstance(key, bytes) else int(key))

    def paths(self, index: np.ndarray) -> pa.StringArray:
        """record_path of the records at `index` (int [K]), built by Arrow, not one string at a time."""
        import pyarrow.compute as pc  # here, not at the top: its import is paid by container shards alone

        try:
            keys = pc.cast(arrow_array(self.keys[index]), pa.string())
        except pa.ArrowInvalid:  # a tar key that is not UTF-8: named with replacement characters
            keys = pa.array([k.decode("utf-8", "replace") for k in self.keys[index].tolist()], pa.string())
        return pc.binary_join_element_wise(arrow_text(record_path(self.source, "")), keys, arrow_text(""))

    def key_bytes(self, index: np.ndarray) -> bytes:
        """The keys at `index` as bytes (fixed width), for the shard's digest."""
        return np.ascontiguousarray(self.keys[index]).tobytes()


class Record(NamedTuple):
    path: str  # record_path(container, key)
    label: int | None  # the label value as stored; None when it cannot be read
    data: bytes | None  # encoded image; None when the record has none
    problem: str | None  # why the record cannot be used before decoding, if it cannot


def record_classes(labels: np.ndarray, has_label: np.ndarray, shard: ContainerShard) -> np.ndarray:
    """int64 [N]: each record's selected class index; -1 for a class not selected, C for a
    label that is missing or outside the declared range (see `label_problem`)."""
    classes, declared, mapping = len(shard.classes), shard.declared, shard.class_map
    known = has_label & ((labels >= 0) & (labels < declared) if declared else True)
    mapped = known & (labels >= 0) & (labels < len(mapping))
    selected = np.where(known, -1, classes)
    selected[mapped] = mapping[labels[mapped]]
    return selected


def label_problem(label: int | None, declared: int) -> str:
    """Why a record's label gives no class."""
    return "no label" if label is None else f"label {label} out of range 0..{declared - 1}"


def iter_records(shard: ContainerShard, root: Root, limit: int | None = None):
    """The records of a Parquet or tar shard, in order, undecoded, one Record each (with
    `limit`, about the first `limit`: the planner's look at the first images)."""
    records = format_module(shard.format).read_records(shard, root, limit)
    labels = records.labels.tolist()
    for i, (data, has_label) in enumerate(zip(records.data, records.has_label.tolist())):
        yield Record(records.path(i), labels[i] if has_label else None, data, records.problems.get(i))


def read_shard(shard: ContainerShard, root: Root, decoding: Decoding) -> ShardRead:
    """The `read_shard` of a format read as `Records` (Parquet, WebDataset): the shard's
    records, read in bulk by its module's `read_records`, decoded and counted (`decode_records`)."""
    return decode_records(format_module(shard.format).read_records(shard, root), shard, decoding)


def converter_records(shard: ContainerShard, root: Root, shape: tuple[int, int]):
    """The `converter_records` of a format read as `Records` (ContainerShard.records): the
    encoded bytes as they are."""
    records = format_module(shard.format).read_records(shard, root)
    for i, c in enumerate(record_classes(records.labels, records.has_label, shard).tolist()):
        path, problem = records.path(i), records.problems.get(i)
        if c == len(shard.classes):
            label = int(records.labels[i]) if records.has_label[i] else None
            yield path, -1, None, problem or label_problem(label, shard.declared)
        else:
            yield path, (c if c >= 0 else None), records.data[i], problem


def decode_records(records: Records, shard: ContainerShard, decoding: Decoding) -> ShardRead:
    """A shard's records, decoded and counted: every record used, rejected (with its class
    when known and a reason) or ignored (a class not selected). The digest covers the shard's
    range, then the keys, sizes and bytes of its records read (those of a selected class or of
    none, with image bytes), in order. `files_key` is left to the caller (ContainerShard.read)."""
    classes = len(shard.classes)
    selected = record_classes(records.labels, records.has_label, shard)
    counted = np.flatnonzero(selected >= 0)  # the others: classes not selected, ignored
    problems = {i: p for i, p in records.problems.items() if selected[i] >= 0}
    for i in np.flatnonzero(selected == classes).tolist():
        problems.setdefault(i, label_problem(int(records.labels[i]) if records.has_label[i] else None, shard.declared))
    todo = counted[~np.isin(counted, list(problems))] if problems else counted
    done = decode_images(records.data.take(todo), lambda j: records.path(todo[j]), decoding)
    images, kept = done.images, done.kept
    problems.update((int(todo[j]), reason) for j, reason in done.reasons.items())
    used, refused = todo[kept], np.array(sorted(problems), dtype=np.int64)
    hashed = counted[records.data.present[counted]]  # counted, with bytes
    data = records.data.take(hashed)
    return ShardRead(
        images, selected[used].astype(np.int32), records.paths(used),
        [(records.path(i), problems[i]) for i in refused.tolist()],
        shard_digest(shard.source, shard.start, shard.stop, records.key_bytes(hashed),
                     data.lengths.astype("<i8").tobytes(), data.joined()),
        "", container_counts(np.bincount(selected[counted], minlength=classes + 1),
                             np.bincount(selected[refused], minlength=classes + 1), len(records) - len(counted)),
        dict(done.conversions))


def container_counts(found: np.ndarray, rejected_per_class: np.ndarray, ignored: int) -> dict:
    """What a container shard's chunk records of its records (ShardRead.records)."""
    return {"found": np.asarray(found, dtype=np.int64).tolist(),
            "rejected_per_class": np.asarray(rejected_per_class, dtype=np.int64).tolist(), "ignored": int(ignored)}


def first_images(root: Root, shards: list[ContainerShard], wanted: int, probes: int = 100) -> FirstImages:
    """images.first_images of the first records of `shards` (the training split's) that have
    image bytes, looking at most at `probes` of them."""
    def items():
        seen = 0
        for shard in shards:
            for record in iter_records(shard, root, limit=probes):
                if record.data is None:
                    continue
                yield record.path, record.data
                seen += 1
                if seen >= probes:
                    return

    try:
        return images.first_images(items(), wanted, unit="records")
    except ValueError:  # no records with image bytes at all
        raise FormatError(f"{root}: no training images found to take the image shape from") from None


def selected_classes(names: list[str] | None, classes: list[str], where: str, missing: str) -> list[str]:
    """The classes a run selects: `classes`, or every declared name for ["all"]; FormatError
    when ["all"] meets a data set that declares no names (`missing` says which were looked for)."""
    if classes != ["all"]:
        return classes
    if names is None:
        raise FormatError(f"{where}: classes = all, but it declares no class names ({missing}); "
                          "give the classes (label values) with --classes")
    return list(names)


def files_by_split(root: Root, listed, extension: str, pattern, prefixes: tuple[str, ...] = ("",)) -> dict[str, list[str]]:
    """split -> its container files (sorted, relative to the root): files named `<split>...`
    by `pattern` right in the root (or in the first of `prefixes` that has any), else a folder
    per split holding files ending in `extension`. `listed` lists a folder (files.entries, or
    a memo of it)."""
    found: dict[str, list[str]] = {}
    for prefix in prefixes:
        for name in listed(under(root, prefix))[0]:
            if name.endswith(extension) and (m := pattern.match(name)):
                found.setdefault(m["split"], []).append(f"{prefix}/{name}" if prefix else name)
        if found:
            return found
    for split in listed(root)[1]:  # a folder per split
        names = [f"{split}/{n}" for n in listed(under(root, split))[0] if n.endswith(extension)]
        if names:
            found[split] = names
    return found
