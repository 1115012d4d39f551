"""The CPU's l1 sums: float32 sums of absolute differences, four images at a time, compiled by numba.

torch.cdist(p=1) walks one (image, class) pair at a time; l1 has no matrix-product form to hand
to a BLAS. This kernel reads each class's values once for four images, in slabs of SLAB_VALUES
values that stay in cache (four image slabs of 16 KB, a class slab of 16 KB), and LLVM
vectorizes the inner loop (16 float32 lanes with AVX-512). It computes what torch.cdist
does, float32 |x_i - p_i| summed, in another order, so the same bound holds
(distances.l1_sums: any order). Only reassociation is allowed of the fast-math flags.
3.5x torch.cdist on slabs on one thread at 1,000 classes x 64x64x3, 2.1x at 10 classes x
28x28 (benchmarks/distances/).

Compiled on a process's first call, ~1.5 s, or read from numba's cache (beside this module, or
numba's per-user cache where that is read-only), ~0.1 s; importing numba costs ~0.3 s, so
mnist37.distances imports this module on its first CPU l1 sums, not before.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Values of each row summed in one pass: four image slabs and a class slab of 16 KB each.
SLAB_VALUES = 4096
# Images sharing each pass over a class's values.
IMAGES_AT_ONCE = 4


def _compiled(**options):
    """numba.njit with its on-disk cache, or without where numba finds no place it may write one
    (it raises RuntimeError then): the kernel is compiled in each process instead."""
    def decorate(function):
        try:
            return njit(cache=True, **options)(function)
        except RuntimeError:
            return njit(**options)(function)

    return decorate


@_compiled(nogil=True, fastmath={"reassoc"}, boundscheck=False)
def _four(a0, a1, a2, a3, b):
    s0, s1, s2, s3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
    for k in range(b.shape[0]):
        v = b[k]
        s0 += np.abs(a0[k] - v)
        s1 += np.abs(a1[k] - v)
        s2 += np.abs(a2[k] - v)
        s3 += np.abs(a3[k] - v)
    return s0, s1, s2, s3


@_compiled(nogil=True, boundscheck=False)
def _sums(x, p, out, slab):
    # x float32 [N, P], N a multiple of 4; p float32 [C, P]; out float32 [N, C], zeros
    n, values = x.shape
    for i in range(0, n, 4):
        for first in range(0, values, slab):
            last = min(first + slab, values)
            a0, a1, a2, a3 = x[i, first:last], x[i + 1, first:last], x[i + 2, first:last], x[i + 3, first:last]
            for c in range(p.shape[0]):
                t0, t1, t2, t3 = _four(a0, a1, a2, a3, p[c, first:last])
                out[i, c] += t0
                out[i + 1, c] += t1
                out[i + 2, c] += t2
                out[i + 3, c] += t3


def l1_sums(x: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """float32 [N, C]: sum_i |x_ni - p_ci| of float32 [N, P] pixel values and float32 [C, P]
    prototypes, each term rounded to float32 and summed in float32 in some order."""
    n = len(x)
    padded = -(-n // IMAGES_AT_ONCE) * IMAGES_AT_ONCE
    if padded == n:  # a batch of 1,024: the pixels as they are, no copy
        rows = np.ascontiguousarray(x, dtype=np.float32)
    else:
        rows = np.zeros((padded, x.shape[1]), dtype=np.float32)
        rows[:n] = x
    out = np.zeros((padded, len(prototypes)), dtype=np.float32)
    if padded and len(prototypes) and x.shape[1]:
        _sums(rows, np.ascontiguousarray(prototypes, dtype=np.float32), out, SLAB_VALUES)
    return out[:n]
