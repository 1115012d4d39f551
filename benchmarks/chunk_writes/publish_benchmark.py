"""What flushing a chunk to disk costs: `mnist37.chunks.write_chunk` (writes.publish: the
temporary fsync'd, renamed, its folder fsync'd) against the write it replaced (pa.OSFile and a
rename, nothing flushed), on real chunks of 8192 28x28 images (6.4 MB), rounds alternating.

    python benchmarks/chunk_writes/publish_benchmark.py --dir /tmp --chunks 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mnist37.chunks import chunk_table, write_chunk
from mnist37.storage.partials import claimed, partial_name


def unflushed(path: Path, table: pa.Table) -> int:
    """The write before writes.publish (commit 0af93a2): no fsync."""
    partial = path.with_name(partial_name(path.name))
    os.makedirs(path.parent, exist_ok=True)
    with claimed(partial):
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(partial, path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (8192, 28, 28), dtype=np.uint8)
    table = chunk_table(images, [0] * 8192, [f"train/3/{i}.png" for i in range(8192)], ["3", "7"], "train")
    times: dict[str, list[float]] = {"unflushed (before)": [], "write_chunk (publish, fsync)": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for i in range(args.chunks):
            for name, write in (("unflushed (before)", unflushed), ("write_chunk (publish, fsync)", write_chunk)):
                path = Path(folder) / name.split()[0] / f"train-8192-{i:06d}.arrow"
                start = time.perf_counter()
                write(path, table)
                times[name].append((time.perf_counter() - start) * 1000)
    for name, values in times.items():
        print(f"{name:<30} median {statistics.median(values):7.2f} ms a 6.4 MB chunk "
              f"(min {min(values):.2f}, max {max(values):.2f}, {len(values)} chunks)")


if __name__ == "__main__":
    main()
