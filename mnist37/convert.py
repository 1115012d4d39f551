"""The converter: any data set the job reads, rewritten once as Parquet or WebDataset shards.

    python jobs/convert.py --data ../shared/data/mnist_png.tgz --train-split training \
        --eval-split testing --to webdataset --dest data/mnist-wds --shard-size 8192

The job's own plan cuts the input (a PNG folder, Parquet, tar shards, IDX) into shards of
`shard_size` images; each becomes one output file, written by one process of a pool:

- `parquet`: Hugging Face datasets' layout, `data/<split>-NNNNN-of-NNNNN.parquet`, an `image`
  column (struct of `bytes`, `path`), an int64 `label`, the class names as the label's
  ClassLabel `names` in the `huggingface` schema metadata; row groups of 1024 rows.
- `webdataset`: `<split>-NNNNNN.tar`, members `<key>.cls` (class index as text) and `<key>.png`,
  and `classes.txt` (one name a line, index order).
- `idx`: `<split>-images-idx3-ubyte` and `<split>-labels-idx1-ubyte`, uncompressed, the images
  decoded (class names must be label values 0..255, as MNIST's digits are); each shard's part
  is decoded by the pool, the driver joins the parts behind the headers.

Encoded images are copied as they are (IDX pixels are encoded as PNG), so a PNG the job would
reject is rejected the same way after conversion (to IDX, such a PNG is left out and reported). Records without a usable class (a label out
of range, an unreadable file) are left out and reported. Everything is written into
`<dest>.partial/`, each file under a temporary name renamed into place, and the folder is
renamed to `<dest>` once every file is there: a killed conversion leaves nothing to trust.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mnist37 import Mnist37Error
from mnist37.config import Config
from mnist37.decode import DecodeError, decode_png, read_file
from mnist37.folder import locate
from mnist37.plan import plan
from mnist37.formats import CLASSES_FILE, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, ContainerShard, label_problem, read_idx, read_record_columns, record_classes
from mnist37.shards import Shard

log = logging.getLogger(__name__)

TARGETS = ("parquet", "webdataset", "idx")
ROW_GROUP_ROWS = 1024


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


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def records(shard: Shard | ContainerShard, root: Path, shape: tuple[int, int]):
    """(record path, class index or None, encoded bytes or None, reason) of a shard's records;
    None as class index means a class not selected (ignored)."""
    if isinstance(shard, Shard):
        for path, c in zip(shard.paths, shard.class_indices.tolist()):
            try:
                yield path, c, read_file(root, path), None
            except DecodeError as e:
                yield path, c, None, e.reason
        return
    if shard.format == "idx":
        pixels, labels, _ = read_idx(shard, root, shape)
        for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
            c = int(shard.class_map[label])
            yield f"{shard.source}:{shard.start + i}", (c if c >= 0 else None), _png(image) if c >= 0 else None, None
        return
    columns = read_record_columns(shard, root)
    for i, c in enumerate(record_classes(columns.labels, columns.has_label, shard).tolist()):
        path, problem = columns.path(i), columns.problems.get(i)
        if c == len(shard.classes):
            label = int(columns.labels[i]) if columns.has_label[i] else None
            yield path, -1, None, problem or label_problem(label, shard.declared)
        else:
            yield path, (c if c >= 0 else None), columns.data[i], problem


def _tar_header(name: str, size: int) -> bytes:
    """A ustar header for a regular file (mode 0444, mtime 0: the same input gives the same bytes)."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ConvertError(f"{name}: member name over 100 bytes")
    header = bytearray(512)
    header[0:len(encoded)] = encoded
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _write_shard(shard: Shard | ContainerShard, root: Path, shape: tuple[int, int], classes: list[str],
                 target: str, partial: Path, name: str) -> Written:
    """One input shard into one output file at `partial/name`, through a temporary name."""
    out = partial / name
    temp = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped, ignored, n = [], 0, 0
    if target == "idx":  # raw pixels and label values, joined into one file per split by `convert`
        values = [int(c) for c in classes]
        with open(temp, "wb", buffering=1 << 20) as f, open(out.with_suffix(".labels"), "wb") as labels:
            for path, c, data, reason in records(shard, root, shape):
                if c is None:
                    ignored += 1
                    continue
                if c >= 0 and data is not None:
                    try:
                        f.write(decode_png(data, path, shape).tobytes())
                    except DecodeError as e:
                        reason, c = e.reason, -1
                    else:
                        labels.write(bytes([values[c]]))
                        n += 1
                        continue
                skipped.append((path, reason))
    elif target == "webdataset":
        with open(temp, "wb", buffering=1 << 20) as f:
            for path, c, data, reason in records(shard, root, shape):
                if c is None:
                    ignored += 1
                    continue
                if c < 0 or data is None:
                    skipped.append((path, reason))
                    continue
                key = f"{shard.index:06d}_{n:07d}"
                for member, payload in ((f"{key}.cls", str(c).encode()), (f"{key}.png", data)):
                    f.write(_tar_header(member, len(payload)))
                    f.write(payload)
                    f.write(bytes(-len(payload) % 512))
                n += 1
            f.write(bytes(1024))  # end of archive: two zero blocks
    else:
        features = {"image": {"_type": "Image"}, "label": {"names": list(classes), "_type": "ClassLabel"}}
        schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                            ("label", pa.int64())],
                           metadata={"huggingface": json.dumps({"info": {"features": features}})})
        with pq.ParquetWriter(temp, schema) as writer:
            batch: list[tuple[str, int, bytes]] = []

            def flush():
                writer.write_table(pa.table({
                    "image": pa.StructArray.from_arrays([pa.array([b for _, _, b in batch], pa.binary()),
                                                         pa.array([p for p, _, _ in batch], pa.string())],
                                                        names=["bytes", "path"]),
                    "label": pa.array([c for _, c, _ in batch], pa.int64())}, schema=schema),
                    row_group_size=ROW_GROUP_ROWS)
                batch.clear()

            for path, c, data, reason in records(shard, root, shape):
                if c is None:
                    ignored += 1
                elif c < 0 or data is None:
                    skipped.append((path, reason))
                else:
                    batch.append((path, c, data))
                    n += 1
                    if len(batch) == ROW_GROUP_ROWS:
                        flush()
            if batch or not n:
                flush()
    os.replace(temp, out)
    return Written(shard.split, name, n, skipped, ignored)


def _output_names(shards: list, target: str) -> list[str]:
    totals: dict[str, int] = {}
    for s in shards:
        totals[s.split] = totals.get(s.split, 0) + 1
    names, seen = [], {}
    for s in shards:
        i = seen[s.split] = seen.get(s.split, -1) + 1
        names.append(f"data/{s.split}-{i:05d}-of-{totals[s.split]:05d}.parquet" if target == "parquet"
                     else f"{s.split}-{i:06d}.tar" if target == "webdataset" else f"parts/{s.split}-{i:06d}.images")
    return names


def _join_idx(partial: Path, written: list[Written], split: str, shape: tuple[int, int]) -> None:
    """One split's IDX pair from its parts, in order: big-endian sizes after the magic."""
    parts = [partial / w.path for w in written if w.split == split]
    n = sum(w.num_records for w in written if w.split == split)
    for name, magic, sizes, suffix in ((f"{split}-images-idx3-ubyte", IDX_IMAGES_MAGIC, (n, *shape), ".images"),
                                       (f"{split}-labels-idx1-ubyte", IDX_LABELS_MAGIC, (n,), ".labels")):
        temp = partial / f".{name}.partial"
        with open(temp, "wb") as out:
            out.write(struct.pack(f">I{len(sizes)}I", magic, *sizes))
            for part in parts:
                with open(part.with_suffix(suffix), "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        os.replace(temp, partial / name)


def convert(cfg: Config, dest: Path, target: str, workers: int | None = None) -> dict:
    """Rewrite the data set `cfg` reads (its train and eval splits, its classes) at `dest` as
    `target` ("parquet" or "webdataset"), one output file per shard of `cfg.shard_size`
    images. Returns what was written: files, records, skipped records, seconds."""
    if target not in TARGETS:
        raise ConvertError(f"to: unknown output format {target!r}; expected one of {', '.join(TARGETS)}")
    dest = Path(dest)
    if dest.exists():
        raise ConvertError(f"{dest} already exists; remove it or choose another destination")
    clock = time.perf_counter()
    planned = plan(locate(cfg))
    cfg = planned.cfg  # with the data set's splits and classes filled in
    if target == "idx" and not all(c.isdigit() and int(c) < 256 for c in planned.classes):
        raise ConvertError(f"to idx: IDX labels are the class names as values 0..255, got classes {planned.classes}")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a conversion killed earlier
    partial.mkdir(parents=True)
    names = _output_names(planned.shards, target)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        futures = [pool.submit(_write_shard, shard, planned.root, planned.shape, planned.classes, target, partial,
                               name) for shard, name in zip(planned.shards, names)]
        written = [f.result() for f in futures]
    if target == "webdataset":
        (partial / CLASSES_FILE).write_text("".join(c + "\n" for c in planned.classes))
    if target == "idx":
        for split in (cfg.train_split, cfg.eval_split):
            _join_idx(partial, written, split, planned.shape)
        shutil.rmtree(partial / "parts")
    os.replace(partial, dest)
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

