"""Distances to the prototypes, exact where it decides: each image's nearest class and its rank.

Each image goes to the class of least *exact* distance (pixels u / 255 as exact fractions, the
prototypes' float32 values), ties to the earlier class in `classes` order, on every device:
fast sums with proven error bounds (l1 through mnist37.l1_kernel on the CPU and torch.cdist
elsewhere, l2 through one matrix product) decide almost every image, and the classes within the
bounds of the best are recomputed in float64 and, where that cannot separate them, in exact
integers (`nearest`). The same bounds rank the true
class among the k nearest (`in_top_k`). Figures: benchmarks/distances/.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mnist37.prototypes import PIXEL_MAX

# The 256 values x / 255 a uint8 pixel can take, as float32, divided on the CPU. CUDA divides a
# tensor by a Python number as a multiplication by its reciprocal, one ulp off for some pixels;
# looking the values up makes every device start from the same float32 numbers.
PIXEL_VALUES = torch.arange(256, dtype=torch.uint8).float().div_(PIXEL_MAX)

# float32's and float64's unit roundoff u: a correctly rounded operation's relative error is at most u.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
# torch.cdist(p=1) reads both rows of every (image, class) pair once per pair: whole 64x64x3
# rows (48 KB each) come from memory every time. In slabs of this many values the slabs of
# the batch and of the prototypes stay in cache (256 x 1,000 prototypes: 1 MB), 1.7x faster
# at 128 images x 1,000 classes x 12,288 values on one thread (benchmarks/distances/).
L1_SLAB_VALUES = 256
# A CPU l1 call of at least this many (image, class, value) triples uses mnist37.l1_kernel: it
# saves ~0.4 s per 10^9 of them over cdist's slabs and costs a process ~0.8 s once (importing
# numba, loading the compiled kernel). Below it (MNIST: 10^4 images x 10 x 784 in batches of
# 1,024 is 8 x 10^6 a call), cdist's slabs: a job's worker would pay more than it saves.
L1_KERNEL_MIN_VALUES = 1 << 30
# Candidate (image, class) pairs are recomputed in float64 this many values at a time (64 MB).
RECHECK_VALUES_AT_ONCE = 8 << 20


@functools.cache
def _pixel_values_on(device: torch.device) -> torch.Tensor:
    # Once per device: a blocking copy per batch would wait for every kernel queued before it.
    return PIXEL_VALUES.to(device)


def scaled_pixels(images: torch.Tensor) -> torch.Tensor:
    """`uint8 [N, H, W]` images as `float32 [N, H*W]` in [0, 1], bit for bit the same on every device."""
    flat = images.reshape(len(images), -1)
    return _pixel_values_on(images.device).index_select(0, flat.reshape(-1).int()).reshape(flat.shape)


def gamma(k: int, dtype: torch.dtype) -> float:
    """Higham's gamma_k = k u / (1 - k u): k roundings of relative error at most u compound to at most this."""
    u = UNIT_ROUNDOFF[dtype]
    if k * u >= 1:
        raise ValueError(f"gamma({k}) does not exist for {dtype}: {k} values are too many to bound")
    return k * u / (1 - k * u)


def _with_slack(value: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    # The bound is itself computed in float64, and value +- bound rounds: 2^-20 of the bound
    # and 2^-50 of the value cover both (each is a handful of float64 roundings, <= 2^-52 each).
    return bound * (1 + 2.0 ** -20) + value.abs() * 2.0 ** -50


@dataclass
class Sums:
    """Per (image, class) sums `float64 [N, C]` and a proven bound: |value - exact| <= bound.

    l1: sum_i |x_i - p_i|; l2: sum_i (x_i - p_i)^2; x = u / 255 exactly for uint8 pixels u, p the
    float32 prototype values. The distances are value / P (l1) and sqrt(value / P) (l2).
    """

    value: torch.Tensor
    bound: torch.Tensor


@functools.cache
def _l1_kernel():
    """mnist37.l1_kernel, imported on first use (numba costs ~0.3 s to import); None where numba
    is not installed (jobs/gpu_check.py on a bare GPU machine), and cdist sums instead."""
    try:
        from mnist37 import l1_kernel
    except ImportError:
        return None
    return l1_kernel


def l1_sums(images: torch.Tensor, prototypes: torch.Tensor, via: str = "auto") -> Sums:
    """l1 sums of `uint8 [N, P]` images to `float32 [C, P]` prototypes: float32 |x_i - p_i|
    summed in float32, on the CPU by mnist37.l1_kernel (four images a pass over each class's
    values) where the call has at least L1_KERNEL_MIN_VALUES values, elsewhere (or without
    numba) by torch.cdist(p=1) on slabs of L1_SLAB_VALUES values, their results added in
    float32. `via`: "kernel" or "cdist" picks one (the kernel on the CPU only).

    Proof of the bound, u = 2^-24, n = P (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., 3.1 and 4.2): the kernel, or cdist and the slabs' additions, sum
    t_i = fl(|xh_i - p_i|), xh_i = fl(x_i) the float32 pixel values (PIXEL_VALUES, |xh_i - x_i| <= u x_i). In any order, a float32 sum S^
    of n terms is within gamma(n-1) sum|t_i| of their exact sum. Each t_i is |xh_i - p_i| (1 + d),
    |d| <= u, so |t_i - |xh_i - p_i|| <= u/(1-u) t_i; and ||xh_i - p_i| - |x_i - p_i|| <= u x_i.
    With sum t_i <= S^ / (1 - gamma(n-1)):
        |S^ - S| <= (gamma(n-1) + u/(1-u)) / (1 - gamma(n-1)) S^ + u sum_i x_i.
    """
    n, u = images.shape[1], UNIT_ROUNDOFF[torch.float32]
    g = gamma(max(n - 1, 1), torch.float32)
    x, protos = scaled_pixels(images), prototypes.float()
    big = images.numel() * len(protos) >= L1_KERNEL_MIN_VALUES
    if x.device.type == "cpu" and (via == "kernel" or via == "auto" and big) and (kernel := _l1_kernel()) is not None:
        found = torch.from_numpy(kernel.l1_sums(x.numpy(), protos.numpy()))
    else:
        found = torch.zeros(len(x), len(protos), device=x.device)
        for first in range(0, n, L1_SLAB_VALUES):
            found.add_(torch.cdist(x[:, first:first + L1_SLAB_VALUES].contiguous(),
                                   protos[:, first:first + L1_SLAB_VALUES].contiguous(), p=1))
    value = found.double()
    sum_x = images.sum(dim=1, dtype=torch.float64).div_(PIXEL_MAX)
    bound = value * ((g + u / (1 - u)) / (1 - g)) + (sum_x * u)[:, None]
    return Sums(value, _with_slack(value, bound))


def _matmul_dtype(device: torch.device) -> torch.dtype:
    """float32 where float32 matrix products are true float32 (each product and sum rounded to
    float32), else float64: TF32 or bfloat16 products would void l2_sums' bound."""
    if torch.get_float32_matmul_precision() != "highest":
        return torch.float64
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return torch.float64
    return torch.float32


def l2_sums(images: torch.Tensor, prototypes: torch.Tensor) -> Sums:
    """l2 sums of `uint8 [N, P]` images to `float32 [C, P]` prototypes through one matrix product:
    sum (u/255 - p)^2 = a - b + c, a = sum u^2 / 255^2, b = 2 (u . p) / 255, c = sum p^2.

    Proof of the bound, n = P, v = 2^-53, w the unit roundoff of the product's dtype (float32
    unless float32 products may be TF32/bf16, see _matmul_dtype): the pixels u enter the product
    as exact integers; sum u^2 is summed exactly (integers < 2^53 in float64). The product
    G^ = fl(u . p) is a dot product of n terms, so |G^ - G| <= gamma_w(n) sum |u_i||p_i|
    (Higham 3.1, any order, with or without FMA); with A = |u| . |p| computed alike,
    sum|u||p| <= A^ / (1 - gamma_w(n)). b = 2 G^ / 255 adds one float64 rounding, a one, c is a
    float64 sum of n float64 squares (gamma_v(n) c), and a - b + c two more, each at most
    v (a + b + c). Altogether
        |S^ - S| <= 2/255 gamma_w(n) / (1 - gamma_w(n)) A^ + (gamma_v(n) + 4v)(a^ + b^ + c^) (1 + 2^-20).
    With prototypes >= 0 (means of pixels), A = G and one product serves both.
    """
    n = images.shape[1]
    dtype = _matmul_dtype(images.device)
    protos = prototypes.to(dtype)
    pixels = images.to(dtype)
    product = (pixels @ protos.T).double()
    absolute = product if bool((prototypes >= 0).all()) else (pixels @ protos.abs().T).double()
    a = images.float().square_().sum(dim=1, dtype=torch.float64).div_(PIXEL_MAX ** 2)
    b = product.mul(2).div_(PIXEL_MAX)
    c = prototypes.double().square().sum(dim=1)
    value = a[:, None] - b + c[None, :]
    gw = gamma(n, dtype)
    bound = (absolute * (2 / PIXEL_MAX * gw / (1 - gw)) + (a[:, None] + b.abs() + c[None, :])
             * (gamma(n, torch.float64) + 4 * UNIT_ROUNDOFF[torch.float64]))
    return Sums(value, _with_slack(value, bound))


FAST_SUMS = {"l1": l1_sums, "l2": l2_sums}


def direct_sums(images: torch.Tensor, prototypes: torch.Tensor, rows: torch.Tensor, classes: torch.Tensor,
                metric: str) -> Sums:
    """The sums of pairs (images[rows[k]], prototypes[classes[k]]) straight from the definition
    in float64: `float64 [K]` values and bounds, in steps of RECHECK_VALUES_AT_ONCE values.

    Proof of the bound, v = 2^-53, n = P: 255 p is exact in float64 (a float32 times an 8-bit
    integer), so w = u - 255 p is rounded once; |w| and w^2 carry at most 1 and 3 roundings, the
    sum of n nonnegative terms n - 1 more, and the division by 255 (255^2) one: a relative error
    of at most gamma_v(n + 3), so |S^ - S| <= gamma_v(n + 3) / (1 - gamma_v(n + 3)) S^.
    """
    n = images.shape[1]
    step = max(1, RECHECK_VALUES_AT_ONCE // max(1, n))
    parts = []
    for first in range(0, len(rows), step):
        w = images[rows[first:first + step]].double() - prototypes[classes[first:first + step]].double() * PIXEL_MAX
        parts.append(w.abs().sum(dim=1).div_(PIXEL_MAX) if metric == "l1"
                     else w.square_().sum(dim=1).div_(PIXEL_MAX ** 2))
    value = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=images.device)
    g = gamma(n + 3, torch.float64)
    return Sums(value, _with_slack(value, value * (g / (1 - g))))


def exact_sums(image: np.ndarray, prototypes: np.ndarray, metric: str) -> list[int]:
    """The exact sums of one `uint8 [P]` image to `float32 [k, P]` prototypes, as Python
    integers all scaled by the same factor (255 * 2^K for l1, its square for l2), so they
    compare exactly: the last word where two classes are closer than float64 can tell."""
    mantissas, exponents = np.frexp(prototypes.astype(np.float64))  # p = m * 2^e, m in [0.5, 1)
    whole = np.ldexp(mantissas, 53).astype(np.int64)  # p = whole * 2^(e - 53), exactly
    nonzero = whole != 0
    k = int((53 - exponents[nonzero]).max(initial=0))
    shifts = np.where(nonzero, k - 53 + exponents, 0).astype(object)
    scaled = (whole.astype(object) * int(PIXEL_MAX)) << shifts  # 255 p 2^K, exactly
    w = (image.astype(object) << k)[None, :] - scaled
    found = np.abs(w).sum(axis=1) if metric == "l1" else (w * w).sum(axis=1)
    return [int(s) for s in found]


def _candidates(sums: Sums) -> torch.Tensor:
    """`bool [N, C]`: the classes whose exact sum may be the least (lower bound <= least upper bound)."""
    upper = (sums.value + sums.bound).min(dim=1, keepdim=True).values
    return (sums.value - sums.bound) <= upper


def nearest(images: torch.Tensor, prototypes: torch.Tensor, metric: str) -> tuple[torch.Tensor, Sums]:
    """For `uint8 [N, ...]` images and `float32 [C, ...]` prototypes: each image's class of least
    exact distance, ties to the earlier class (`int64 [N]`), and the fast sums (`Sums`).

    Fast sums with proven bounds (l1_sums, l2_sums) decide an image when one class's upper bound
    lies below every other class's lower bound. The images left over have their candidate
    classes recomputed in float64 (direct_sums) and, where even that cannot separate them (exact
    ties, such as two equal prototypes), in exact integers (exact_sums). Predictions therefore
    equal the argmin of the exact distances on every device, whatever the summation order.
    """
    flat = images.reshape(len(images), -1)
    protos = prototypes.reshape(len(prototypes), -1).to(flat.device, torch.float32)
    if metric not in FAST_SUMS:
        raise ValueError(f"Unknown metric {metric!r}; expected one of {', '.join(FAST_SUMS)}")
    sums = FAST_SUMS[metric](flat, protos)
    open_ = _candidates(sums)
    # A prototype equal to an earlier one is never the nearest (ties go to the earlier class):
    # without it, images near a duplicated class need no float64 or integer recheck.
    open_[:, _repeated(protos)] = False
    predicted = torch.where(open_, sums.value, math.inf).argmin(dim=1)
    undecided = torch.nonzero(open_.sum(dim=1) > 1).flatten()
    if len(undecided):
        picks = torch.nonzero(open_[undecided])
        at, classes = picks[:, 0], picks[:, 1]
        rechecked = direct_sums(flat, protos, undecided[at], classes, metric)
        shape = (len(undecided), len(protos))
        value = torch.full(shape, math.inf, dtype=torch.float64, device=flat.device)
        bound = torch.zeros(shape, dtype=torch.float64, device=flat.device)
        value[at, classes], bound[at, classes] = rechecked.value, rechecked.bound
        second = Sums(value, bound)
        predicted[undecided] = value.argmin(dim=1)
        still = _candidates(second) & torch.isfinite(value)
        for i in torch.nonzero(still.sum(dim=1) > 1).flatten().tolist():
            predicted[undecided[i]] = _exact_nearest(flat[undecided[i]], protos, torch.nonzero(still[i]).flatten(),
                                                     metric)
    return predicted, sums


def _repeated(prototypes: torch.Tensor) -> torch.Tensor:
    """`bool [C]`: the prototypes equal to an earlier one."""
    _, group = torch.unique(prototypes, dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1 if len(group) else 0,), len(group), device=group.device)
    first = first.scatter_reduce(0, group, torch.arange(len(group), device=group.device), reduce="amin")
    return first[group] != torch.arange(len(group), device=group.device)


def _exact_nearest(image: torch.Tensor, prototypes: torch.Tensor, classes: torch.Tensor, metric: str) -> int:
    """The class of least exact sum among `classes` (ascending), the earliest on a tie."""
    rows = prototypes[classes].cpu().numpy()
    kept = []  # a prototype equal to an earlier one is never nearer than it
    for k in range(len(rows)):
        if not any(np.array_equal(rows[k], rows[j]) for j in kept):
            kept.append(k)
    found = exact_sums(image.cpu().numpy(), rows[kept], metric)
    return int(classes[kept[found.index(min(found))]])


def to_distances(sums: torch.Tensor, pixels: int, metric: str) -> torch.Tensor:
    """Sums (float64) as distances: l1 the mean, l2 the root mean square (a cancelled l2 sum
    below 0 is 0)."""
    mean = sums / pixels
    return mean if metric == "l1" else mean.clamp_(min=0).sqrt_()


def distances(images: torch.Tensor, prototypes: torch.Tensor, metrics: Sequence[str]) -> dict[str, torch.Tensor]:
    """Distances of `uint8 [N, H, W]` images to `float32 [C, H, W]` prototypes: {metric: float32 [N, C]}.

    The fast sums (l1_sums: float32 sums of the float32 pixel values' differences; l2_sums: one matrix
    product), each within its proven bound of the exact sum, as distances. The argmin of these
    can differ from the exact one only between classes within the bounds: `nearest` decides
    those exactly. Every device runs the same code but l1's float32 sums (the CPU's kernel,
    cdist elsewhere), which keep the same bound.
    """
    flat = images.reshape(len(images), -1)
    protos = prototypes.reshape(len(prototypes), -1).to(flat.device, torch.float32)
    return {m: to_distances(FAST_SUMS[m](flat, protos).value, flat.shape[1], m).float() for m in metrics}


def nearest_with_distances(images: torch.Tensor, prototypes: torch.Tensor, true: torch.Tensor, metric: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest`'s predictions (`int64 [N]`) and `float32 [N, C]` distances of `uint8 [N, ...]`
    images whose true classes are `true` (`int64 [N]`).

    A misclassified image's distances to its predicted and to its true class are float64
    rechecks (direct_sums: relative error at most gamma(P + 3) in float64, ~1e-12 at 64x64x3)
    rounded to float32, so margins and boundary examples order images by their real distances.
    Every other entry (a correctly classified image's distance to its class included) is the
    fast value, within l1_sums' / l2_sums' bound of exact: about P u of the sum for l1 (~7e-4
    relative at 64x64x3, 5e-5 at 28x28, u = 2^-24); for l2 P u (2 u.p/255) / value, larger where
    the squares cancel. Rechecking every image's own class too would cost 2-3x the whole
    10-class MNIST step (benchmarks/distances/README.md).
    """
    predicted, found, _ = _nearest_rechecked(images, prototypes, true, metric, 0)
    return predicted, found


def prototype_groups(prototypes: torch.Tensor) -> torch.Tensor:
    """`int64 [C]`: the same number for prototypes that are equal (their distances tie exactly
    for every image), different numbers otherwise."""
    return torch.unique(prototypes, dim=0, return_inverse=True)[1]


def _ranked_before(sums: Sums, true: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image (row) and class: `bool [N, C]` the classes sure to rank before the true
    one (exact sum less, or equal and earlier), and `bool [N, C]` those the bounds cannot order
    against it. A class equal to the true one's prototype ties exactly: before it when earlier."""
    rows = torch.arange(len(true), device=true.device)
    low, high = sums.value - sums.bound, sums.value + sums.bound
    true_low, true_high = low[rows, true][:, None], high[rows, true][:, None]
    classes = torch.arange(sums.value.shape[1], device=true.device)[None, :]
    same = groups[None, :] == groups[true][:, None]  # the true class itself among them
    before = torch.where(same, classes < true[:, None], high < true_low)
    open_ = ~same & ~before & ~(low > true_high)
    return before, open_


def in_top_k(images: torch.Tensor, prototypes: torch.Tensor, true: torch.Tensor, sums: Sums, metric: str,
             k: int) -> torch.Tensor:
    """`bool [N]`: whether each image's true class is among its `k` nearest prototypes by exact
    distance, ties to the earlier class as in `nearest` (so k = 1 is `nearest(...) == true`).

    `images` `uint8 [N, P]`, `prototypes` `float32 [C, P]`, `true` `int64 [N]`, `sums` the fast
    sums with their proven bounds (`nearest`'s). The true class's rank is the number of classes
    before it; a class is surely before (after) it when its upper (lower) bound lies below (above)
    the true class's lower (upper) bound. Where the classes left unordered could move the rank
    across k, the true class and those are recomputed in float64 (direct_sums) and, where even
    that cannot order them, in exact integers (exact_sums), as `nearest` decides its ties."""
    n, num_classes = sums.value.shape
    if k >= num_classes:
        return torch.ones(n, dtype=torch.bool, device=true.device)
    groups = prototype_groups(prototypes)
    before, open_ = _ranked_before(sums, true, groups)
    sure, unsure = before.sum(dim=1), open_.sum(dim=1)
    hits = sure < k
    undecided = torch.nonzero(hits & (sure + unsure >= k)).flatten()
    if not len(undecided):
        return hits
    picks = torch.nonzero(open_[undecided])
    at = torch.cat([picks[:, 0], torch.arange(len(undecided), device=true.device)])
    classes = torch.cat([picks[:, 1], true[undecided]])
    rechecked = direct_sums(images, prototypes, undecided[at], classes, metric)
    shape = (len(undecided), num_classes)
    value = torch.zeros(shape, dtype=torch.float64, device=true.device)
    bound = torch.full(shape, math.inf, dtype=torch.float64, device=true.device)  # unknown: unordered
    value[at, classes], bound[at, classes] = rechecked.value, rechecked.bound
    before_again, open_again = _ranked_before(Sums(value, bound), true[undecided], groups)
    # Pairs the first bounds had ordered stay as they were; only the rechecked ones move.
    sure_again = sure[undecided] + (before_again & open_[undecided]).sum(dim=1)
    still_open = open_again & open_[undecided]
    hits[undecided] = sure_again < k
    left = torch.nonzero((sure_again < k) & (sure_again + still_open.sum(dim=1) >= k)).flatten()
    for i in left.tolist():
        row, t = int(undecided[i]), int(true[undecided[i]])
        candidates = torch.nonzero(still_open[i]).flatten().tolist()
        found = exact_sums(images[row].cpu().numpy(), prototypes[[t, *candidates]].cpu().numpy(), metric)
        ahead = sum(1 for c, s in zip(candidates, found[1:]) if s < found[0] or (s == found[0] and c < t))
        hits[row] = int(sure_again[i]) + ahead < k
    return hits


def nearest_with_top_k(images: torch.Tensor, prototypes: torch.Tensor, true: torch.Tensor, metric: str, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nearest_with_distances`' predictions and distances, and `in_top_k`'s `bool [N]` from the
    same fast sums (taken before the misclassified images' entries become float64 rechecks)."""
    return _nearest_rechecked(images, prototypes, true, metric, k)


def _nearest_rechecked(images: torch.Tensor, prototypes: torch.Tensor, true: torch.Tensor, metric: str, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Predictions, distances with the misclassified images' two entries rechecked in float64,
    and with `k` > 0 `in_top_k` from the fast sums (taken before those entries change)."""
    flat = images.reshape(len(images), -1)
    protos = prototypes.reshape(len(prototypes), -1).to(flat.device, torch.float32)
    predicted, sums = nearest(flat, protos, metric)
    hits = in_top_k(flat, protos, true, sums, metric, k) if k > 0 else None
    value = sums.value
    wrong = torch.nonzero(true != predicted).flatten()
    for classes in (predicted[wrong], true[wrong]):
        value[wrong, classes] = direct_sums(flat, protos, wrong, classes, metric).value
    return predicted, to_distances(value, flat.shape[1], metric).float(), hits
