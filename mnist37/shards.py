"""Shards: a split's listing cut into fixed-size pieces, each decoded into one Arrow chunk.

`decode_shard` is the whole per-shard decode step as a plain function; `mnist37.distributed`
runs it as a Ray task. A shard whose chunk already exists with the same files key (paths,
sizes, modification times, decode settings) is not decoded again: its counts, pixel sums and
digest come from the chunk's metadata, once the whole chunk is verified against its checksum.
A chunk that is there but cannot be reused (damaged, of another data set or mnist37 version,
written from other files) is decoded again, and the DecodedShard says why (`discarded`).

A shard is a run of listed files (`Shard`, the folder layout) or a piece of one container
file (`formats.ContainerShard`: Parquet row groups, a tar, IDX records); both decode into
the same chunks. A container shard also reports how many records of each class it found,
since no listing on the driver knows that.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist37 import partials
from mnist37.chunks import (CHECKSUM_KEY, ChunkError, ChunkNotFoundError, chunk_table, join, read_chunk_metadata,
                            verify_chunk, write_chunk)
from mnist37.decode import Group, decode_groups, decode_objects, files_key, listed_files_key
from mnist37.folder import ClassFiles, Listing, relative_paths
from mnist37.memory import peak_rss_bytes, reuse_freed_memory
from mnist37.formats import ContainerShard, FormatError, read_shard
from mnist37.objects import ObjectStoreError
from mnist37.paths import class_folder, is_uri
from mnist37.prototypes import pixel_sums


@dataclass(eq=False)
class Run:
    """Files [start, stop) of the listing blocks `files` of one class folder, laid end to end:
    a shard is one run or a few."""

    class_index: int
    files: list  # the blocks: ClassFiles, or Ray's ObjectRefs until the decoding task resolves them
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def listed(self) -> ClassFiles:
        """The run's files [start, stop) once its blocks are here."""
        joined = ClassFiles.concatenate(self.files)
        return ClassFiles(joined.names[self.start:self.stop],
                          None if joined.stamps is None else joined.stamps[self.start:self.stop])


@dataclass(eq=False)
class Shard:
    """`shard_size` consecutive images of a split's listing (the last shard may be shorter).

    The driver's record of a shard is a few numbers per class folder it touches (`runs`), not
    its file names: those stay in the listing (in a job, in Ray's object store) until the task
    that decodes the shard resolves them (`resolved`); `names`, `paths` and the rest need that."""

    split: str
    index: int
    shard_size: int  # of every shard of this split (the last may be shorter)
    classes: tuple[str, ...]
    runs: list[Run]  # in class order

    @property
    def name(self) -> str:
        """Unique per split, shard size and position: runs with other shard sizes keep their own chunks."""
        return f"{self.split}-{self.shard_size}-{self.index:06d}"

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def found(self) -> np.ndarray:
        """int64 [C + 1]: files per class (the last slot, records of no class, is 0 for folders)."""
        found = np.zeros(len(self.classes) + 1, dtype=np.int64)
        for r in self.runs:
            found[r.class_index] += len(r)
        return found

    def resolved(self, get) -> Shard:
        """This shard with each run's files fetched and cut to the run: `get` turns the
        blocks that are refs into ClassFiles (ray.get), in one call."""
        refs = [b for r in self.runs for b in r.files if not isinstance(b, ClassFiles)]
        got = iter(get(refs) if refs else ())
        runs = []
        for r in self.runs:
            blocks = [b if isinstance(b, ClassFiles) else next(got) for b in r.files]
            runs.append(Run(r.class_index, [Run(r.class_index, blocks, r.start, r.stop).listed()], 0, len(r)))
        return dataclasses.replace(self, runs=runs)

    # The shard's files: only where its blocks are (in-process, or once `resolved`).
    @property
    def names(self) -> np.ndarray:
        """bytes 'S' [N]: file names within their class folders."""
        return np.concatenate([r.listed().names for r in self.runs])

    @property
    def class_indices(self) -> np.ndarray:
        """int32 [N]."""
        return np.repeat(np.array([r.class_index for r in self.runs], dtype=np.int32), [len(r) for r in self.runs])

    @property
    def stamps(self) -> np.ndarray | None:
        """int64 [N, 2]: (size, mtime ns) as listed, for objects in a store; None for local files."""
        listed = [r.listed() for r in self.runs]
        return None if listed[0].stamps is None else np.concatenate([f.stamps for f in listed])

    @property
    def paths(self) -> list[str]:
        return relative_paths(self.split, self.classes, self.class_indices, self.names)

    def groups(self) -> list[Group]:
        """The shard's files as runs sharing a class folder: [("train/3", [b"10.png", ...]), ...]."""
        return [(class_folder(self.split, self.classes[r.class_index]), r.listed().names.tolist())
                for r in self.runs]


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
    pixel_sums: np.ndarray | None  # int64 [C, H, W]; None unless asked for (training shards)
    reused: bool  # True when the chunk from an earlier run was still valid
    # Why a chunk found at chunk_path was not reused but decoded again, naming it (damaged,
    # another data set, files changed since); "" when there was none, it was reused, or reuse is off.
    discarded: str
    elapsed_s: float
    peak_rss_bytes: int = 0  # of the process that ran it
    node_id: str = ""
    pid: int = 0
    gpu_ids: list = field(default_factory=list)  # GPUs Ray assigned to the task (none, by design)
    chunk_ref: object = None  # Ray's ref to the chunk's bytes, when they travel through the object store
    # Container shards only (None / 0 for folder shards, whose listing the driver holds):
    rejected_per_class: np.ndarray | None = None  # int64 [C + 1], as `found`
    ignored: int = 0  # records of classes not selected


def make_shards(listing: Listing, shard_size: int) -> list[Shard]:
    """Consecutive runs of `shard_size` images (the last may be shorter), in listing order,
    each a few (class folder, blocks, start, stop) runs: cut from the class folders' counts
    alone, each run naming only the listing blocks it reads."""
    bounds = np.cumsum([0, *(f.count for f in listing.folders)]).tolist()
    shards = []
    for index, start in enumerate(range(0, bounds[-1], shard_size)):
        stop, runs = min(start + shard_size, bounds[-1]), []
        for c, (folder, low, high) in enumerate(zip(listing.folders, bounds, bounds[1:])):
            if low < stop and start < high:
                a, b, size = max(start, low) - low, min(stop, high) - low, folder.block_size
                first, last = a // size, (b - 1) // size
                runs.append(Run(c, folder.blocks[first:last + 1], a - first * size, b - first * size))
        shards.append(Shard(listing.split, index, shard_size, listing.classes, runs))
    return shards


def chunk_path(chunk_dir: str | Path, shard: Shard | ContainerShard) -> str:
    """Where the shard's chunk lives: a path, or a URI when `chunk_dir` is one."""
    return join(chunk_dir, shard.split, f"{shard.name}.arrow")


def clean_partials(chunk_dir: Path) -> int:
    """Remove the temporary chunks and listings that killed writers left in a local chunk
    folder, never one a running writer holds (mnist37.partials); return how many."""
    folders = [chunk_dir / ".listings", *(p for p in chunk_dir.glob("*") if p.is_dir())] if chunk_dir.is_dir() else []
    return sum(partials.clean(folder) for folder in folders)


def _reusable(path: str, root: Path | str, shard: Shard, shape: tuple[int, int], groups: list[Group],
              convert: bool, verify: bool = True) -> tuple[dict | None, str]:
    """(the chunk's reuse record, "") if the chunk at `path` is intact and was written from
    exactly these files as they are now; else (None, why not), the reason "" when there is no
    chunk at all. The cheap checks come first: the chunk is hashed only when it would be reused."""
    try:
        meta = read_chunk_metadata(path)
    except ChunkNotFoundError:
        return None, ""
    except ChunkError as e:
        return None, str(e)
    except OSError as e:  # an unreadable store: decoding writes the chunk again, or says why not
        return None, f"{path}: cannot read chunk ({e})"
    found = (meta["split"], tuple(meta["classes"]), tuple(meta["image_shape"]))
    expected = (shard.split, tuple(shard.classes), tuple(shape))
    if found != expected:
        return None, (f"{path}: chunk of another data set (split {found[0]}, classes {list(found[1])}, "
                      f"{found[2][0]}x{found[2][1]}; expected split {expected[0]}, classes {list(expected[1])}, "
                      f"{expected[2][0]}x{expected[2][1]})")
    if meta["num_images"] + len(meta["rejected"]) != len(shard) or len(meta["counts"]) != len(shard.classes):
        return None, (f"{path}: chunk records {meta['num_images']} images and {len(meta['rejected'])} rejected "
                      f"files; the shard has {len(shard)} files")
    try:
        # Objects in a store: the (size, mtime) the listing found, so a warm run reads none of them.
        key = files_key(root, groups, convert) if shard.stamps is None else listed_files_key(groups, shard.stamps, convert)
    except OSError:
        return None, ""  # a file is gone or unreadable: decoding it reports which
    if key != meta["files_key"]:
        return None, f"{path}: written from other files (names, sizes or modification times differ)"
    try:
        if verify:
            verify_chunk(path, meta["checksum"])
    except ChunkError as e:
        return None, str(e)
    return meta, ""


def decode_shard(shard: Shard | ContainerShard, root: str | Path, shape: tuple[int, int], chunk_dir: str | Path,
                 with_sums: bool, reuse: bool = True, convert: bool = False, verify: bool = True) -> DecodedShard:
    """Decode a shard's PNGs (or a container shard's records) into its Arrow chunk (or reuse
    a still-valid one), count images per class and, when `with_sums`, return their per-class
    pixel sums.

    Files (records) that cannot be used are left out of the chunk and returned in `rejected`;
    whether that stops the job is the caller's policy. The chunk records them too, so a run
    that reuses it reports the same rejections."""
    start = time.perf_counter()
    reuse_freed_memory()
    root, path = str(root) if is_uri(root) else Path(root), chunk_path(chunk_dir, shard)
    if isinstance(shard, ContainerShard):
        meta, discarded = _decode_container(shard, root, shape, path, chunk_dir, reuse, convert, verify)
    else:
        groups = shard.groups()
        meta, discarded = _reusable(path, root, shard, shape, groups, convert, verify) if reuse else (None, "")
        if meta is not None:
            meta = {**meta, "reused": True}
        else:
            decoded = (decode_groups(root, groups, shape, convert) if shard.stamps is None
                       else decode_objects(root, groups, shard.stamps, shape, convert))  # from an object store
            labels = shard.class_indices[decoded.kept]
            sums, counts = pixel_sums(decoded.images, labels, len(shard.classes))
            meta = _write(path, chunk_dir, decoded.images, labels, decoded.paths, shard, {
                "files_key": decoded.files_key, "digest": decoded.digest, "counts": counts, "pixel_sums": sums,
                "rejected": decoded.rejected})
    records = meta.get("records")
    found = (np.array(records["found"], dtype=np.int64) if records else
             shard.found())
    return DecodedShard(
        split=shard.split, index=shard.index, chunk_path=path, num_files=int(found.sum()), found=found,
        num_images=int(meta["counts"].sum()), rejected=[tuple(r) for r in meta["rejected"]],
        num_bytes=meta["num_bytes"], digest=meta["digest"], checksum=meta["checksum"], counts=meta["counts"],
        pixel_sums=meta["pixel_sums"] if with_sums else None, reused=meta.get("reused", False), discarded=discarded,
        elapsed_s=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
        rejected_per_class=np.array(records["rejected_per_class"], dtype=np.int64) if records else None,
        ignored=records["ignored"] if records else 0,
    )


def _write(path: str, chunk_dir: str | Path, images: np.ndarray, labels: np.ndarray, paths, shard,
           record: dict) -> dict:
    """Write a freshly decoded chunk with its reuse `record`; return the record completed with
    the chunk's checksum and size."""
    table = chunk_table(images, labels, paths, shard.classes, shard.split, reuse=record)
    return {**record, "checksum": table.schema.metadata[CHECKSUM_KEY].decode(),
            "num_bytes": write_chunk(path, table, store=chunk_dir), "reused": False}


def _decode_container(shard: ContainerShard, root: Path, shape: tuple[int, int], path: str, chunk_dir: str | Path,
                      reuse: bool, convert: bool, verify: bool) -> tuple[dict, str]:
    """A container shard's chunk record and why an existing chunk was not reused (as
    `_reusable`): reused while the container files' (path, size, mtime), the shard's range and
    the decode settings are unchanged and the chunk verifies, else decoded and written."""
    try:
        key = shard.key(root, shape, convert)
    except ObjectStoreError:
        raise  # a refusal or a store that keeps failing: one line naming the object, as it is
    except OSError as e:
        raise FormatError(f"{shard.source}: cannot read ({e.strerror or e})") from None
    discarded = ""
    if reuse:
        try:
            meta = read_chunk_metadata(path)
            if meta["files_key"] != key or not meta.get("records"):
                discarded = f"{path}: written from other records (container files, range or settings differ)"
            else:
                if verify:
                    verify_chunk(path, meta["checksum"])
                return {**meta, "reused": True}, ""
        except ChunkNotFoundError:
            pass
        except (ChunkError, OSError) as e:
            discarded = str(e)
    decoded = read_shard(shard, root, shape, convert)
    sums, counts = pixel_sums(decoded.images, decoded.class_indices, len(shard.classes))
    return _write(path, chunk_dir, decoded.images, decoded.class_indices, decoded.paths, shard, {
        "files_key": key, "digest": decoded.digest, "counts": counts, "pixel_sums": sums,
        "rejected": decoded.rejected,
        "records": {"found": decoded.found.tolist(), "rejected_per_class": decoded.rejected_per_class.tolist(),
                    "ignored": decoded.ignored}}), discarded
