"""Shards into chunks: the per-shard decode step, one reuse check for every kind of shard.

`decode_shard` is the whole per-shard step as a plain function; `mnist37.on_ray.tasks` runs it
as a Ray task. A shard of any format answers the same questions (sources.protocol.Shard: `key`,
what would its chunk be made from now; `read`, its images decoded, every file or record
accounted for; `found`, its files per class when the plan knows them) and decodes into the
same chunks.

A shard whose chunk already exists with the same key is not decoded again (`reusable`): its
counts, pixel sums and digest come from the chunk's metadata, once the whole chunk is verified
against its checksum. A chunk that is there but cannot be reused (damaged, of another data set
or mnist37 version, written from other files) is decoded again, and the DecodedShard says why
(`discarded`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist37 import Mnist37Error
from mnist37.storage import partials
from mnist37.chunks import (CHECKSUM_KEY, ChunkError, ChunkNotFoundError, chunk_table, classes_digest, join,
                            read_chunk_metadata, verify_chunk, write_chunk)
from mnist37.memory import peak_rss_bytes, reuse_freed_memory
from mnist37.storage.locations import is_uri
from mnist37.prototypes import ClassSums, pixel_sums
from mnist37.images import Decoding
from mnist37.sources.protocol import Shard

@dataclass
class DecodedShard:
    """What a decode task sends back: small numbers, never the images."""

    split: str
    index: int
    chunk_path: str
    num_files: int  # listed (container shards: records read of the selected classes, or of no readable class)
    # int64 [C + 1]: files (records) per class, found = counts + rejected per class; the last
    # slot counts records whose class could not be read (containers only; 0 for folders)
    found: np.ndarray
    num_images: int  # decoded and kept: num_files - len(rejected)
    rejected: list[tuple[str, str]]  # (path, reason) of each file left out
    num_bytes: int
    digest: str  # content digest of the files (decode.file_digest, combined)
    checksum: str  # of the chunk (chunks.checksum): what a reader of chunk_path must find
    counts: np.ndarray  # int64 [C], images kept per class
    # Of the classes the shard holds only (k rows, never C); None unless asked for (training shards)
    pixel_sums: ClassSums | None
    reused: bool  # True when the chunk from an earlier run was still valid
    # Why a chunk found at chunk_path was not reused but decoded again, naming it (damaged,
    # another data set, files changed since); "" when there was none, it was reused, or reuse is off.
    discarded: str
    elapsed_s: float
    peak_rss_bytes: int = 0  # of the process that ran it
    rejected_per_class: np.ndarray | None = None  # int64 [C + 1], as `found`: found = counts + rejected
    ignored: int = 0  # records of classes not selected (container formats)
    conversions: dict[str, int] = field(default_factory=dict)  # "CMYK to RGB" -> images converted so
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, "JPEG data named .png")


def chunk_path(chunk_dir: str | Path, shard: Shard) -> str:
    """Where the shard's chunk lives: a path, or a URI when `chunk_dir` is one."""
    return join(chunk_dir, shard.split, f"{shard.name}.arrow")


def clean_partials(chunk_dir: Path) -> int:
    """Remove the temporary chunks and listings that killed writers left in a local chunk
    folder, never one a running writer holds (mnist37.storage.partials); return how many."""
    folders = [chunk_dir / ".listings", *(p for p in chunk_dir.glob("*") if p.is_dir())] if chunk_dir.is_dir() else []
    return sum(partials.clean(folder) for folder in folders)


def reusable(path: str, shard: Shard, key: Callable[[], str], verify: bool = True,
             shape: tuple[int, ...] | None = None) -> tuple[dict | None, str]:
    """(the chunk's reuse record, "") if the chunk at `path` is intact and was written from
    exactly what `key()` says the shard is made from now; else (None, why not), the reason ""
    when there is no chunk at all or the shard's files cannot be stat'ed (decoding says which).
    The cheap checks come first: the key is computed only when there is a chunk, and the chunk
    is hashed only when it would be reused."""
    try:
        meta = read_chunk_metadata(path)
    except ChunkNotFoundError:
        return None, ""
    except ChunkError as e:
        return None, str(e)
    except OSError as e:  # an unreadable store: decoding writes the chunk again, or says why not
        return None, f"{path}: cannot read chunk ({e})"
    found = (meta["split"], meta["classes_digest"], tuple(meta["image_shape"]))
    expected = (shard.split, classes_digest(shard.classes), tuple(shape or meta["image_shape"]))
    if found != expected:
        # The footer names the classes it holds (of how many): not every class of its data set.
        held = list(meta["held_classes"].values())
        of = f" of {meta['num_classes']}" if len(held) < meta["num_classes"] else ""
        return None, (f"{path}: chunk of another data set (split {found[0]}, classes {held}{of}, "
                      f"{'x'.join(map(str, found[2]))}; expected split {expected[0]}, classes "
                      f"{list(shard.classes)}, {'x'.join(map(str, expected[2]))})")
    known = shard.found()  # a chunk must account for every file the plan knows of, or record what it found
    files = None if known is None else int(known.sum())
    if files is not None and (meta["num_images"] + len(meta["rejected"]) != files
                              or len(meta["counts"]) != len(shard.classes)):
        return None, (f"{path}: chunk records {meta['num_images']} images and {len(meta['rejected'])} rejected "
                      f"files; the shard has {files} files")
    try:
        now = key()
    except OSError as e:
        if isinstance(e, Mnist37Error):  # a store's refusal stops the job, as it is
            raise
        return None, ""  # a file is gone or unreadable: decoding it reports which
    if now != meta["files_key"] or (known is None and not meta.get("records")):
        return None, f"{path}: {shard.changed}"
    try:
        if verify:
            verify_chunk(path, meta["checksum"])
    except ChunkError as e:
        return None, str(e)
    return meta, ""


def decode_shard(shard: Shard, root: str | Path, chunk_dir: str | Path, decoding: Decoding,
                 with_sums: bool) -> DecodedShard:
    """Decode a shard's images into its Arrow chunk (or reuse a still-valid one), count images
    per class and, when `with_sums`, return their per-class pixel sums.

    Files (records) that cannot be used are left out of the chunk and returned in `rejected`;
    whether that stops the job is the caller's policy. The chunk records them too, so a run
    that reuses it reports the same rejections."""
    start = time.perf_counter()
    reuse_freed_memory()
    root, path = str(root) if is_uri(root) else Path(root), chunk_path(chunk_dir, shard)
    meta, discarded = None, ""
    if decoding.reuse:
        meta, discarded = reusable(path, shard, lambda: shard.key(root, decoding), decoding.verify,
                                   decoding.array_shape)
    if meta is not None:
        meta = {**meta, "reused": True}
    else:
        read = shard.read(root, decoding)
        sums = pixel_sums(read.images, read.class_indices)
        counts = sums.per_class(len(shard.classes))
        record = {"files_key": read.files_key, "digest": read.digest, "counts": counts, "pixel_sums": sums,
                  "rejected": read.rejected, "conversions": read.conversions, "notes": read.notes}
        if read.records is not None:
            record["records"] = read.records
        meta = _write(path, chunk_dir, read.images, read.class_indices, read.paths, shard, record)
    records = meta.get("records")  # what the shard's records were, where no plan knew them before reading
    found = np.array(records["found"], dtype=np.int64) if records else shard.found()
    refused = (np.array(records["rejected_per_class"], dtype=np.int64) if records
               else found - np.append(meta["counts"], 0))
    return DecodedShard(
        split=shard.split, index=shard.index, chunk_path=path, num_files=int(found.sum()), found=found,
        num_images=int(meta["counts"].sum()), rejected=[tuple(r) for r in meta["rejected"]],
        num_bytes=meta["num_bytes"], digest=meta["digest"], checksum=meta["checksum"], counts=meta["counts"],
        pixel_sums=meta["pixel_sums"] if with_sums else None, reused=meta.get("reused", False), discarded=discarded,
        elapsed_s=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
        rejected_per_class=refused,
        ignored=records["ignored"] if records else 0,
        conversions=dict(meta.get("conversions") or {}), notes=[tuple(n) for n in meta.get("notes") or []],
    )


def _write(path: str, chunk_dir: str | Path, images: np.ndarray, labels: np.ndarray, paths, shard,
           record: dict) -> dict:
    """Write a freshly decoded chunk with its reuse `record`; return the record completed with
    the chunk's checksum and size."""
    table = chunk_table(images, labels, paths, shard.classes, shard.split, reuse=record)
    return {**record, "checksum": table.schema.metadata[CHECKSUM_KEY].decode(),
            "num_bytes": write_chunk(path, table, store=chunk_dir), "reused": False}
