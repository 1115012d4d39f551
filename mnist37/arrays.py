"""Arrow arrays from NumPy and back without pandas: what `pa.array()`, `pa.scalar()` and
`to_numpy()` give, from and to the buffers themselves. Those calls look for pandas objects, which
imports pandas where it is installed: ~0.4 s of every Ray worker's first task here. Chunks,
container reads and predictions build and read their columns through these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def arrow_array(values: np.ndarray) -> pa.Array:
    """A 1-D NumPy array as an Arrow array: numbers without a copy, booleans as bits, fixed-width bytes ('S') as
    binary, each up to its first NUL. What pa.array() gives, without its
    look for pandas objects, which imports pandas where it is installed: ~0.4 s of every Ray
    worker's first task here."""
    values = np.ascontiguousarray(values)
    if values.dtype.kind == "b":  # Arrow's booleans are bits
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    if values.dtype.kind in "iuf":
        return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])
    if values.dtype.kind != "S":
        raise TypeError(f"arrow_array: numbers or 'S' bytes, not {values.dtype}")
    width = values.dtype.itemsize
    chars = values.view(np.uint8).reshape(len(values), width)
    nul = chars == 0  # each value ends at its first NUL, as pa.array() reads it
    lengths = np.where(nul.any(axis=1), nul.argmax(axis=1), width)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = chars[np.arange(width) < lengths[:, None]]
    return pa.Array.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def numbers(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer, floating point or boolean Arrow column as NumPy (a view of its buffer where
    it is one chunk of numbers); nulls read as 0 (False). What to_numpy() gives, without the
    pandas import it makes (see `arrow_array`)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    kind = column.type
    if pa.types.is_boolean(kind):
        dtype = np.dtype(bool)
    elif pa.types.is_integer(kind):
        dtype = np.dtype(f"{'i' if pa.types.is_signed_integer(kind) else 'u'}{kind.bit_width // 8}")
    elif pa.types.is_floating(kind):
        dtype = np.dtype(f"f{kind.bit_width // 8}")
    else:
        raise TypeError(f"numbers: a column of numbers, not {kind}")
    parts = []
    for chunk in chunks:
        validity, data = chunk.buffers()[:2]
        if dtype == bool:
            values = _bits(data, chunk.offset, len(chunk))
        else:
            values = np.frombuffer(data, dtype=dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize)
        if chunk.null_count:
            values = np.where(_bits(validity, chunk.offset, len(chunk)), values, dtype.type(0))
        parts.append(values)
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def valid(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """bool [N]: where `column` is not null (is_valid(), without pandas: see `arrow_array`)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_bits(chunk.buffers()[0], chunk.offset, len(chunk)) if chunk.null_count else np.ones(len(chunk), dtype=bool)
             for chunk in chunks]
    return np.concatenate(parts) if parts else np.empty(0, dtype=bool)


def _bits(buffer: pa.Buffer, offset: int, count: int) -> np.ndarray:
    """bool [count]: an Arrow bitmap's bits from `offset` (least significant bit first)."""
    return np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), count=offset + count, bitorder="little")[offset:].astype(bool)


def arrow_strings(strings: Sequence[str]) -> pa.Array:
    """`pa.array(strings, pa.string())`, without its look for pandas (see `arrow_array`)."""
    try:
        encoded = [s.encode() for s in strings]
    except UnicodeEncodeError:  # a name that is not UTF-8: pa.array says what it says of it
        return pa.array(list(strings), pa.string())
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    if offsets[-1] >= 2**31:
        return pa.array(list(strings), pa.string())
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                             pa.py_buffer(b"".join(encoded))])


def arrow_text(text: str) -> pa.Scalar:
    """`pa.scalar(text)`, without its look for pandas (see `arrow_array`)."""
    return arrow_strings([text])[0]
