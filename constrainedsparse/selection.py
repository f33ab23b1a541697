r"""Selection kernels: the k largest entries of a tensor, fast and with one tie rule.

Everything here answers one question — which entries are the ``k`` largest — for the feasible
sets of :mod:`constrainedsparse.sets`, which hold the geometry and call these kernels. Ties are
broken deterministically: among equal scores the lower flat index wins, on every device and for
every path (NumPy's introselect on CPU, a sampled bracket for very large tensors, a column scan
for many short rows).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["SAMPLED_SELECT_MIN_NUMEL", "kth_largest_sampled", "project_largest_magnitudes", "topk_mask"]

SAMPLED_SELECT_MIN_NUMEL = 1 << 20
_SAMPLE_SIZE = 1 << 17
_NUMPY_DTYPES = (torch.float32, torch.float64)
_CHUNK = 1 << 18
# Widest rows for which topk_mask(k=1) scans columns instead of calling argmax (CPU).
_COLUMN_SCAN_MAX_WIDTH = 8


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


def kth_largest_sampled(values: torch.Tensor, k: int, magnitude: bool) -> tuple[torch.Tensor, int, int] | None:
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
    if rows.shape[0] == 1 and n >= SAMPLED_SELECT_MIN_NUMEL:
        found = kth_largest_sampled(rows[0], k, magnitude=False)
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


def project_largest_magnitudes(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """``x`` with all but its ``k`` largest magnitudes zeroed, by the sampled bracket, or ``None``.

    For large contiguous tensors (at least :data:`SAMPLED_SELECT_MIN_NUMEL` entries) with
    ``0 < k < numel``: one fused ``hardshrink`` pass writes the result when no tie sits at the
    threshold, otherwise the lowest-index ties are added back. ``None`` when the path does not
    apply (small tensor, the bracket missed, a zero threshold): the caller masks instead.
    """
    n = x.numel()
    if not (0 < k < n and n >= SAMPLED_SELECT_MIN_NUMEL and x.is_contiguous()):
        return None
    found = kth_largest_sampled(x.reshape(-1), k, magnitude=True)
    if found is None or not found[0] > 0:
        return None
    threshold, count_gt, count_ge = found
    if count_ge == k:
        # hardshrink keeps |x| strictly above its bound, so the bound sits one ulp below the k-th magnitude.
        return torch.hardshrink(x, float(torch.nextafter(threshold, torch.zeros_like(threshold))))
    # Ties at the threshold: keep everything above it, then the lowest-index ties.
    out = torch.hardshrink(x, float(threshold))
    flat_x, flat_out = x.reshape(-1), out.view(-1)
    ties = _first_ties(flat_x, threshold, k - count_gt)
    flat_out[ties] = flat_x[ties]
    return out
