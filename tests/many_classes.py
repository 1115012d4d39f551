"""An evaluation's outcome at many classes without running the job: what `evaluation.classify`
holds once every chunk is classified (confusion matrices, boundary examples built by
`classify.boundary_examples` and kept by `BoundaryExamples` as the driver keeps them), the
prototypes, and results.json's contents around them, in ImageNet's shape (1,000 classes with
WordNet ids, 8 training and 2 validation images each, 64x64 RGB). For the outputs' tests and
benchmarks/many_outputs; it runs against an older mnist37 too (no `outcome_json`), so that the
benchmark can show what that one wrote."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mnist37 import evaluation, report
from mnist37.accuracy import accuracy_report
from mnist37.classify import Misclassified, boundary_examples
from mnist37.examples import BoundaryExamples, Example


@dataclass
class Outcome:
    results: dict  # results.json's contents
    prototypes: np.ndarray  # float32 [C, 3, H, W]
    confusions: dict[str, np.ndarray]  # metric -> int64 [C, C]
    examples: BoundaryExamples


def synthesize(num_classes: int = 1000, shape: tuple[int, ...] = (3, 64, 64), train: int = 8, valid: int = 2,
               k: int = 4, metrics: tuple[str, ...] = ("l1", "l2"), accuracy: float = 0.05, seed: int = 0) -> Outcome:
    """Every validation image is nearest to its own class with probability `accuracy`, else to a
    random one; its distances are random, the predicted one the smallest."""
    rng = np.random.default_rng(seed)
    classes = [f"n{1440764 + 7 * c:08d}" for c in range(num_classes)]
    true = np.repeat(np.arange(num_classes), valid)
    paths = [f"val/{classes[c]}/ILSVRC2012_val_{i:08d}.JPEG" for i, c in enumerate(true)]
    images = rng.integers(0, 256, (len(true), *shape), dtype=np.uint8)
    # Class means are smooth: random 8x8 fields enlarged, with a little noise
    coarse = rng.random((num_classes, *shape[:-2], 8, 8), dtype=np.float32)
    smooth = coarse.repeat(shape[-2] // 8, axis=-2).repeat(shape[-1] // 8, axis=-1)
    prototypes = np.clip(smooth + rng.normal(0, 0.02, smooth.shape), 0, 1).astype(np.float32)
    confusions, found = {}, {}
    for metric in metrics:
        dist = rng.uniform(0.2, 0.5, (len(true), num_classes)).astype(np.float32)
        guess = np.where(rng.random(len(true)) < accuracy, true, rng.integers(0, num_classes, len(true)))
        dist[np.arange(len(true)), guess] = dist.min(axis=1) - 0.01
        confusions[metric] = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusions[metric], (true, guess), 1)
        rows = np.flatnonzero(guess != true)
        wrong = Misclassified(rows, true[rows], guess[rows], dist[rows, true[rows]] - dist[rows, guess[rows]],
                              dist[rows])
        # As classify.classify_chunk sends them back
        found[metric] = {c: {side: [Example(paths[row], int(wrong.true[i]), int(wrong.predicted[i]),
                                            float(wrong.margins[i]), wrong.distances[i].tolist(),
                                            np.array(images[row]))
                                    for i in picks for row in [int(wrong.rows[i])]]
                             for side, picks in sides.items()}
                         for c, sides in boundary_examples(wrong, num_classes, k).items()}
    examples = BoundaryExamples(k)
    examples.add(found)
    many = getattr(report, "many_classes", lambda names: False)(classes)
    if many:
        examples.keep_worst(confusions, 2 * report.EXAMPLE_CLASSES)  # as evaluation.classify does
    counts = {"train": dict.fromkeys(classes, train), "val": dict.fromkeys(classes, valid)}
    results = {
        "config": {"eval_split": "val", "train_split": "train", "metrics": list(metrics), "report_examples": k},
        "data": {"source": "imagenet-shaped", "root": "/data/imagenet-shaped", "format": "folder",
                 "fingerprint": "0" * 32},
        "classes": classes,
        "image_shape": list(shape),
        "counts": counts,
        "files": {split: {name: {"found": n, "used": n, "rejected": 0, "ignored": 0} for name, n in c.items()}
                  for split, c in counts.items()},
        "rejected": [],
        "shards": {"shard_size": 8192, "transport": "filesystem", "count": {"train": 1, "val": 1},
                   "files_reused": 0},
    }
    if hasattr(evaluation, "outcome_json"):
        results |= evaluation.outcome_json(evaluation.Classification(confusions, {}, examples, 0.0), classes)
    else:
        results["metrics"] = {m: accuracy_report(confusions[m], classes) for m in metrics}
    if not many:
        results["examples"] = examples.report()
    results |= {"elapsed_s": {"decode": 8.0, "classify": 31.8, "total": 48.0}, "ray": {"nodes": [{}]},
                "outputs": report.output_names(classes, metrics) if many or hasattr(evaluation, "outcome_json")
                else report.output_names(classes)}
    return Outcome(results, prototypes, confusions, examples)
