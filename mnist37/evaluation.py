"""The evaluation job's stages in order: scan → decode (Ray) → prototypes → classify (Ray) → accuracy.

`evaluate(cfg)` needs a connected Ray (`ray.init()` is the caller's) and returns everything
results.json holds, plus the prototypes. The driver holds the compact file listing and one
small record per shard, never images.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist37 import Mnist37Error, __version__, distributed, formats
from mnist37.archive import cache_home
from mnist37.config import Config
from mnist37.decode import combine_digests, image_shape
from mnist37.folder import DatasetError, Listing, class_folders, find_root, list_split
from mnist37.metrics import accuracy_report
from mnist37.progress import Progress
from mnist37.prototypes import prototypes as make_prototypes
from mnist37.shards import DecodedShard, Shard, make_shards, peak_rss_bytes

log = logging.getLogger(__name__)

# Training files tried, in order, for the image shape when the config does not give it.
SHAPE_PROBES = 100
# Subfolder of a local chunk folder that keeps class folder listings for the next run.
LISTINGS = ".listings"


def default_chunk_dir(cfg: Config, root: Path) -> Path:
    """One chunk folder per data root, in the cache, so every run over that root reuses it."""
    tag = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    return (Path(cfg.cache_dir) if cfg.cache_dir else cache_home()) / "chunks" / f"{root.name}-{tag}"


@dataclass(eq=False)
class Plan:
    """What to decode and where: everything the job needs before Ray is involved."""

    cfg: Config
    root: Path
    classes: list[str]
    listings: dict[str, Listing]  # folder format only; container formats list no files
    shape: tuple[int, int]
    shards: list[Shard] | list[formats.ContainerShard]
    chunk_dir: str  # a local path or a pyarrow filesystem URI
    scan_s: float
    format: str = "folder"


def plan(cfg: Config) -> Plan:
    """Find the data, list every split (sorted), fix the image shape, cut the shards.

    Needs no Ray, so a job can run it while `ray.init()` starts, and a data problem is
    reported before any cluster is involved."""
    clock = time.perf_counter()
    root = find_root(cfg.data, cfg.train_split, cfg.cache_dir or None)
    fmt = formats.detect(formats.container_root(root), cfg.format)
    if fmt != "folder":
        root = formats.container_root(root)
    chunk_dir = cfg.chunk_dir if "://" in cfg.chunk_dir else str(
        Path(cfg.chunk_dir).resolve() if cfg.chunk_dir else default_chunk_dir(cfg, root))
    convert = cfg.non_grayscale == "convert"
    if fmt != "folder":
        planned = formats.plan_containers(root, fmt, cfg.train_split, cfg.eval_split, list(cfg.classes),
                                          cfg.shard_size, tuple(cfg.image_shape) or None, convert,
                                          cfg.image_column, cfg.label_column)
        log.info("%s: %s, %s, %d shards", root, fmt, ", ".join(
            f"{split} {len(files)} files" for split, files in planned.splits.items()), len(planned.shards))
        return Plan(cfg, root, planned.classes, {}, planned.shape, planned.shards, chunk_dir,
                    time.perf_counter() - clock, fmt)
    classes = class_folders(root, cfg.train_split) if cfg.classes == ["all"] else list(cfg.classes)
    # Folder listings are kept beside local chunks, so emptying the chunk folder (or
    # reuse_chunks = false) also means listing every folder afresh.
    reuse_dir = Path(chunk_dir) / LISTINGS if cfg.reuse_chunks and "://" not in chunk_dir else None
    listings = {split: list_split(root, split, classes, reuse_dir) for split in (cfg.train_split, cfg.eval_split)}
    shape = tuple(cfg.image_shape) or image_shape(root, listings[cfg.train_split].paths(0, SHAPE_PROBES), convert)
    shards = [shard for listing in listings.values() for shard in make_shards(listing, cfg.shard_size)]
    log.info("%s: %s, %d shards of up to %d images", root, ", ".join(
        f"{split} {len(listing)} images" for split, listing in listings.items()), len(shards), cfg.shard_size)
    return Plan(cfg, root, classes, listings, shape, shards, chunk_dir, time.perf_counter() - clock)


class BadFilesError(Mnist37Error):
    """Files that could not be used, under on_bad_file = error: one line each, up to a limit."""

    def __init__(self, rejected: list[tuple[str, str]], found: int, limit: int = 20):
        super().__init__(rejected, found, limit)
        self.rejected, self.found, self.limit = rejected, found, limit

    def __str__(self) -> str:
        lines = [f"{len(self.rejected)} of {self.found} image files cannot be used (on_bad_file = error; "
                 "--on-bad-file skip leaves them out and lists them in results.json):"]
        lines += [f"  {path}: {reason}" for path, reason in self.rejected[:self.limit]]
        if len(self.rejected) > self.limit:
            lines.append(f"  ... and {len(self.rejected) - self.limit} more")
        return "\n".join(lines)


def _class_of(path: str) -> str:
    return path.split("/")[-2]


def file_accounts(listings: dict[str, Listing], counts: dict[str, np.ndarray],
                  rejected: list[tuple[str, str]]) -> dict:
    """Per split and class: files found (images by extension), used, rejected, ignored.

    Raises Mnist37Error unless found = used + rejected everywhere: no image goes missing."""
    accounts = {}
    for split, listing in listings.items():
        bad = {}
        for path, _ in rejected:
            if path.startswith(split + "/"):
                bad[_class_of(path)] = bad.get(_class_of(path), 0) + 1
        accounts[split] = {}
        for index, (name, found) in enumerate(listing.counts().items()):
            used, refused = int(counts[split][index]), bad.get(name, 0)
            if found != used + refused:
                raise Mnist37Error(f"{split}/{name}/: {found} image files found but {used} used "
                                   f"and {refused} rejected")
            accounts[split][name] = {"found": found, "used": used, "rejected": refused,
                                     "ignored": listing.ignored[index]}
    return accounts


def record_accounts(classes: list[str], splits: tuple[str, ...], shards: list[DecodedShard]) -> dict:
    """`file_accounts` for container formats, from what the decode tasks found: per split and
    class, records found, used, rejected; records of classes not selected are `ignored` under
    "(other classes)", records whose class could not be read are found and rejected under
    "(no class)". Raises Mnist37Error unless found = used + rejected everywhere."""
    accounts = {}
    for split in splits:
        found = np.zeros(len(classes) + 1, dtype=np.int64)
        used = np.zeros(len(classes) + 1, dtype=np.int64)
        refused = np.zeros(len(classes) + 1, dtype=np.int64)
        ignored = 0
        for r in shards:
            if r.split == split:
                found += r.found
                used[:-1] += r.counts
                refused += r.rejected_per_class
                ignored += r.ignored
        accounts[split] = {}
        for name, f, u, x in zip([*classes, "(no class)"], found.tolist(), used.tolist(), refused.tolist()):
            if f != u + x:
                raise Mnist37Error(f"{split}/{name}: {f} records found but {u} used and {x} rejected")
            if name != "(no class)" or f:
                accounts[split][name] = {"found": f, "used": u, "rejected": x, "ignored": 0}
        if ignored:
            accounts[split]["(other classes)"] = {"found": 0, "used": 0, "rejected": 0, "ignored": ignored}
    return accounts


def evaluate(cfg: Config, planned: Plan | None = None) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    """Run the job on the connected Ray cluster; return (results, prototypes float32 [C, H, W],
    the pixels of the boundary examples by path)."""
    planned = planned or plan(cfg)
    root, listings, shape, shards, chunk_dir = (planned.root, planned.listings, planned.shape,
                                                planned.shards, planned.chunk_dir)
    classes = planned.classes
    splits = (cfg.train_split, cfg.eval_split)
    elapsed: dict[str, float] = {"scan": planned.scan_s}
    max_in_flight = cfg.max_in_flight or distributed.default_max_in_flight()

    # Chunks reach classify tasks through the object store on a multi-node cluster, unless the
    # chunk store is a URI (shared storage) or the config says otherwise.
    transport = cfg.chunk_transport
    if transport == "auto":
        transport = "object_store" if distributed.num_nodes() > 1 and "://" not in chunk_dir else "filesystem"
    shipped = {}

    # Decode: training sums are reduced as shards finish; the driver keeps only small records.
    clock = time.perf_counter()
    sums = np.zeros((len(classes), *shape), dtype=np.int64)
    counts = {split: np.zeros(len(classes), dtype=np.int64) for split in splits}
    records, rejected = {}, []
    ship_split = cfg.eval_split if transport == "object_store" else None
    progress = Progress("decode", len(shards), " shards")
    for done in distributed.decode_shards(shards, root, shape, chunk_dir, cfg.train_split, cfg.reuse_chunks,
                                          cfg.non_grayscale == "convert", ship_split, max_in_flight):
        progress.update()
        if isinstance(done, tuple):
            done, (chunk_ref,) = done
            shipped[done.chunk_path] = chunk_ref
        counts[done.split] += done.counts
        rejected += done.rejected
        if done.pixel_sums is not None:
            sums += done.pixel_sums
            done.pixel_sums = None
        records[(done.split, done.index)] = done
    elapsed["decode"] = time.perf_counter() - clock
    rejected.sort()
    if planned.format == "folder":
        accounts = file_accounts(listings, counts, rejected)
        found = sum(len(listing) for listing in listings.values())
    else:  # no listing on the driver: the tasks counted the records
        accounts = record_accounts(classes, splits, list(records.values()))
        found = sum(r.num_files for r in records.values())
    if rejected and cfg.on_bad_file == "error":
        raise BadFilesError(rejected, found)
    for name, count in zip(classes, counts[cfg.train_split]):
        if count == 0:
            raise DatasetError(f"Class {name!r} has no usable images under {cfg.train_split}/ "
                               f"(all {accounts[cfg.train_split][name]['found']} rejected)")
    if rejected:
        log.warning("left out %d of %d image files (on_bad_file = skip); listed in results.json",
                    len(rejected), found)

    clock = time.perf_counter()
    prototypes = make_prototypes(sums, counts[cfg.train_split], classes, cfg.train_split)
    elapsed["prototypes"] = time.perf_counter() - clock

    clock = time.perf_counter()
    eval_chunks = [(r.chunk_path, shipped.get(r.chunk_path, r.chunk_path)) for key, r in sorted(records.items())
                   if key[0] == cfg.eval_split and r.num_images]
    confusions = {m: np.zeros((len(classes), len(classes)), dtype=np.int64) for m in cfg.metrics}
    classified, candidates = {}, {m: {c: [] for c in range(len(classes))} for m in cfg.metrics}
    progress = Progress("classify", len(eval_chunks), " shards")
    for done in distributed.classify_chunks(eval_chunks, prototypes, cfg.metrics, cfg.device,
                                            cfg.gpus_per_task, cfg.report_examples, max_in_flight):
        progress.update()
        for metric, matrix in done["confusions"].items():
            confusions[metric] += matrix
        for metric, per_class in done.pop("examples").items():
            for c, sides in per_class.items():
                candidates[metric][c] += sides["closest"] + sides["farthest"]
        classified[done["chunk_path"]] = done
    elapsed["classify"] = time.perf_counter() - clock

    examples, example_images = boundary_report(candidates, cfg.report_examples)

    ordered = [records[key] for key in sorted(records)]
    worker_peaks = {}  # (node, pid) -> bytes: pids repeat across nodes
    for r in ordered:
        worker_peaks[r.node_id, r.pid] = max(worker_peaks.get((r.node_id, r.pid), 0), r.peak_rss_bytes)
    for c in classified.values():
        key = (c["node_id"], c["pid"])
        worker_peaks[key] = max(worker_peaks.get(key, 0), c["peak_rss_bytes"])
    reused = sum(r.num_files for r in ordered if r.reused)

    results = {
        "mnist37_version": __version__,
        "config": cfg.to_dict(),
        "data": {"source": str(cfg.data), "root": str(root), "format": planned.format,
                 "folder_listings_reused": sum(listing.reused for listing in listings.values()),
                 "fingerprint": f"{combine_digests(*(r.digest for r in ordered)):032x}"},
        "classes": list(classes),
        "image_shape": list(shape),
        "counts": {split: dict(zip(classes, counts[split].tolist())) for split in splits},
        "files": accounts,
        "rejected": [{"path": path, "reason": reason} for path, reason in rejected],
        "shards": {
            "shard_size": cfg.shard_size,
            "chunk_dir": chunk_dir,
            "transport": transport,
            "count": {split: sum(1 for key in records if key[0] == split) for split in splits},
            "files_decoded": found - reused,
            "files_reused": reused,
            "per_shard": [
                {"split": r.split, "index": r.index, "num_files": r.num_files, "num_images": r.num_images,
                 "rejected": len(r.rejected), "num_bytes": r.num_bytes, "digest": r.digest, "reused": r.reused,
                 "decode_node_id": r.node_id, "decode_elapsed_s": round(r.elapsed_s, 4), "decode_gpu_ids": r.gpu_ids,
                 **({"classify_node_id": classified[r.chunk_path]["node_id"],
                     "classify_device": classified[r.chunk_path]["device"],
                     "classify_gpu_ids": classified[r.chunk_path]["gpu_ids"]} if r.chunk_path in classified else {})}
                for r in ordered
            ],
        },
        "metrics": {m: accuracy_report(confusions[m], classes) for m in cfg.metrics},
        "examples": examples,
        "elapsed_s": elapsed,
        "throughput": {"decode_files_per_s": found / elapsed["decode"] if elapsed["decode"] else None},
        "memory": {
            "driver_peak_rss_bytes": peak_rss_bytes(),
            "worker_peak_rss_bytes": max(worker_peaks.values(), default=0),
            "workers": len(worker_peaks),
        },
        "ray": distributed.cluster_info(),
    }
    return results, prototypes, example_images


def boundary_report(candidates: dict, k: int) -> tuple[dict, dict]:
    """From every chunk's candidates, per metric and true class the k misclassified images
    closest to the decision boundary and the k farthest; their pixels are returned apart,
    keyed by path, so results.json stays small."""
    examples, images = {}, {}
    for metric, per_class in candidates.items():
        examples[metric] = {}
        for c, found in per_class.items():
            ranked = sorted(found, key=lambda e: (e["margin"], e["path"]))
            unique = list({e["path"]: e for e in ranked}.values())
            sides = {"closest": unique[:k], "farthest": unique[::-1][:k]}
            for side in sides.values():
                for e in side:
                    images[e["path"]] = e.pop("image", images.get(e["path"]))
            examples[metric][str(c)] = sides
    return examples, images
