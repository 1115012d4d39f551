"""The converter: any data set the job reads, rewritten once in another format of the sources table.

    python jobs/convert.py --data ../shared/data/mnist_png.tgz --train-split training \
        --eval-split testing --to webdataset --dest data/mnist-wds --shard-size 8192

The job's own plan cuts the input (a PNG folder, Parquet, tar shards, IDX) into shards of
`shard_size` images; each becomes one output file, written by one process of a pool through
the target format's writer module (protocol.Sink: `parquet_writer`, `webdataset_writer`,
`idx_writer`; every format whose table entry names a writer): its `ShardWriter`, named by its
`output_name`, then completed by its `finish` (WebDataset's classes.txt; IDX joins each
split's parts behind the headers).

Encoded images are copied as they are (IDX pixels are encoded as PNG), so a PNG the job would
reject is rejected the same way after conversion (to IDX, such a PNG is left out and reported).
Records without a usable class (a label out of range, an unreadable file) are left out and
reported. Everything is written into a temporary folder beside `<dest>`, flushed to disk and
renamed to `<dest>` once every file is there (`writes.publish_folder`): a killed conversion
leaves nothing to trust, and the next one removes what it left.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mnist37 import Mnist37Error, sources
from mnist37.config import Config
from mnist37.locate import locate
from mnist37.plan import plan
from mnist37.png import DecodeError
from mnist37.sources.protocol import Shard
from mnist37.steps import worker_processes
from mnist37.storage import partials
from mnist37.storage.writes import publish_folder

log = logging.getLogger(__name__)

TARGETS = sources.TARGETS

class ConvertError(Mnist37Error, ValueError):
    """A conversion that cannot start: a target that exists, an unknown output format."""


@dataclass
class Written:
    """One output file."""

    split: str
    path: str  # relative to the destination
    num_records: int
    skipped: list[tuple[str, str]]  # (record path, reason) of records left out
    ignored: int  # records of classes not selected


def _write_shard(shard: Shard, root: Path, shape: tuple[int, int], classes: list[str],
                 target: str, staging: Path, name: str) -> Written:
    """One input shard into one output file at `staging/name` (the folder is published whole)."""
    out = staging / name
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped, ignored, n = [], 0, 0
    writer = sources.writer_module(target).ShardWriter(out, out, classes, shape, shard.index)
    try:
        for path, c, data, reason in shard.records(root, shape):
            if c is None:
                ignored += 1
                continue
            if c < 0 or data is None:
                skipped.append((path, reason))
                continue
            try:
                writer.add(path, c, data)
            except DecodeError as e:
                skipped.append((path, e.reason))
                continue
            n += 1
    finally:
        writer.close()
    return Written(shard.split, name, n, skipped, ignored)


def _output_names(shards: list, target: str) -> list[str]:
    output_name = sources.writer_module(target).output_name
    totals: dict[str, int] = {}
    for s in shards:
        totals[s.split] = totals.get(s.split, 0) + 1
    names, seen = [], {}
    for s in shards:
        i = seen[s.split] = seen.get(s.split, -1) + 1
        names.append(output_name(s.split, i, totals[s.split]))
    return names


def convert(cfg: Config, dest: Path, target: str, workers: int | None = None) -> dict:
    """Rewrite the data set `cfg` reads (its train and eval splits, its classes) at `dest` as
    `target` (one of TARGETS), one output file per shard of `cfg.shard_size` images. Returns
    what was written: files, records, skipped records, seconds."""
    if target not in TARGETS:
        raise ConvertError(f"to: unknown output format {target!r}; expected one of {', '.join(TARGETS)}")
    module = sources.writer_module(target)
    dest = Path(dest)
    if dest.exists():
        raise ConvertError(f"{dest} already exists; remove it or choose another destination")
    clock = time.perf_counter()
    planned = plan(locate(cfg))
    cfg = planned.cfg  # with the data set's splits and classes filled in
    if (why := module.check_classes(planned.classes)) is not None:
        raise ConvertError(f"to {target}: {why}")
    partials.clean(dest.parent, partials.partials_of(dest.name))  # conversions killed earlier
    names = _output_names(planned.shards, target)
    try:
        with publish_folder(dest) as staging, ProcessPoolExecutor(max_workers=workers or os.cpu_count(),
                                                                    mp_context=worker_processes()) as pool:
            futures = [pool.submit(_write_shard, shard, planned.root, planned.shape, planned.classes, target,
                                   staging, name) for shard, name in zip(planned.shards, names)]
            written = [f.result() for f in futures]
            module.finish(staging, written, planned.classes, (cfg.train_split, cfg.eval_split), planned.shape)
    except FileExistsError:  # made meanwhile
        raise ConvertError(f"{dest} already exists; remove it or choose another destination") from None
    skipped = sorted(r for w in written for r in w.skipped)
    for path, reason in skipped[:20]:
        log.warning("left out %s: %s", path, reason)
    return {
        "source": str(planned.root), "source_format": planned.format, "dest": str(dest), "to": target,
        "classes": planned.classes, "files": len(written),
        "records": {split: sum(w.num_records for w in written if w.split == split)
                    for split in (cfg.train_split, cfg.eval_split)},
        "ignored": sum(w.ignored for w in written),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "elapsed_s": time.perf_counter() - clock,
    }
