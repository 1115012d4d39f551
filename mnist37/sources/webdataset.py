"""WebDataset tar shards: `<split>-*.tar` or `<split>/*.tar`, members `<key>.<image>` and `<key>.cls`.

An image member is any of images.EXTENSIONS (`.png`, `.jpg`, `.jpeg`, `.webp`, ...), decoded by
its bytes.

`.cls` holds the class index as text; class names come from `classes.txt` beside the shards
(one a line, index order), else the indices as text. A shard is one tar file, read as a stream
(mnist37.sources.tar); a record is a run of members sharing a key. The converter writes this
layout (mnist37.sources.webdataset_writer).
"""

from __future__ import annotations

import re

import numpy as np

from mnist37.png import Blobs
from mnist37.sources import tar
from mnist37 import images
from mnist37.sources import base
from mnist37.sources.base import (ContainerShard, Records, check_splits, class_map, container_plan, files_by_split,
                                  selected_classes)
from mnist37.storage.files import Root, open_input
from mnist37.sources.protocol import PlanRequest, SourcePlan
from mnist37.sources.tar import TarCutShort

NAME = "webdataset"
EXTENSION = ".tar"
SPLIT_FILE = re.compile(r"^(?P<split>.+?)-[^-]*\.tar$")
CLASSES_FILE = "classes.txt"  # class names, one a line, in index order
# Member extensions that hold an image (lower case; decoded by their bytes, mnist37.images).
IMAGE_MEMBERS = np.array([ext[1:].encode() for ext in images.EXTENSIONS])


def containers(root: Root, listed) -> dict[str, list[str]]:
    """split -> its tar shards: `<split>-*.tar` in the root, or a folder per split."""
    return files_by_split(root, listed, EXTENSION, SPLIT_FILE)


def check(root: Root, splits, classes) -> list[str]:
    """Every split has its tar shards (base.check_containers)."""
    return base.check_containers(root, NAME, splits, classes)


def plan(request: PlanRequest) -> SourcePlan:
    """Classes from classes.txt, one shard per tar file."""
    root, splits = request.root, check_splits(request.root, NAME, request.splits)
    names, declared = _names(root)
    classes = selected_classes(names, list(request.classes), str(root), "no " + CLASSES_FILE)
    mapping = class_map(names, classes, str(root))
    shards = [ContainerShard(split, index, request.shard_size, tuple(classes), NAME, source, 0, -1, mapping, declared)
              for split, files in splits.items() for index, source in enumerate(files)]
    return container_plan(request, NAME, classes, shards, splits)


def _names(root: Root) -> tuple[list[str] | None, int]:
    try:
        with open_input(root, CLASSES_FILE) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        return None, 0
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names, len(names)


def member_key(name: bytes) -> tuple[bytes, bytes] | None:
    """WebDataset's split of a member name into (key, extension): at the first dot of the base name."""
    dot = name.find(b".", name.rfind(b"/") + 1)
    return (name[:dot], name[dot + 1:].lower()) if dot >= 0 else None


def member_keys(names: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """WebDataset's split of member names ('S' [M]) at the first dot of the base name (as
    `member_key`), for all at once: (keys 'S' [M], has a dot bool [M], is an image (its
    extension one of IMAGE_MEMBERS), is cls: bool [M], ASCII case ignored)."""
    width = names.dtype.itemsize
    dot = np.strings.find(names, b".", np.strings.rfind(names, b"/") + 1)
    has_dot = dot >= 0
    chars = np.ascontiguousarray(names).view(np.uint8).reshape(len(names), width)
    keys = np.where(np.arange(width) < dot[:, None], chars, 0).astype(np.uint8).view(f"S{width}").ravel()
    extensions = np.strings.lower(np.strings.slice(names, dot + 1, None))
    return keys, has_dot, has_dot & np.isin(extensions, IMAGE_MEMBERS), has_dot & (extensions == b"cls")


def read_records(shard: ContainerShard, root: Root, limit: int | None = None) -> Records:
    """One record per run of members sharing a key: its image member's bytes and its `.cls` label
    (members of other kinds are not read; of two members of one kind, the last counts). A tar
    cut short rejects the record it cuts (and ends the shard); a damaged header rejects the
    record being read and is named. With `limit`, about that many records are read (the
    members of two each)."""
    with open_input(root, shard.source) as f:
        members = tar.members(f, shard.source, None if limit is None else 2 * limit)
    keys, has_dot, is_image, is_cls = member_keys(members.names)
    taken = np.flatnonzero(has_dot)  # members without an extension belong to no record
    keys, is_image, is_cls = keys[taken], is_image[taken], is_cls[taken]
    first = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=bool)
    starts, record_of = np.flatnonzero(first), np.cumsum(first) - 1  # record of each member
    image, cls = np.full(len(starts), -1), np.full(len(starts), -1)
    image[record_of[is_image]] = taken[is_image]  # in order, so the last member of a kind wins
    cls[record_of[is_cls]] = taken[is_cls]
    record_keys = keys[starts]
    texts = [members.data[i] if i >= 0 else None for i in cls.tolist()]
    data = [members.data[i] if i >= 0 else None for i in image.tolist()]
    problems: dict[int, str] = {}
    error = members.error
    if error is not None:
        reason = error.reason if isinstance(error, TarCutShort) else str(error).removeprefix(f"{shard.source}: ")
        # The record being read when the stream ended: the last one, unless the member cut
        # short starts another key (or no member was cut and the last record is whole).
        cut = member_key(error.member) if isinstance(error, TarCutShort) and error.member else None
        last = len(record_keys) - 1
        whole = last >= 0 and data[last] is not None and texts[last] is not None
        if last < 0 or (cut[0] != record_keys[last] if cut else isinstance(error, TarCutShort) and whole):
            key = cut[0] if cut else b"<after the last whole record>" if isinstance(error, TarCutShort) else b"<start>"
            record_keys = np.concatenate([record_keys, np.array([key], dtype="S")])
            texts.append(None)
            data.append(None)
        problems[len(record_keys) - 1] = reason
    labels, has_label = _labels(texts, problems)
    for i in np.flatnonzero([d is None for d in data]).tolist():
        if i not in problems:
            problems[i] = "no image member" if has_label[i] else "no image or .cls member"
    for i in np.flatnonzero(~has_label).tolist():
        problems.setdefault(i, "no .cls member")
    for i in problems:
        data[i] = None
    return Records(shard.source, record_keys, labels, has_label, Blobs.of(data), problems)


def _labels(texts: list[bytes | None], problems: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """The `.cls` texts as class indices (int64 [N], valid where the bool [N] says); a text
    that is not an integer is a problem of its record (unless it already has one)."""
    try:
        return (np.array([int(t) if t is not None else 0 for t in texts], dtype=np.int64),
                np.array([t is not None for t in texts], dtype=bool))
    except (ValueError, OverflowError):
        pass
    labels, has_label = np.zeros(len(texts), dtype=np.int64), np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        if text is None:
            continue
        try:
            labels[i], has_label[i] = int(text), True
        except (ValueError, OverflowError):
            problems.setdefault(i, f"class {text[:20].decode('utf-8', 'replace')!r} is not an integer")
    return labels, has_label


# The shard decoded, and its records as the converter copies them: from `read_records`.
read_shard, converter_records = base.read_shard, base.converter_records
