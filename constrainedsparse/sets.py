r"""Feasible sets: the only place that knows what "k-sparse" means.

Every sparsity pattern is a :class:`FeasibleSet` with three operations:

* ``project(x)`` — the exact Euclidean projection
  :math:`\Pi_C(x) = \arg\min_{z \in C} \|z - x\|_2` onto the set of real tensors that satisfy
  the pattern (keep the largest-magnitude entries/groups allowed, zero the rest).
* ``lmo(g)`` — the linear minimisation oracle over the convex hull of the pattern's **binary
  masks**, :math:`\arg\min_{v \in \mathrm{conv}(\mathcal{M})} \langle g, v \rangle`, returned as
  a vertex (a 0/1 mask). With ``only_negative=True`` (the Frank-Wolfe paper's variant, i.e. the
  hull of masks with *at most* k ones) only coordinates with :math:`g < 0` are switched on;
  otherwise exactly k are (the hull of masks with exactly k ones).
* ``contains(x)`` — whether ``x`` satisfies the pattern (counts nonzeros).

Ties are broken deterministically: among equal scores the lower flat index wins, on every
device and for every algorithm used internally.

Formulations (SLR/ADMM Z-steps, hard pruning, Frank-Wolfe) compose these objects and never
re-implement a top-k.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = [
    "Face",
    "FeasibleSet",
    "GlobalTopK",
    "NMSparse",
    "RowTopK",
    "StructuredGroups",
    "TopK",
    "keep_count",
    "parse_nm",
    "topk_mask",
]

_SAMPLED_SELECT_MIN_NUMEL = 1 << 20
_SAMPLE_SIZE = 1 << 17
_NUMPY_DTYPES = (torch.float32, torch.float64)
_CHUNK = 1 << 18
# Widest rows for which topk_mask(k=1) scans columns instead of calling argmax (CPU).
_COLUMN_SCAN_MAX_WIDTH = 8


def keep_count(numel: int, sparsity: float) -> int:
    r"""Number of entries kept at a sparsity level: :math:`k = \mathrm{round}((1 - s)\, n)`.

    Args:
        numel: Number of entries (or groups) in the tensor.
        sparsity: Fraction of zeros wanted, in ``[0, 1)``.

    Returns:
        The keep count ``k``, in ``[0, numel]``.

    Raises:
        ValueError: If ``sparsity`` is outside ``[0, 1)``.
    """
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(round((1.0 - sparsity) * numel))


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parses an ``"N:M"`` pattern string.

    Args:
        pattern: Text such as ``"2:4"``.

    Returns:
        ``(n, m)`` with ``0 < n <= m``.

    Raises:
        ValueError: If the text is not two positive integers ``N:M`` with ``N <= M``.
    """
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern must look like N:M with integers 0 < N <= M (e.g. 2:4), got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n <= m:
        raise ValueError(f"pattern must look like N:M with integers 0 < N <= M (e.g. 2:4), got {pattern!r}")
    return n, m


def _fixed_count(fraction: float, budget: int) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fixed fraction of a face must be in [0, 1), got {fraction}")
    return math.floor(fraction * budget)


def _sample_order_statistics(sample: torch.Tensor, ranks: list[int]) -> list[float]:
    """Values at the given 0-based ranks (counted from the largest) of a small sample."""
    m = sample.numel()
    if sample.device.type == "cpu" and sample.dtype in _NUMPY_DTYPES:
        positions = sorted({m - 1 - r for r in ranks})
        part = np.partition(sample.numpy(), positions)
        return [float(part[m - 1 - r]) for r in ranks]
    ordered = torch.sort(sample, descending=True).values
    return [float(ordered[r]) for r in ranks]


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="sets")


def _bracket_counts_numpy(values: np.ndarray, lo: float, hi: float, magnitude: bool) -> tuple[int, np.ndarray]:
    """Counts ``score > hi`` and gathers the scores in ``(lo, hi]``, one cache-sized chunk at a time.

    Chunking keeps every intermediate (``|x|``, the two comparisons) in cache and reuses the
    same small buffers, so the whole scan costs about one read of ``values``.
    """
    chunk = min(_CHUNK, values.shape[0])
    scratch = np.empty(chunk, dtype=values.dtype)
    above = np.empty(chunk, dtype=bool)
    in_band = np.empty(chunk, dtype=bool)
    count_above = 0
    band_parts = []
    for start in range(0, values.shape[0], chunk):
        part = values[start : start + chunk]
        size = part.shape[0]
        scores = np.abs(part, out=scratch[:size]) if magnitude else part
        np.greater(scores, hi, out=above[:size])
        count_above += int(np.count_nonzero(above[:size]))
        np.greater(scores, lo, out=in_band[:size])
        np.logical_xor(in_band[:size], above[:size], out=in_band[:size])
        band_parts.append(scores[in_band[:size]])
    return count_above, np.concatenate(band_parts)


def _kth_largest_sampled(values: torch.Tensor, k: int, magnitude: bool) -> tuple[torch.Tensor, int, int] | None:
    """Exact k-th largest score of a large flat tensor through a sampled bracket.

    The score is ``|values|`` when ``magnitude`` is set (without materialising it on CPU), else
    ``values``. A strided sample brackets the k-th largest score in ``(lo, hi]`` with a
    5-sigma margin; counting the scores above ``hi`` and gathering the few inside the bracket
    turns one selection over ``n`` entries into one over ``O(sqrt(n))``. The answer is always
    exact: when the bracket misses, ``None`` is returned and the caller runs the full selection.

    Returns:
        ``(t, count_gt, count_ge)``: the k-th largest score and how many scores are ``> t`` and
        ``>= t``.
    """
    values = values.detach()
    n = values.numel()
    stride = max(1, n // _SAMPLE_SIZE)
    sample = values[::stride].contiguous()
    if magnitude:
        sample = sample.abs()
    m = sample.numel()
    q = k / n
    margin = int(5.0 * math.sqrt(m * q * (1.0 - q))) + 16
    rank = int(q * m)
    hi_rank, lo_rank = rank - margin, rank + margin
    if hi_rank < 0 or lo_rank >= m:
        return None
    hi, lo = _sample_order_statistics(sample, [hi_rank, lo_rank])
    if values.device.type == "cpu" and values.dtype in _NUMPY_DTYPES and values.is_contiguous():
        # NumPy releases the GIL in its kernels: one contiguous slice per intra-op thread.
        parts = np.array_split(values.numpy(), max(1, torch.get_num_threads()))
        results = list(_thread_pool().map(lambda p: _bracket_counts_numpy(p, lo, hi, magnitude), parts))
        count_above_hi = sum(count for count, _ in results)
        band_np = np.concatenate([band for _, band in results])
        needed = k - count_above_hi
        if needed <= 0 or band_np.shape[0] < needed:
            return None
        threshold = torch.as_tensor(np.partition(band_np, band_np.shape[0] - needed)[band_np.shape[0] - needed])
        t = threshold.item()
        return (
            threshold,
            count_above_hi + int(np.count_nonzero(band_np > t)),
            count_above_hi + int(np.count_nonzero(band_np >= t)),
        )
    else:
        scores = values.abs() if magnitude else values
        above_hi = scores > hi
        count_above_hi = int(torch.count_nonzero(above_hi))
        band = scores[(scores > lo).logical_xor_(above_hi)]
    needed = k - count_above_hi
    if needed <= 0 or band.numel() < needed:
        return None
    threshold = torch.kthvalue(band, band.numel() - needed + 1).values
    count_gt = count_above_hi + int(torch.count_nonzero(band > threshold))
    return threshold, count_gt, count_above_hi + int(torch.count_nonzero(band >= threshold))


def _first_ties(values: torch.Tensor, threshold: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the first ``count`` entries with ``|value| == threshold``, in index order.

    Scans cache-sized chunks in order and stops as soon as enough ties are found.
    """
    if values.device.type != "cpu" or values.dtype not in _NUMPY_DTYPES:
        return torch.nonzero(values.abs() == threshold)[:count, 0]
    array, t = values.numpy(), threshold.item()
    scratch = np.empty(min(_CHUNK, array.shape[0]), dtype=array.dtype)
    found: list[np.ndarray] = []
    total = 0
    for start in range(0, array.shape[0], _CHUNK):
        part = array[start : start + _CHUNK]
        hits = np.flatnonzero(np.abs(part, out=scratch[: part.shape[0]]) == t) + start
        found.append(hits)
        total += hits.shape[0]
        if total >= count:
            break
    return torch.from_numpy(np.concatenate(found)[:count])


def _kth_largest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest entry of every row, shape ``(rows, 1)``."""
    n = rows.shape[-1]
    if rows.shape[0] == 1 and n >= _SAMPLED_SELECT_MIN_NUMEL:
        found = _kth_largest_sampled(rows[0], k, magnitude=False)
        if found is not None:
            return found[0].reshape(1, 1)
    if rows.device.type == "cpu" and rows.dtype in _NUMPY_DTYPES and not rows.requires_grad:
        # NumPy's introselect is ~5x faster than torch.kthvalue on CPU (same value: an order statistic).
        array = np.ascontiguousarray(rows.numpy())
        return torch.from_numpy(np.partition(array, n - k, axis=-1)[:, n - k : n - k + 1].copy())
    return torch.kthvalue(rows, n - k + 1, dim=-1, keepdim=True).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries along the last dimension.

    Deterministic: among equal scores the lower index wins. Works batched: ``scores`` of shape
    ``(..., n)`` gives a mask of the same shape with exactly ``k`` ``True`` values in every row.

    Args:
        scores: Real scores, last dimension is the selection axis.
        k: How many to keep per row, ``0 <= k <= n``.

    Returns:
        Boolean tensor shaped like ``scores``.

    Raises:
        ValueError: If ``k`` is outside ``[0, n]``.
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k == 1:
        return _first_max_mask(scores)
    rows = scores.reshape(-1, n)
    threshold = _kth_largest(rows, k)
    mask = rows >= threshold
    kept = mask.sum(dim=-1, keepdim=True)
    if bool((kept != k).any()):
        mask = _break_ties(rows, threshold, mask, k)
    return mask.reshape(scores.shape)


def _first_max_mask(scores: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the first maximal entry along the last dimension (``topk_mask`` with ``k = 1``)."""
    n = scores.shape[-1]
    if (
        scores.device.type == "cpu"
        and scores.dtype in _NUMPY_DTYPES
        and not scores.requires_grad
        and n <= _COLUMN_SCAN_MAX_WIDTH
    ):
        # Many short rows (an N:M oracle): one pass per column over contiguous columns, free of the
        # per-row loops of argmax and of data-dependent branches, ~7x faster than torch.argmax on CPU.
        columns = np.ascontiguousarray(scores.reshape(-1, n).numpy().T)
        top = columns.max(axis=0)
        mask = np.empty_like(columns, dtype=bool)
        found = np.zeros(columns.shape[1], dtype=bool)
        for j in range(n):
            np.equal(columns[j], top, out=mask[j])
            mask[j] &= ~found
            found |= mask[j]
        if bool(found.all()):  # a NaN row matches nothing: argmax's rule below
            return torch.from_numpy(np.ascontiguousarray(mask.T)).reshape(scores.shape)
    # argmax returns the first maximal index: the same tie rule, several times faster than a selection.
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argmax(dim=-1, keepdim=True), True)


def _break_ties(rows: torch.Tensor, threshold: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps all entries above the threshold and the lowest-index ties up to ``k`` per row."""
    above = rows > threshold
    room = k - above.sum(dim=-1, keepdim=True)
    ties = mask & ~above
    tie_rank = torch.cumsum(ties.to(torch.int64), dim=-1)
    return above | (ties & (tie_rank <= room))


def _lmo_mask(neg_scores: torch.Tensor, k: int, only_negative: bool) -> torch.Tensor:
    """Vertex of the mask hull minimising <g, v>, given -g (batched along the last dim)."""
    vertex = topk_mask(neg_scores, k)
    if only_negative:
        vertex &= neg_scores > 0
    return vertex


@dataclasses.dataclass(frozen=True)
class Face:
    r"""A face of a pattern's mask hull: some coordinates of every unit fixed to 1, the rest free.

    Frank-Wolfe's α-fixed warm start works on such a face. Every unit (row, layer, N:M group)
    fixes the same number of coordinates, so the free coordinates of a tensor, gathered in their
    original order, form a dense tensor of ``free_shape`` with the same pattern and the remaining
    budget: its oracle is ``free.lmo`` (lower-index tie-breaking unchanged).

    Args:
        fixed: Picks the fixed coordinates from scores (``fixed.mask(scores)``); ``None`` if none.
        free: The pattern with the remaining budget, on the gathered free coordinates.
        free_shape: Shape of the gathered free coordinates.
    """

    fixed: FeasibleSet | None
    free: FeasibleSet
    free_shape: tuple[int, ...]


class FeasibleSet(abc.ABC):
    """A sparsity pattern: projection, linear minimisation oracle and membership test."""

    def face(self, fixed_fraction: float, shape: Sequence[int]) -> Face:
        r"""The face fixing :math:`\lfloor f k\rfloor` of every unit's budget :math:`k` (see :class:`Face`).

        Raises:
            ValueError: If the pattern has no such face (structured groups) or the fraction is not in [0, 1).
        """
        raise ValueError(f"{self!r} has no face with fixed coordinates (row, unstructured and N:M patterns do)")

    @abc.abstractmethod
    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean support of :meth:`project`: the entries of ``x`` that the projection keeps."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        r"""Euclidean projection :math:`\arg\min_{z \in C}\|z - x\|_2` (``x`` is not modified)."""
        return x * self.mask(x)

    @abc.abstractmethod
    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        r"""Vertex :math:`v \in \{0, 1\}` of the mask hull minimising :math:`\langle g, v\rangle`.

        Args:
            grad: Gradient ``g``, same shape as the masked tensor.
            only_negative: Switch on only coordinates (groups) whose gradient is negative, i.e.
                optimise over the hull of masks with *at most* ``k`` ones.

        Returns:
            A 0/1 tensor with the dtype and shape of ``grad``.
        """

    @abc.abstractmethod
    def contains(self, x: torch.Tensor) -> bool:
        """Whether ``x`` satisfies the pattern."""


class TopK(FeasibleSet):
    r"""At most ``k`` nonzeros in the whole tensor: :math:`\{x : \|x\|_0 \le k\}`."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k

    def _check(self, x: torch.Tensor) -> None:
        if self.k > x.numel():
            raise ValueError(f"k={self.k} exceeds the tensor's {x.numel()} entries")

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return topk_mask(x.detach().abs().reshape(1, -1), self.k).reshape(x.shape)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = x.detach()
        n = x.numel()
        if 0 < self.k < n and n >= _SAMPLED_SELECT_MIN_NUMEL and x.is_contiguous():
            found = _kth_largest_sampled(x.reshape(-1), self.k, magnitude=True)
            if found is not None and found[0] > 0:
                threshold, count_gt, count_ge = found
                if count_ge == self.k:
                    # One fused pass writes the result: hardshrink keeps |x| strictly above its
                    # bound, so the bound sits one ulp below the k-th largest magnitude.
                    return torch.hardshrink(x, float(torch.nextafter(threshold, torch.zeros_like(threshold))))
                # Ties at the threshold: keep everything above it, then the lowest-index ties.
                out = torch.hardshrink(x, float(threshold))
                flat_x, flat_out = x.reshape(-1), out.view(-1)
                ties = _first_ties(flat_x, threshold, self.k - count_gt)
                flat_out[ties] = flat_x[ties]
                return out
        return x * self.mask(x)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        self._check(grad)
        return _lmo_mask(-grad.reshape(1, -1), self.k, only_negative).reshape(grad.shape).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        return int(torch.count_nonzero(x)) <= self.k

    def face(self, fixed_fraction: float, shape: Sequence[int]) -> Face:
        count = _fixed_count(fixed_fraction, self.k)
        return Face(TopK(count) if count else None, TopK(self.k - count), (math.prod(shape) - count,))

    def __repr__(self) -> str:
        return f"TopK(k={self.k})"


class RowTopK(FeasibleSet):
    """At most ``k`` nonzeros in every row (dim 0 indexes rows; the rest is flattened)."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1)
        if self.k > rows.shape[1]:
            raise ValueError(f"k={self.k} exceeds the row width {rows.shape[1]}")
        return rows

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return topk_mask(self._rows(x.detach()).abs(), self.k).reshape(x.shape)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        return _lmo_mask(-self._rows(grad), self.k, only_negative).reshape(grad.shape).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        return bool((torch.count_nonzero(x.reshape(x.shape[0], -1), dim=1) <= self.k).all())

    def face(self, fixed_fraction: float, shape: Sequence[int]) -> Face:
        count = _fixed_count(fixed_fraction, self.k)
        width = math.prod(shape[1:])
        return Face(RowTopK(count) if count else None, RowTopK(self.k - count), (shape[0], width - count))

    def __repr__(self) -> str:
        return f"RowTopK(k={self.k})"


class NMSparse(FeasibleSet):
    """N:M sparsity: at most ``n`` nonzeros in every group of ``m`` consecutive inputs.

    Groups run along dim 1 (the input dimension of a Linear weight ``(out, in)``, the input
    channels of a Conv weight ``(out, in, *kernel)``).
    """

    def __init__(self, n: int, m: int) -> None:
        if not 0 < n <= m:
            raise ValueError(f"N:M needs integers 0 < N <= M, got {n}:{m}")
        self.n, self.m = n, m

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raises ``ValueError`` if the input width (dim 1) is not divisible by ``m``."""
        if len(shape) < 2:
            raise ValueError(
                f"N:M pattern {self.n}:{self.m} needs a tensor with an input dimension, got shape {tuple(shape)}"
            )
        if shape[1] % self.m != 0:
            raise ValueError(
                f"N:M pattern {self.n}:{self.m} needs the input width divisible by {self.m}, got width {shape[1]}"
            )

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        self.check_shape(x.shape)
        return x.movedim(1, -1).reshape(-1, self.m)

    def _ungroup(self, groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        moved_shape = like.movedim(1, -1).shape
        return groups.reshape(moved_shape).movedim(-1, 1)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return self._ungroup(topk_mask(self._groups(x.detach()).abs(), self.n), x)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        vertex = _lmo_mask(-self._groups(grad), self.n, only_negative)
        return self._ungroup(vertex, grad).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        return bool((torch.count_nonzero(self._groups(x), dim=1) <= self.n).all())

    def face(self, fixed_fraction: float, shape: Sequence[int]) -> Face:
        self.check_shape(shape)
        if len(shape) != 2:
            raise ValueError(f"an N:M face needs a 2-D (out, in) tensor, got shape {tuple(shape)}")
        count = _fixed_count(fixed_fraction, self.n)
        fixed = NMSparse(count, self.m) if count else None
        return Face(fixed, NMSparse(self.n - count, self.m - count), (shape[0], shape[1] // self.m * (self.m - count)))

    def __repr__(self) -> str:
        return f"NMSparse({self.n}:{self.m})"


class StructuredGroups(FeasibleSet):
    r"""At most ``k`` nonzero groups, a group being a slice along ``dim``.

    ``dim=0`` groups output rows/channels, ``dim=1`` input neurons/channels. The projection keeps
    the ``k`` groups of largest Euclidean norm (exact: :math:`\|x\|^2` splits over groups).
    """

    def __init__(self, k: int, dim: int = 0) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (output groups) or 1 (input groups), got {dim}")
        self.k, self.dim = k, dim

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.movedim(self.dim, 0).reshape(x.shape[self.dim], -1)
        if self.k > groups.shape[0]:
            raise ValueError(f"k={self.k} exceeds the {groups.shape[0]} groups along dim {self.dim}")
        return groups

    def _expand(self, group_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[self.dim] = like.shape[self.dim]
        return group_mask.reshape(shape).expand_as(like)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        # float64 so that squared norms neither overflow (float16) nor underflow into false ties.
        norms = self._groups(x.detach()).to(torch.float64).square().sum(dim=1)
        return self._expand(topk_mask(norms.unsqueeze(0), self.k)[0], x)

    def lmo(self, grad: torch.Tensor, only_negative: bool = False) -> torch.Tensor:
        group_grad = self._groups(grad).sum(dim=1)
        vertex = _lmo_mask(-group_grad.unsqueeze(0), self.k, only_negative)[0]
        return self._expand(vertex, grad).to(grad.dtype)

    def contains(self, x: torch.Tensor) -> bool:
        return int((torch.count_nonzero(self._groups(x), dim=1) > 0).sum()) <= self.k

    def __repr__(self) -> str:
        return f"StructuredGroups(k={self.k}, dim={self.dim})"


class GlobalTopK:
    r"""At most ``k`` nonzeros across several tensors together (one budget, layer-wise free).

    Works on sequences of tensors: :math:`\{(x_1..x_L) : \sum_l \|x_l\|_0 \le k\}`.
    """

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k

    def _flat(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([x.detach().reshape(-1) for x in xs])
        if self.k > flat.numel():
            raise ValueError(f"k={self.k} exceeds the {flat.numel()} entries of all tensors")
        return flat

    @staticmethod
    def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        parts = torch.split(flat, [x.numel() for x in like])
        return [p.reshape(x.shape) for p, x in zip(parts, like)]

    def masks(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Boolean supports of :meth:`project`, one per tensor."""
        return self._split(topk_mask(self._flat(xs).abs().unsqueeze(0), self.k)[0], xs)

    def project(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Euclidean projection of the tuple of tensors (inputs are not modified)."""
        return [x * m for x, m in zip(xs, self.masks(xs))]

    def lmo(self, grads: Sequence[torch.Tensor], only_negative: bool = False) -> list[torch.Tensor]:
        """Vertex of the joint mask hull minimising the summed inner product."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        vertex = _lmo_mask(-flat.unsqueeze(0), self.k, only_negative)[0]
        return [v.to(g.dtype) for v, g in zip(self._split(vertex, grads), grads)]

    def contains(self, xs: Sequence[torch.Tensor]) -> bool:
        """Whether the tensors have at most ``k`` nonzeros in total."""
        return sum(int(torch.count_nonzero(x)) for x in xs) <= self.k

    def __repr__(self) -> str:
        return f"GlobalTopK(k={self.k})"
