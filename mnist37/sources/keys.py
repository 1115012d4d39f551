"""The one home of the keys and digests a chunk is reused by, for every kind of shard.

- A shard's *files key* says what its chunk was made from: for a folder shard every folder
  and file name with each file's (size, mtime) (`files_key`); for a container shard the
  container files' (path, size, mtime), the shard's range, columns, class selection and image
  shape (`container_key`). Both start from the decode settings (`images.Decoding.settings`), so a
  change of settings decodes again. A chunk is reused only when its recorded key equals the
  shard's key now.
- A shard's *digest* says what its content was: a folder shard's is the sum, modulo 2**128, of
  each file's BLAKE2b (`file_digest`, a set hash, so a data set's fingerprint is the same
  however it is cut into shards: `combine_digests`); a container shard's is one xxh3-128 over
  its range and bulk bytes (`shard_digest`).
- A kept folder listing is named by its folder's path (`listing_name`).

These values are stored in every user's chunk folder: tests/test_golden_keys.py pins them, and
changing one makes every cache decode again, so it must be deliberate.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence

import numpy as np
import xxhash


DIGEST = "xxh3-128/v1"  # how a container shard's digest is made (shard_digest); part of its key


def files_key(groups: Sequence[tuple[str, Sequence[bytes]]], stats: Sequence[tuple[int, int]],
              settings: str) -> str:
    """BLAKE2b of the decode settings (images.Decoding.settings), every folder and file name,
    and every (size, mtime)."""
    h = hashlib.blake2b(settings.encode(), digest_size=16)
    for folder, names in groups:
        h.update(b"\0" + os.fsencode(folder) + b"\0")
        h.update(b"\0".join(names))
    h.update(np.array(stats, dtype=np.int64).tobytes())
    return h.hexdigest()


def container_key(stamps: Sequence[tuple[str, int, int]], fields: Sequence, class_map: np.ndarray,
                  settings: str) -> str:
    """BLAKE2b of the decode settings and digest kind, each container file's (path, size,
    mtime ns), the shard's `fields` (format, range, columns, declared labels, shape) and its
    class map (int32 [L])."""
    h = hashlib.blake2b(f"{settings}/digest-{DIGEST}".encode(), digest_size=16)
    for stamp in stamps:
        h.update(json.dumps(list(stamp)).encode())
    h.update(json.dumps(list(fields)).encode())
    h.update(np.ascontiguousarray(class_map, dtype="<i4").tobytes())
    return h.hexdigest()


def file_digest(path: bytes, data: bytes) -> int:
    """128-bit BLAKE2b of one file's relative path and bytes."""
    h = hashlib.blake2b(path, digest_size=16)
    h.update(b"\0")
    h.update(data)
    return int.from_bytes(h.digest(), "little")


def combine_digests(*digests: int | str) -> int:
    """Sum of digests modulo 2**128: a set hash, so a data set's fingerprint is the same
    however its files are cut into shards and in whatever order shards finish."""
    return sum(int(d, 16) if isinstance(d, str) else d for d in digests) % (1 << 128)


def shard_digest(source: str, start: int, stop: int, *parts: bytes) -> str:
    """xxh3-128 of a container shard's range, then of each part preceded by its length. One
    hash over bulk bytes: per record, hashing calls would cost more than a tenth of a decode."""
    digest = xxhash.xxh3_128(f"{source}:{start}:{stop}".encode())
    for part in parts:
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)
    return digest.hexdigest()


def listing_name(folder: bytes) -> str:
    """The file a class folder's listing is kept in, named by the folder's path."""
    return f"{hashlib.blake2b(folder, digest_size=12).hexdigest()}.npz"
