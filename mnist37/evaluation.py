"""The evaluation job's stages in order: scan → decode (Ray) → prototypes → classify (Ray) → accuracy.

`evaluate(cfg)` needs a connected Ray (`ray.init()` is the caller's) and returns everything
results.json holds, plus the prototypes. The driver holds the compact file listing and one
small record per shard, never images.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist37 import Mnist37Error, __version__, distributed
from mnist37.archive import cache_home
from mnist37.config import Config
from mnist37.decode import combine_digests, image_shape
from mnist37.folder import Listing, find_root, list_split
from mnist37.metrics import accuracy_report
from mnist37.prototypes import prototypes as make_prototypes
from mnist37.shards import Shard, make_shards

log = logging.getLogger(__name__)


def default_chunk_dir(cfg: Config, root: Path) -> Path:
    """One chunk folder per data root, in the cache, so every run over that root reuses it."""
    tag = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    return (Path(cfg.cache_dir) if cfg.cache_dir else cache_home()) / "chunks" / f"{root.name}-{tag}"


@dataclass(eq=False)
class Plan:
    """What to decode and where: everything the job needs before Ray is involved."""

    cfg: Config
    root: Path
    listings: dict[str, Listing]
    shape: tuple[int, int]
    shards: list[Shard]
    chunk_dir: Path
    scan_s: float


def plan(cfg: Config) -> Plan:
    """Find the data, list every split (sorted), fix the image shape, cut the shards.

    Needs no Ray, so a job can run it while `ray.init()` starts, and a data problem is
    reported before any cluster is involved."""
    clock = time.perf_counter()
    root = find_root(cfg.data, cfg.train_split, cfg.cache_dir or None)
    listings = {split: list_split(root, split, cfg.classes) for split in (cfg.train_split, cfg.eval_split)}
    shape = image_shape(root, listings[cfg.train_split].paths(0, 1)[0])
    shards = [shard for listing in listings.values() for shard in make_shards(listing, cfg.shard_size)]
    chunk_dir = Path(cfg.chunk_dir).resolve() if cfg.chunk_dir else default_chunk_dir(cfg, root)
    log.info("%s: %s, %d shards of up to %d images", root, ", ".join(
        f"{split} {len(listing)} images" for split, listing in listings.items()), len(shards), cfg.shard_size)
    return Plan(cfg, root, listings, shape, shards, chunk_dir, time.perf_counter() - clock)


def evaluate(cfg: Config, planned: Plan | None = None) -> tuple[dict, np.ndarray]:
    """Run the job on the connected Ray cluster; return (results, prototypes float32 [C, H, W])."""
    planned = planned or plan(cfg)
    root, listings, shape, shards, chunk_dir = (planned.root, planned.listings, planned.shape,
                                                planned.shards, planned.chunk_dir)
    classes = cfg.classes
    splits = (cfg.train_split, cfg.eval_split)
    elapsed: dict[str, float] = {"scan": planned.scan_s}
    max_in_flight = cfg.max_in_flight or distributed.default_max_in_flight()

    # Decode: training sums are reduced as shards finish; the driver keeps only small records.
    clock = time.perf_counter()
    sums = np.zeros((len(classes), *shape), dtype=np.int64)
    decoded_counts = {split: np.zeros(len(classes), dtype=np.int64) for split in splits}
    records = {}
    for done in distributed.decode_shards(shards, root, shape, chunk_dir, cfg.train_split,
                                          cfg.reuse_chunks, max_in_flight):
        decoded_counts[done.split] += done.counts
        if done.pixel_sums is not None:
            sums += done.pixel_sums
            done.pixel_sums = None
        records[(done.split, done.index)] = done
    elapsed["decode"] = time.perf_counter() - clock
    for split in splits:
        listed, decoded = listings[split].counts(), dict(zip(classes, decoded_counts[split].tolist()))
        if decoded != listed:  # never report on silently fewer images
            raise Mnist37Error(f"{split}/: listed {listed} images per class but decoded {decoded}")

    clock = time.perf_counter()
    prototypes = make_prototypes(sums, decoded_counts[cfg.train_split], classes, cfg.train_split)
    elapsed["prototypes"] = time.perf_counter() - clock

    clock = time.perf_counter()
    eval_chunks = [records[key].chunk_path for key in sorted(records) if key[0] == cfg.eval_split]
    confusions = {m: np.zeros((len(classes), len(classes)), dtype=np.int64) for m in cfg.metrics}
    classified = {}
    for done in distributed.classify_chunks(eval_chunks, prototypes, cfg.metrics, cfg.device,
                                            cfg.gpus_per_task, max_in_flight):
        for metric, matrix in done["confusions"].items():
            confusions[metric] += matrix
        classified[done["chunk_path"]] = done
    elapsed["classify"] = time.perf_counter() - clock

    ordered = [records[key] for key in sorted(records)]
    worker_peaks = {}
    for r in ordered:
        worker_peaks[r.pid] = max(worker_peaks.get(r.pid, 0), r.peak_rss_bytes)
    for c in classified.values():
        worker_peaks[c["pid"]] = max(worker_peaks.get(c["pid"], 0), c["peak_rss_bytes"])
    num_images = sum(len(listing) for listing in listings.values())
    reused = sum(r.num_images for r in ordered if r.reused)

    results = {
        "mnist37_version": __version__,
        "config": cfg.to_dict(),
        "data": {"source": str(cfg.data), "root": str(root),
                 "fingerprint": f"{combine_digests(*(r.digest for r in ordered)):032x}"},
        "classes": list(classes),
        "image_shape": list(shape),
        "counts": {split: dict(zip(classes, decoded_counts[split].tolist())) for split in splits},
        "shards": {
            "shard_size": cfg.shard_size,
            "chunk_dir": str(chunk_dir),
            "count": {split: sum(1 for key in records if key[0] == split) for split in splits},
            "images_decoded": num_images - reused,
            "images_reused": reused,
            "per_shard": [
                {"split": r.split, "index": r.index, "num_images": r.num_images, "num_bytes": r.num_bytes,
                 "digest": r.digest, "reused": r.reused, "decode_node_id": r.node_id,
                 "decode_elapsed_s": round(r.elapsed_s, 4),
                 "classify_node_id": classified[r.chunk_path]["node_id"] if r.chunk_path in classified else None}
                for r in ordered
            ],
        },
        "metrics": {m: accuracy_report(confusions[m], classes) for m in cfg.metrics},
        "elapsed_s": elapsed,
        "throughput": {"decode_images_per_s": num_images / elapsed["decode"] if elapsed["decode"] else None},
        "memory": {
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "worker_peak_rss_bytes": max(worker_peaks.values(), default=0),
            "workers": len(worker_peaks),
        },
        "ray": distributed.cluster_info(),
    }
    return results, prototypes
