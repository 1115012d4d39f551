"""Benchmark: candidate chunk checksums side by side, on a real chunk's own Arrow buffers.

    python benchmarks/chunk_checksums/hash_benchmark.py --data ../shared/data/mnist_sample.tgz

Decodes the first training shard (--shard-size images) into a chunk in a temporary folder,
memory-maps it, and hashes exactly the bytes mnist37's checksum covers
(`chunks.checksummed_bytes`: zero-copy views of the mapped file) with each candidate, one
core each: xxh3-128 (what mnist37 uses), blake3 (`pip install blake3` to include it, one
thread) and hashlib's blake2b. Prints the median GB/s of --repeats rounds, what hashing a
warm N = 100 run's chunks would cost at that rate, and the whole `verify_chunk` (open the
mapped file, read the footer, hash) per chunk. Findings: README.md beside this file.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root: mnist37, installed or not

import pyarrow as pa  # noqa: E402
import xxhash  # noqa: E402

from mnist37.chunks import checksummed_bytes, verify_chunk  # noqa: E402
from mnist37.locate import find_root  # noqa: E402
from mnist37.shards import decode_shard  # noqa: E402
from mnist37.images import Decoding  # noqa: E402
from mnist37.sources.folder import list_split, make_shards  # noqa: E402

# Pixels a warm run at N = 100 hashes: mnist_sample's 14,434 images of 28x28, 100 times.
WARM_RUN_BYTES = 14_434 * 100 * 28 * 28


def candidates() -> dict:
    found = {"xxh3_128": xxhash.xxh3_128, "blake2b": hashlib.blake2b}
    try:
        import blake3
        found["blake3"] = lambda: blake3.blake3(max_threads=1)
    except ImportError:
        pass
    return found


def rate(new_hasher, pieces: list, min_s: float) -> float:
    """Bytes per second hashing `pieces` again and again for at least `min_s`."""
    total = sum(len(memoryview(p).cast("B")) for p in pieces)
    rounds, clock = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - clock) < min_s:
        hasher = new_hasher()
        for piece in pieces:
            hasher.update(piece)
        hasher.digest()
        rounds += 1
    return rounds * total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ImageFolder folder or .tgz (as for jobs/evaluate.py)")
    parser.add_argument("--classes", nargs="+", default=["3", "7"])
    parser.add_argument("--shard-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-s", type=float, default=0.3, help="seconds per round and candidate")
    args = parser.parse_args()

    root = find_root(args.data, "train")
    shard = make_shards(list_split(root, "train", args.classes), args.shard_size)[0]
    with tempfile.TemporaryDirectory() as store:
        done = decode_shard(shard, root, store, Decoding((28, 28), reuse=False), with_sums=False)
        table = pa.ipc.open_file(pa.memory_map(done.chunk_path, "r")).read_all()
        pieces = list(checksummed_bytes(table))
        size = sum(len(memoryview(p).cast("B")) for p in pieces)
        print(f"chunk {Path(done.chunk_path).name}: {done.num_images} images, {size:,} bytes checksummed "
              f"({done.num_bytes:,} in the file)")
        rates = {name: [] for name in candidates()}
        verify_s = []
        for _ in range(args.repeats):  # rounds alternate candidates: each sees the same machine state
            for name, new_hasher in candidates().items():
                rates[name].append(rate(new_hasher, pieces, args.min_s))
            clock = time.perf_counter()
            verify_chunk(done.chunk_path, done.checksum)
            verify_s.append(time.perf_counter() - clock)
    heading = f"N=100 warm run ({WARM_RUN_BYTES / 1e9:.2f} GB), s of one core"
    print(f"{'hash':<10}{'GB/s':>8}  {heading:>40}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<10}{median / 1e9:>8.2f}  {WARM_RUN_BYTES / median:>40.3f}")
    if "blake3" not in rates:
        print("(blake3 not installed: pip install blake3 to compare it)")
    per_chunk = statistics.median(verify_s)
    print(f"verify_chunk: {per_chunk * 1e3:.2f} ms per chunk of {done.num_images} images "
          f"({size / per_chunk / 1e9:.2f} GB/s, mapped file and footer included)")


if __name__ == "__main__":
    main()
