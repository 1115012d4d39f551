"""The evaluation job's stages in order: scan → decode (Ray) → prototypes → classify (Ray) → accuracy.

`evaluate(cfg)` needs a connected Ray (`ray.init()` is the caller's) and returns everything
results.json holds, plus the prototypes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from mnist37 import Mnist37Error, __version__, distributed
from mnist37.config import Config
from mnist37.decode import combine_digests, image_shape
from mnist37.folder import find_root, list_samples
from mnist37.metrics import accuracy_report
from mnist37.prototypes import prototypes as make_prototypes
from mnist37.shards import make_shards

log = logging.getLogger(__name__)


def _counts(class_indices, classes) -> dict[str, int]:
    per_class = np.bincount(np.asarray(class_indices, dtype=np.int64), minlength=len(classes))
    return {name: int(n) for name, n in zip(classes, per_class)}


def evaluate(cfg: Config) -> tuple[dict, np.ndarray]:
    """Run the job on the connected Ray cluster; return (results, prototypes float32 [C, H, W])."""
    elapsed: dict[str, float] = {}
    classes = cfg.classes
    splits = (cfg.train_split, cfg.eval_split)
    clock = time.perf_counter()

    root = find_root(cfg.data, cfg.train_split, cfg.cache_dir or None)
    samples = {split: list_samples(root, split, classes) for split in splits}
    shape = image_shape(root, samples[cfg.train_split][0].path)
    shards = [shard for split in splits for shard in make_shards(samples[split], split, cfg.shard_size)]
    chunk_dir = Path(cfg.chunk_dir or Path(cfg.out) / "chunks").resolve()
    max_in_flight = cfg.max_in_flight or distributed.default_max_in_flight()
    elapsed["scan"] = time.perf_counter() - clock
    log.info("%s: %s, %d shards of up to %d images", root, ", ".join(
        f"{split} {len(samples[split])} images" for split in splits), len(shards), cfg.shard_size)

    # Decode: training sums are reduced as shards finish; the driver keeps only small records.
    clock = time.perf_counter()
    sums = np.zeros((len(classes), *shape), dtype=np.int64)
    decoded_counts = {split: np.zeros(len(classes), dtype=np.int64) for split in splits}
    records = {}
    for done in distributed.decode_shards(shards, root, classes, shape, chunk_dir, cfg.train_split, max_in_flight):
        decoded_counts[done.split] += done.counts
        if done.pixel_sums is not None:
            sums += done.pixel_sums
        records[(done.split, done.index)] = done
    elapsed["decode"] = time.perf_counter() - clock
    for split in splits:
        listed = _counts([s.class_index for s in samples[split]], classes)
        decoded = dict(zip(classes, decoded_counts[split].tolist()))
        if decoded != listed:  # never report on silently fewer images
            raise Mnist37Error(f"{split}/: listed {listed} images per class but decoded {decoded}")

    clock = time.perf_counter()
    prototypes = make_prototypes(sums, decoded_counts[cfg.train_split], classes, cfg.train_split)
    elapsed["prototypes"] = time.perf_counter() - clock

    clock = time.perf_counter()
    eval_chunks = [records[key].chunk_path for key in sorted(records) if key[0] == cfg.eval_split]
    confusions = {m: np.zeros((len(classes), len(classes)), dtype=np.int64) for m in cfg.metrics}
    classify_nodes = {}
    for done in distributed.classify_chunks(eval_chunks, prototypes, cfg.metrics, cfg.device,
                                            cfg.gpus_per_task, max_in_flight):
        for metric, matrix in done["confusions"].items():
            confusions[metric] += matrix
        classify_nodes[done["chunk_path"]] = done["node_id"]
    elapsed["classify"] = time.perf_counter() - clock

    fingerprint = f"{combine_digests(*(r.digest for r in records.values())):032x}"

    results = {
        "mnist37_version": __version__,
        "config": cfg.to_dict(),
        "data": {"source": str(cfg.data), "root": str(root), "fingerprint": fingerprint},
        "classes": list(classes),
        "image_shape": list(shape),
        "counts": {split: dict(zip(classes, decoded_counts[split].tolist())) for split in splits},
        "shards": {
            "shard_size": cfg.shard_size,
            "chunk_dir": str(chunk_dir),
            "count": {split: sum(1 for key in records if key[0] == split) for split in splits},
            "per_shard": [
                {"split": r.split, "index": r.index, "num_images": r.num_images, "num_bytes": r.num_bytes,
                 "digest": r.digest, "decode_node_id": r.node_id, "decode_elapsed_s": round(r.elapsed_s, 4),
                 "classify_node_id": classify_nodes.get(r.chunk_path)}
                for r in (records[key] for key in sorted(records))
            ],
        },
        "metrics": {m: accuracy_report(confusions[m], classes) for m in cfg.metrics},
        "elapsed_s": elapsed,
        "ray": distributed.cluster_info(),
    }
    return results, prototypes
