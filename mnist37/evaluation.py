"""The evaluation job's stages, in the order they run:

    locate   (no Ray)  the data root, the named data set's splits and classes (mnist37.locate)
    plan     (Ray)     the sorted listing of both splits, the image shape, the shards (mnist37.plan)
    decode   (executor) one step per shard: Arrow chunk, counts, pixel sums, rejections
    check_files        found = used + rejected per split and class; the bad-file policy
    prototypes         summed pixel sums / counts, once
    classify (executor) one step per evaluation chunk: confusion matrices, top-k hits, boundary
                       candidates; each step writes its chunk's predictions file
    results_json       everything results.json holds, assembled here and nowhere else

Each stage returns a typed record. `evaluate()` runs decode to classify through an executor
that maps the per-shard steps (mnist37.steps) over shards: the job's is Ray's
(mnist37.on_ray.tasks.RayExecutor, on a Ray the caller connected), the default runs them in
this process. The driver holds a small record per class folder and per shard, never file
names or images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from mnist37 import DatasetError, Mnist37Error, __version__
from mnist37.config import DEFAULT_TOP_K, TOP_K_MIN_CLASSES, Config, ConfigError
from mnist37.predictions import FOLDER, PredictionsFile, PredictionsRequest, make_request, publish_returned, remove_stale
from mnist37.png import BadFilesError
from mnist37.sources.keys import combine_digests
from mnist37.examples import BoundaryExamples
from mnist37.accuracy import accuracy_report, top_k_report
from mnist37.storage.locations import is_uri, store
from mnist37.plan import Plan
from mnist37.progress import Progress, Status
from mnist37.prototypes import PixelSums
from mnist37.report import EXAMPLE_CLASSES, many_classes, output_names
from mnist37.memory import peak_rss_bytes
from mnist37.shards import DecodedShard
from mnist37.steps import (ClassifiedChunk, ClassifyRequest, DecodeRequest, InProcess, Placement,
                           ShardExecutor)
from mnist37.sources.protocol import Listed

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- decode


@dataclass(eq=False)
class Decoded:
    """Every shard decoded (or reused): small per-shard records and the training sums."""

    shards: list[DecodedShard]  # sorted by (split, index); pixel sums dropped once added
    sums: PixelSums  # of the training split: one int64 [C, *image shape], the shards' rows added in
    counts: dict[str, np.ndarray]  # per split: images used per class, int64 [C]
    found: dict[str, np.ndarray]  # per split: files (records) per class the tasks found, int64 [C + 1]
    rejected: list[tuple[str, str]]  # (path, reason), sorted
    transport: str  # how evaluation chunks reach classify tasks
    elapsed_s: float
    placements: dict[str, Placement] = field(default_factory=dict)  # by chunk path: where each shard was decoded


def choose_transport(cfg: Config, chunk_dir: str, num_nodes: int) -> str:
    """Chunks reach classify tasks through the object store on a multi-node cluster, unless
    the chunk store is a URI (shared storage) or the config says otherwise."""
    if cfg.chunk_transport != "auto":
        return cfg.chunk_transport
    return "object_store" if num_nodes > 1 and not is_uri(chunk_dir) else "filesystem"


def decode_requests(planned: Plan) -> list[DecodeRequest]:
    """One request per shard; training shards send back their pixel sums."""
    settings = store()
    return [DecodeRequest(shard, str(planned.root), str(planned.chunk_dir), planned.decoding,
                          shard.split == planned.cfg.train_split, planned.archive, settings)
            for shard in planned.shards]


def decode(planned: Plan, executor: ShardExecutor, status: Status) -> Decoded:
    """Run a decode step per shard; reduce training sums and per-class counts as they finish."""
    cfg, splits = planned.cfg, (planned.cfg.train_split, planned.cfg.eval_split)
    clock = time.perf_counter()
    transport = choose_transport(cfg, planned.chunk_dir, executor.num_nodes())
    sums = PixelSums.zeros(len(planned.classes), planned.shape)
    counts = {split: np.zeros(len(planned.classes), dtype=np.int64) for split in splits}
    found = {split: np.zeros(len(planned.classes) + 1, dtype=np.int64) for split in splits}
    done_shards, rejected, placements = [], [], {}
    status.stage, status.shards_total = "decode", len(planned.shards)
    progress = Progress("decode", len(planned.shards), " shards")
    for done, placement in executor.decode(decode_requests(planned),
                                           cfg.eval_split if transport == "object_store" else None):
        placements[done.chunk_path] = placement
        status.shards_decoded += 1
        progress.update()
        counts[done.split] += done.counts
        found[done.split] += done.found
        rejected += done.rejected
        if done.pixel_sums is not None:
            sums.add(done.pixel_sums)
            done = dataclasses.replace(done, pixel_sums=None)
        done_shards.append(done)
    done_shards.sort(key=lambda r: (splits.index(r.split), r.index))
    return Decoded(done_shards, sums, counts, found, sorted(rejected), transport, time.perf_counter() - clock,
                   placements)


# ---------------------------------------------------------------- check_files


def check_files(planned: Plan, decoding: Decoded) -> dict:
    """Per split and class: image files (records) found, used, rejected, ignored, with found =
    used + rejected everywhere (no image goes missing); then the bad-file policy and the
    classes left with no training images. Returns the accounts for results.json."""
    cfg = planned.cfg
    accounts = file_accounts(planned.names, (cfg.train_split, cfg.eval_split), decoding.shards, planned.listed)
    refused = sum(a["rejected"] for per_class in accounts.values() for a in per_class.values())
    if refused != len(decoding.rejected):
        raise Mnist37Error(f"{refused} image files were not used but {len(decoding.rejected)} rejections were reported")
    found = sum(r.num_files for r in decoding.shards)
    if decoding.rejected and cfg.on_bad_file == "error":
        raise BadFilesError(decoding.rejected, found)
    for name, count in zip(planned.names, decoding.counts[cfg.train_split]):
        if count == 0:
            raise DatasetError(f"Class {name!r} has no usable images under {cfg.train_split}/ "
                               f"(all {accounts[cfg.train_split][name]['found']} rejected)")
    if decoding.rejected:
        log.warning("left out %d of %d image files (on_bad_file = skip); listed in results.json",
                    len(decoding.rejected), found)
    return accounts


def file_accounts(classes: list[str], splits: tuple[str, ...], shards: list[DecodedShard],
                  listed: dict[str, Listed]) -> dict:
    """The files table, every format alike: per split and class, files (records) found, used,
    rejected, from what the decode tasks found; entries a listing passed over (not image
    files) are `ignored` under their class, records of classes not selected under "(other
    classes)", and records whose class could not be read are found and rejected under "(no
    class)". Raises Mnist37Error unless found = used + rejected everywhere, and, where a
    listing counted the files before (`listed`), every file it listed reached the tasks."""
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
        known = listed.get(split)
        passed_over = known.ignored.tolist() if known is not None else [0] * len(classes)
        accounts[split] = {}
        for i, (name, f, u, x) in enumerate(zip([*classes, "(no class)"], found.tolist(), used.tolist(),
                                                refused.tolist())):
            if known is not None and i < len(classes) and f != known.found[i]:
                raise Mnist37Error(f"{split}/{name}/: {known.found[i]} image files listed but {f} "
                                   "reached the decode tasks")
            if f != u + x:
                raise Mnist37Error(f"{split}/{name}: {f} records found but {u} used and {x} rejected")
            if name != "(no class)" or f:
                accounts[split][name] = {"found": f, "used": u, "rejected": x,
                                         "ignored": passed_over[i] if i < len(classes) else 0}
        if ignored:
            accounts[split]["(other classes)"] = {"found": 0, "used": 0, "rejected": 0, "ignored": ignored}
    return accounts


# ---------------------------------------------------------------- classify


@dataclass(eq=False)
class Classification:
    confusions: dict[str, np.ndarray]  # metric -> int64 [C, C], rows = true class
    chunks: dict[str, ClassifiedChunk]  # by chunk path, without their example images
    examples: BoundaryExamples  # per metric and true class, nearest to and farthest from the boundary
    elapsed_s: float
    placements: dict[str, Placement] = field(default_factory=dict)  # by chunk path: where each was classified
    top_k: int = 0  # k of the top-k accuracy; 0: off
    top_k_hits: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> int64 [C]: true class in the top k
    # The predictions files written, in evaluation order (None: predictions = "none")
    predictions: list[PredictionsFile] | None = None


def resolve_top_k(top_k: int, num_classes: int) -> int:
    """The k of top-k accuracy: `top_k` as configured, -1 (auto) being DEFAULT_TOP_K when there
    are at least TOP_K_MIN_CLASSES classes and off (0) otherwise. ConfigError for a k that is
    not less than the number of classes (every class would be in the top k)."""
    if top_k == -1:
        return DEFAULT_TOP_K if num_classes >= TOP_K_MIN_CLASSES else 0
    if top_k >= num_classes:
        raise ConfigError(f"top_k: {top_k} is not less than the {num_classes} classes: every image's class would be "
                          f"among its {top_k} nearest; give a smaller k, or 0 for none")
    return top_k


def predictions_request(planned: Plan, prototypes: np.ndarray, top_k: int,
                        executor: ShardExecutor) -> PredictionsRequest | None:
    """What each classify step needs to write its chunk's predictions (None: predictions off).
    Steps publish the files themselves where every node reaches the output location (an
    object-store prefix, or one node); elsewhere they send them to the driver."""
    cfg = planned.cfg
    remote_out = is_uri(cfg.out) and not cfg.out.startswith("file://")
    return make_request(cfg.predictions, cfg.out, cfg.eval_split, planned.names, cfg.metrics, top_k, prototypes,
                        tasks_publish=remote_out or executor.num_nodes() == 1)


def classify_requests(cfg: Config, chunks: list[DecodedShard], top_k: int = 0,
                      predictions: PredictionsRequest | None = None) -> list[ClassifyRequest]:
    """One request per chunk: the chunk, what decode reported of it, and the config's classify
    settings; with `predictions`, the chunk's predictions file (named by its shard index)."""
    settings = store()
    return [ClassifyRequest(r.chunk_path, r.checksum, tuple(cfg.metrics), cfg.device, cfg.report_examples,
                            cfg.verify_chunks, settings, top_k, predictions and predictions.for_chunk(r.index))
            for r in chunks]


def classify(planned: Plan, decoding: Decoded, prototypes: np.ndarray, executor: ShardExecutor,
             status: Status, top_k: int = 0) -> Classification:
    """Run a classify step per evaluation chunk; sum their confusion matrices and top-k hits as
    they finish. With predictions on, each step writes its chunk's file (or the driver writes
    what a step sent back), and the files of an earlier run into the same folder go."""
    cfg, clock = planned.cfg, time.perf_counter()
    chunks = [r for r in decoding.shards if r.split == cfg.eval_split and r.num_images]
    confusions = {m: np.zeros((len(planned.classes),) * 2, dtype=np.int64) for m in cfg.metrics}
    hits = {m: np.zeros(len(planned.classes), dtype=np.int64) for m in cfg.metrics} if top_k else {}
    request = predictions_request(planned, prototypes, top_k, executor)
    written = {}
    examples = BoundaryExamples(cfg.report_examples)
    classified, placements = {}, {}
    status.stage, status.chunks_total = "classify", len(chunks)
    progress = Progress("classify", len(chunks), " shards")
    for done, placement in executor.classify(classify_requests(cfg, chunks, top_k, request), prototypes):
        placements[done.chunk_path] = placement
        status.chunks_classified += 1
        progress.update()
        for metric, matrix in done.confusions.items():
            confusions[metric] += matrix
        for metric, found in done.top_k.items():
            hits[metric] += found
        if done.predictions is not None:
            written[done.chunk_path] = publish_returned(request, done.predictions)
        examples.add(done.examples)
        if many_classes(planned.names):
            # Pixels and distances ([C] each) only for the classes the report may show: the
            # worst so far, twice as many as it shows, so what the driver holds is bounded.
            examples.keep_worst(confusions, 2 * EXAMPLE_CLASSES)
        classified[done.chunk_path] = dataclasses.replace(done, examples={}, predictions=None)
    files = [written[r.chunk_path] for r in chunks] if request is not None else None
    remove_stale(cfg.out, [f.name for f in files or []])
    return Classification(confusions, classified, examples, time.perf_counter() - clock, placements, top_k, hits,
                          files)


# ---------------------------------------------------------------- the whole evaluation


@dataclass(eq=False)
class Evaluation:
    """What one run found: every stage's record, and the Ray cluster it ran on."""

    plan: Plan
    decoding: Decoded
    accounts: dict
    prototypes: np.ndarray  # float32 [C, H, W] in [0, 1]
    classification: Classification
    cluster: dict
    elapsed_s: dict[str, float] = field(default_factory=dict)


def evaluate(planned: Plan, status: Status | None = None, executor: ShardExecutor | None = None) -> Evaluation:
    """Decode, check the files, make the prototypes and classify, through `executor` (default:
    in this process; the job's: mnist37.on_ray.tasks.RayExecutor)."""
    status, executor = status or Status(), executor or InProcess()
    cfg = planned.cfg
    top_k = resolve_top_k(cfg.top_k, len(planned.names))  # before the work: a k too large is one line at once
    decoding = decode(planned, executor, status)
    accounts = check_files(planned, decoding)
    clock = time.perf_counter()
    prototypes = decoding.sums.prototypes(planned.names, cfg.train_split)
    prototypes_s = time.perf_counter() - clock
    classification = classify(planned, decoding, prototypes, executor, status, top_k)
    return Evaluation(planned, decoding, accounts, prototypes, classification, executor.cluster_info(),
                      {"scan": planned.scan_s, "decode": decoding.elapsed_s, "prototypes": prototypes_s,
                       "classify": classification.elapsed_s})


# ---------------------------------------------------------------- results.json


def _summed(counts) -> dict[str, int]:
    """{kind: images} added up over shards, sorted by kind."""
    total: dict[str, int] = {}
    for c in counts:
        for kind, n in c.items():
            total[kind] = total.get(kind, 0) + n
    return dict(sorted(total.items()))


def _worker_peaks(decoding: Decoded, classification: Classification) -> dict[tuple[str, int], int]:
    """(node, pid) -> the peak RSS of each process that ran a step (pids repeat across nodes)."""
    peaks: dict[tuple[str, int], int] = {}
    for r, where in [*((r, decoding.placements[r.chunk_path]) for r in decoding.shards),
                     *((c, classification.placements[path]) for path, c in classification.chunks.items())]:
        peaks[where.node_id, where.pid] = max(peaks.get((where.node_id, where.pid), 0), r.peak_rss_bytes)
    return peaks


def _per_shard(r: DecodedShard, decoding: Decoded, classification: Classification) -> dict:
    """results.json's record of one shard: what decode found, where it was decoded and classified."""
    decoded = decoding.placements[r.chunk_path]
    record = {"split": r.split, "index": r.index, "num_files": r.num_files, "num_images": r.num_images,
              "rejected": len(r.rejected), "num_bytes": r.num_bytes, "digest": r.digest, "reused": r.reused,
              "decode_node_id": decoded.node_id, "decode_elapsed_s": round(r.elapsed_s, 4),
              "decode_gpu_ids": decoded.gpu_ids}
    if (c := classification.chunks.get(r.chunk_path)) is not None:
        classified = classification.placements[r.chunk_path]
        record |= {"classify_node_id": classified.node_id, "classify_device": c.device,
                   "classify_gpu_ids": classified.gpu_ids, "classify_elapsed_s": round(c.elapsed_s, 4)}
    return record


def results_json(ev: Evaluation, elapsed_s: dict[str, float] | None = None) -> dict:
    """Everything results.json holds (README: Output folder), from one run's records;
    `elapsed_s` adds the caller's timings (ray_init, total) to the stages'."""
    planned, decoding, classification = ev.plan, ev.decoding, ev.classification
    cfg, classes = planned.cfg, planned.names
    splits = (cfg.train_split, cfg.eval_split)
    found = sum(r.num_files for r in decoding.shards)
    reused = sum(r.num_files for r in decoding.shards if r.reused)
    worker_peaks = _worker_peaks(decoding, classification)
    elapsed = {**ev.elapsed_s, **(elapsed_s or {})}
    return {
        "mnist37_version": __version__,
        "config": cfg.to_dict(),
        "data": {"source": str(cfg.data), "root": str(planned.root), "format": planned.format,
                 "folder_listings_reused": planned.listings_reused,
                 "fingerprint": f"{combine_digests(*(r.digest for r in decoding.shards)):032x}"},
        "classes": list(classes),
        "image_shape": list(planned.shape),
        "channels": planned.decoding.channels,
        "resized_to": list(planned.decoding.shape) if planned.decoding.resize else None,
        "conversions": {split: _summed(r.conversions for r in decoding.shards if r.split == split) for split in splits},
        "formats_by_content": [{"path": path, "found": note} for r in decoding.shards for path, note in r.notes],
        "counts": {split: dict(zip(classes, decoding.counts[split].tolist())) for split in splits},
        "files": ev.accounts,
        "rejected": [{"path": path, "reason": reason} for path, reason in decoding.rejected],
        "shards": {
            "shard_size": cfg.shard_size,
            "chunk_dir": planned.chunk_dir,
            "transport": decoding.transport,
            "count": {split: sum(1 for r in decoding.shards if r.split == split) for split in splits},
            "files_decoded": found - reused,
            "files_reused": reused,
            "per_shard": [_per_shard(r, decoding, classification) for r in decoding.shards],
        },
        **outcome_json(classification, classes),
        "predictions": predictions_json(classification, cfg),
        "prototypes_sha256": hashlib.sha256(np.ascontiguousarray(ev.prototypes).tobytes()).hexdigest(),
        **({} if many_classes(classes) else {"examples": classification.examples.report()}),
        "elapsed_s": elapsed,
        "throughput": {"decode_files_per_s": found / decoding.elapsed_s if decoding.elapsed_s else None},
        "memory": {
            "driver_peak_rss_bytes": peak_rss_bytes(),
            "worker_peak_rss_bytes": max(worker_peaks.values(), default=0),
            "workers": len(worker_peaks),
        },
        "ray": ev.cluster,
        "outputs": output_names(classes, cfg.metrics),
    }


def outcome_json(classification: Classification, classes: list[str]) -> dict:
    """results.json's `metrics`: per metric the accuracies, the most-confused pairs and the
    files that hold the confusion matrix and the boundary examples; the matrix also inline up
    to report.INLINE_CLASSES classes (nested lists of a million cells are no reading)."""
    inline = not many_classes(classes)
    k = classification.top_k
    return {"metrics": {m: accuracy_report(matrix, classes, inline_confusion=inline) |
                        ({"top_k": top_k_report(classification.top_k_hits[m], matrix.sum(axis=1), classes, k)}
                         if k else {}) |
                        {"confusion_file": f"confusion_{m}.npy", "examples_file": f"examples_{m}.parquet"}
                        for m, matrix in classification.confusions.items()}}


def predictions_json(classification: Classification, cfg: Config) -> dict:
    """results.json's `predictions`: the columns written, the folder and every file (name,
    rows, bytes, key) in evaluation order; `files` empty when predictions are off."""
    files = classification.predictions or []
    return {"columns": cfg.predictions, "top_k": classification.top_k, "location": FOLDER,
            "rows": sum(f.rows for f in files), "num_bytes": sum(f.num_bytes for f in files),
            "write_s": round(sum(f.elapsed_s for f in files), 4), "files": [f.record() for f in files]}
