"""Shards: a split's listing cut into fixed-size pieces, each decoded into one Arrow chunk.

`decode_shard` is the whole per-shard decode step as a plain function; `mnist37.distributed`
runs it as a Ray task. A shard whose chunk already exists with the same files key (paths,
sizes, modification times, decode settings) is not decoded again: its counts, pixel sums and
digest come from the chunk's metadata.

A shard is a run of listed files (`Shard`, the folder layout) or a piece of one container
file (`formats.ContainerShard`: Parquet row groups, a tar, IDX records); both decode into
the same chunks. A container shard also reports how many records of each class it found,
since no listing on the driver knows that.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist37.chunks import ChunkError, chunk_table, join, read_chunk_metadata, write_chunk
from mnist37.decode import Group, decode_groups, files_key
from mnist37.folder import Listing, relative_paths
from mnist37.formats import ContainerShard, FormatError, read_shard
from mnist37.prototypes import pixel_sums


@dataclass(eq=False)
class Shard:
    split: str
    index: int
    shard_size: int  # of every shard of this split (the last may be shorter)
    classes: tuple[str, ...]
    names: np.ndarray  # bytes 'S' [N], file names within their class folders
    class_indices: np.ndarray  # int32 [N]

    @property
    def name(self) -> str:
        """Unique per split, shard size and position: runs with other shard sizes keep their own chunks."""
        return f"{self.split}-{self.shard_size}-{self.index:06d}"

    @property
    def paths(self) -> list[str]:
        return relative_paths(self.split, self.classes, self.class_indices, self.names)

    def groups(self) -> list[Group]:
        """The shard's files as runs sharing a class folder: [("train/3", [b"10.png", ...]), ...]."""
        starts = [0, *(np.flatnonzero(np.diff(self.class_indices)) + 1).tolist(), len(self)]
        return [(f"{self.split}/{self.classes[self.class_indices[a]]}", self.names[a:b].tolist())
                for a, b in zip(starts, starts[1:]) if b > a]

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class DecodedShard:
    """What a decode task sends back: small numbers, never the images."""

    split: str
    index: int
    chunk_path: str
    num_files: int  # listed (container shards: records read of the selected classes, or of no readable class)
    num_images: int  # decoded and kept: num_files - len(rejected)
    rejected: list[tuple[str, str]]  # (path, reason) of each file left out
    num_bytes: int
    digest: str  # content digest of the files (decode.file_digest, combined)
    counts: np.ndarray  # int64 [C], images kept per class
    pixel_sums: np.ndarray | None  # int64 [C, H, W]; None unless asked for (training shards)
    reused: bool  # True when the chunk from an earlier run was still valid
    elapsed_s: float
    # Container shards only (None / 0 for folder shards, whose listing the driver holds):
    found: np.ndarray | None = None  # int64 [C + 1]: records read per class; last: class unreadable
    rejected_per_class: np.ndarray | None = None  # int64 [C + 1], same layout
    ignored: int = 0  # records of classes not selected
    peak_rss_bytes: int = 0  # of the process that ran it
    node_id: str = ""
    pid: int = 0
    gpu_ids: list = field(default_factory=list)  # GPUs Ray assigned to the task (none, by design)


def make_shards(listing: Listing, shard_size: int) -> list[Shard]:
    """Consecutive runs of `shard_size` images (the last may be shorter), in listing order."""
    return [
        Shard(listing.split, i // shard_size, shard_size, listing.classes,
              listing.names[i:i + shard_size], listing.class_indices[i:i + shard_size])
        for i in range(0, len(listing), shard_size)
    ]


def chunk_path(chunk_dir: str | Path, shard: Shard | ContainerShard) -> str:
    """Where the shard's chunk lives: a path, or a URI when `chunk_dir` is one."""
    return join(chunk_dir, shard.split, f"{shard.name}.arrow")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reusable(path: str, root: Path, shard: Shard, groups: list[Group], convert: bool) -> dict | None:
    """The chunk's metadata if it was written from exactly these files, as they are now."""
    try:
        meta = read_chunk_metadata(path)
    except (ChunkError, OSError):  # no chunk yet (or a torn / foreign one): decode
        return None
    if meta["num_images"] + len(meta["rejected"]) != len(shard) or len(meta["counts"]) != len(shard.classes):
        return None
    try:
        key = files_key(root, groups, convert)
    except OSError:
        return None  # a file is gone or unreadable: decoding it reports which
    return meta if key == meta["files_key"] else None


def decode_shard(shard: Shard | ContainerShard, root: str | Path, shape: tuple[int, int], chunk_dir: str | Path,
                 with_sums: bool, reuse: bool = True, convert: bool = False) -> DecodedShard:
    """Decode a shard's PNGs (or a container shard's records) into its Arrow chunk (or reuse
    a still-valid one), count images per class and, when `with_sums`, return their per-class
    pixel sums.

    Files (records) that cannot be used are left out of the chunk and returned in `rejected`;
    whether that stops the job is the caller's policy. The chunk records them too, so a run
    that reuses it reports the same rejections."""
    start = time.perf_counter()
    root, path = Path(root), chunk_path(chunk_dir, shard)
    if isinstance(shard, ContainerShard):
        meta, reused = _decode_container(shard, root, shape, path, reuse, convert)
    else:
        groups = shard.groups()
        meta = _reusable(path, root, shard, groups, convert) if reuse else None
        reused = meta is not None
        if meta is None:
            decoded = decode_groups(root, groups, shape, convert)
            labels = shard.class_indices[decoded.kept]
            sums, counts = pixel_sums(decoded.images, labels, len(shard.classes))
            meta = {"files_key": decoded.files_key, "digest": decoded.digest, "counts": counts,
                    "pixel_sums": sums, "rejected": decoded.rejected}
            table = chunk_table(decoded.images, labels, decoded.paths, shard.classes, shard.split, reuse=meta)
            meta["num_bytes"] = write_chunk(path, table)
    records = meta.get("records")
    num_images = int(meta["counts"].sum())
    return DecodedShard(
        split=shard.split, index=shard.index, chunk_path=path,
        num_files=int(sum(records["found"])) if records else len(shard),
        num_images=num_images, rejected=[tuple(r) for r in meta["rejected"]],
        num_bytes=meta["num_bytes"], digest=meta["digest"], counts=meta["counts"],
        pixel_sums=meta["pixel_sums"] if with_sums else None, reused=reused,
        elapsed_s=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
        found=np.array(records["found"], dtype=np.int64) if records else None,
        rejected_per_class=np.array(records["rejected_per_class"], dtype=np.int64) if records else None,
        ignored=records["ignored"] if records else 0,
    )


def _decode_container(shard: ContainerShard, root: Path, shape: tuple[int, int], path: str, reuse: bool,
                      convert: bool) -> tuple[dict, bool]:
    """A container shard's chunk record: reused while the container files' (path, size, mtime),
    the shard's range and the decode settings are unchanged, else decoded and written."""
    try:
        key = shard.key(root, shape, convert)
    except OSError as e:
        raise FormatError(f"{shard.source}: cannot read ({e.strerror or e})") from None
    if reuse:
        try:
            meta = read_chunk_metadata(path)
        except (ChunkError, OSError):
            meta = None
        if meta is not None and meta["files_key"] == key and meta.get("records"):
            return meta, True
    decoded = read_shard(shard, root, shape, convert)
    sums, counts = pixel_sums(decoded.images, decoded.class_indices, len(shard.classes))
    meta = {"files_key": key, "digest": decoded.digest, "counts": counts, "pixel_sums": sums,
            "rejected": decoded.rejected,
            "records": {"found": decoded.found.tolist(), "rejected_per_class": decoded.rejected_per_class.tolist(),
                        "ignored": decoded.ignored}}
    table = chunk_table(decoded.images, decoded.class_indices, decoded.paths, shard.classes, shard.split, reuse=meta)
    meta["num_bytes"] = write_chunk(path, table)
    return meta, False
