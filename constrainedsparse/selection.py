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
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "SAMPLED_SELECT_MIN_NUMEL",
    "SampledSelection",
    "kth_largest_sampled",
    "project_largest_magnitudes",
    "topk_mask",
]

SAMPLED_SELECT_MIN_NUMEL = 1 << 20
_SAMPLE_SIZE = 1 << 17
_NUMPY_DTYPES = (torch.float32, torch.float64)
_CHUNK = 1 << 16
# A bracket end held by at least 1/_MASS_FRACTION of the sample is counted per chunk, not gathered.
_MASS_FRACTION = 256
# Widest rows for which topk_mask(k=1) scans columns instead of calling argmax (CPU).
_COLUMN_SCAN_MAX_WIDTH = 8
# Smallest tensors whose top-k magnitudes are selected within a band of candidates (below: one introselect over all),
# and the size of the sample that places the band's floor.
_BAND_MIN_NUMEL = 1 << 12
_BAND_SAMPLE = 1 << 10


def _numpy_compatible(tensor: torch.Tensor) -> bool:
    """Whether ``tensor.numpy()`` shares its memory: a CPU float32/float64 tensor that does not require grad."""
    return tensor.device.type == "cpu" and tensor.dtype in _NUMPY_DTYPES and not tensor.requires_grad


def _sample_order_statistics(sample: torch.Tensor, ranks: list[int]) -> list[float]:
    """Values at the given 0-based ranks (counted from the largest) of a small sample."""
    m = sample.numel()
    if _numpy_compatible(sample):
        positions = sorted({m - 1 - r for r in ranks})
        part = np.partition(sample.numpy(), positions)
        return [float(part[m - 1 - r]) for r in ranks]
    ordered = torch.sort(sample, descending=True).values
    return [float(ordered[r]) for r in ranks]


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="sets")


# A forked child (a DataLoader worker, a multiprocessing pool) inherits the pool without its threads: it would wait
# for them forever. It builds a pool of its own instead.
os.register_at_fork(after_in_child=_thread_pool.cache_clear)


class SampledSelection(NamedTuple):
    """The k-th largest score found by :func:`kth_largest_sampled`, with what ties at it need.

    Attributes:
        threshold: The k-th largest score ``t`` (a 0-d tensor in the scores' dtype).
        count_gt: How many scores are ``> t``.
        count_ge: How many scores are ``>= t``.
        cut: ``None`` when keeping every score ``>= t`` keeps exactly ``k``; else the flat index of
            the ``(k - count_gt)``-th score equal to ``t`` (in index order): the top-k with ties to
            the lower index keeps ``>= t`` up to and including ``cut`` and ``> t`` after it.
    """

    threshold: torch.Tensor
    count_gt: int
    count_ge: int
    cut: int | None


class _Plan(NamedTuple):
    """One scan's bracket ``[lo, hi]``: the scan counts the scores ``> hi``, counts per chunk the
    scores equal to a bracket end that is a *mass* (a value so frequent, e.g. in small-integer or
    quantized data, that gathering it would make the band a large share of the tensor), and
    gathers the flat indices and scores of the rest of ``[lo, hi]`` (the band)."""

    lo: float
    hi: float
    magnitude: bool
    mass_lo: bool
    mass_hi: bool


class _SliceScan(NamedTuple):
    """What one thread's scan of a contiguous slice found (see :func:`_scan_numpy`)."""

    count_above: int
    starts: list[int]
    eq_hi: list[int]
    eq_lo: list[int]
    band_index: np.ndarray
    band_value: np.ndarray


def _scan_numpy(values: np.ndarray, offset: int, plan: _Plan) -> _SliceScan:
    """One read of a slice, one cache-sized chunk at a time (see :class:`_Plan`).

    Every intermediate (the scores, the comparisons) lives in small reused buffers, so the scan
    costs about one read of ``values`` and allocates only the band.
    """
    lo, hi, magnitude, mass_lo, mass_hi = plan.lo, plan.hi, plan.magnitude, plan.mass_lo, plan.mass_hi
    chunk = min(_CHUNK, values.shape[0])
    scratch = np.empty(chunk, dtype=values.dtype)
    upper = np.empty(chunk, dtype=bool)
    lower = np.empty(chunk, dtype=bool)
    equal = np.empty(chunk, dtype=bool)
    single = lo == hi  # one tied value covers the whole bracket: nothing to gather
    count_above = 0
    starts: list[int] = []
    eq_hi: list[int] = []
    eq_lo: list[int] = []
    indices, scores_in_band = [], []
    for start in range(0, values.shape[0], chunk):
        part = values[start : start + chunk]
        size = part.shape[0]
        up, low, eq = upper[:size], lower[:size], equal[:size]
        scores = np.abs(part, out=scratch[:size]) if magnitude else part
        first = offset + start
        starts.append(first)
        if mass_hi:
            np.greater(scores, hi, out=eq)
            above = int(np.count_nonzero(eq))
            np.greater_equal(scores, hi, out=up)
            eq_hi.append(int(np.count_nonzero(up)) - above)
            count_above += above
        else:
            np.greater(scores, hi, out=up)
            count_above += int(np.count_nonzero(up))
        if single:
            continue
        if mass_lo:
            np.equal(scores, lo, out=eq)
            eq_lo.append(int(np.count_nonzero(eq)))
            np.greater(scores, lo, out=low)
        else:
            np.greater_equal(scores, lo, out=low)
        np.logical_xor(low, up, out=low)  # up is a subset of low: the band
        hits = np.flatnonzero(low)
        indices.append(hits + first)
        scores_in_band.append(scores[hits])
    empty_index, empty_value = np.empty(0, dtype=np.int64), np.empty(0, dtype=values.dtype)
    return _SliceScan(
        count_above,
        starts,
        eq_hi,
        eq_lo,
        np.concatenate(indices) if indices else empty_index,
        np.concatenate(scores_in_band) if scores_in_band else empty_value,
    )


def _is_mass(sample: np.ndarray, value: float) -> bool:
    """Whether ``value`` holds so much of the sample that its entries are counted, not gathered."""
    return int(np.count_nonzero(sample == value)) * _MASS_FRACTION >= sample.shape[0]


def _nth_tie(values: np.ndarray, start: int, stop: int, t: float, nth: int, magnitude: bool) -> int:
    """Flat index of the ``nth`` (1-based) score equal to ``t`` in ``values[start:stop]``."""
    part = values[start:stop]
    scores = np.abs(part) if magnitude else part
    return start + int(np.flatnonzero(scores == t)[nth - 1])


def _hardshrink_split(x: torch.Tensor, out: torch.Tensor, threshold: torch.Tensor, cut: int) -> None:
    """``out[i] = x[i]`` where ``|x[i]| >= t`` for ``i <= cut`` and ``|x[i]| > t`` after (flat views)."""
    below = float(torch.nextafter(threshold, torch.zeros_like(threshold)))
    cut = min(max(cut + 1, 0), x.numel())
    if cut > 0:
        torch.hardshrink(x[:cut], below, out=out[:cut])
    if cut < x.numel():
        torch.hardshrink(x[cut:], float(threshold), out=out[cut:])


def _select_numpy(values: np.ndarray, k: int, plan: _Plan) -> SampledSelection | None:
    """The numpy scan of :func:`kth_largest_sampled` across the intra-op threads, and the answer."""
    # NumPy releases the GIL in its kernels: one contiguous slice per intra-op thread.
    n = values.shape[0]
    bounds = np.linspace(0, n, max(1, torch.get_num_threads()) + 1).astype(np.int64)
    slices = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    scans = list(_thread_pool().map(lambda ab: _scan_numpy(values[ab[0] : ab[1]], ab[0], plan), slices))
    starts = [s for one in scans for s in one.starts] + [n]
    band_index = np.concatenate([one.band_index for one in scans])  # ascending: slices and chunks in order
    band_value = np.concatenate([one.band_value for one in scans])
    eq_hi = [c for one in scans for c in one.eq_hi]
    eq_lo = [c for one in scans for c in one.eq_lo]
    count_above = sum(one.count_above for one in scans)
    return _resolve(values, k, plan, count_above, eq_hi, eq_lo, band_index, band_value, starts)


def _resolve(
    values: np.ndarray, k: int, plan: _Plan, count_above: int, eq_hi: list[int], eq_lo: list[int],
    band_index: np.ndarray, band_value: np.ndarray, starts: list[int],
) -> SampledSelection | None:  # fmt: skip
    """The exact k-th largest from the scan's counts and band (``None`` if the bracket missed)."""
    # From the top: > hi (counted), == hi (counted if a mass), the band, == lo (counted if a mass).
    needed = k - count_above
    if needed <= 0:
        return None
    per_chunk: list[int] | None = None
    total_hi = sum(eq_hi)
    if plan.mass_hi and needed <= total_hi:
        t, count_gt, count_eq, per_chunk = plan.hi, count_above, total_hi, eq_hi
    else:
        needed -= total_hi
        count_gt = count_above + total_hi
        if needed <= band_value.shape[0]:
            m = band_value.shape[0]
            t = band_value.dtype.type(np.partition(band_value, m - needed)[m - needed])
            count_gt += int(np.count_nonzero(band_value > t))
            count_eq = int(np.count_nonzero(band_value == t))
        elif plan.mass_lo and needed - band_value.shape[0] <= sum(eq_lo):
            t, count_eq, per_chunk = plan.lo, sum(eq_lo), eq_lo
            count_gt += band_value.shape[0]
        else:
            return None
    room = k - count_gt
    threshold = torch.as_tensor(np.asarray(t, dtype=values.dtype))
    if room == count_eq:
        return SampledSelection(threshold, count_gt, count_gt + count_eq, None)
    if per_chunk is None:  # ties inside the band: their indices were gathered
        cut = int(band_index[np.flatnonzero(band_value == t)[room - 1]])
    else:  # ties of a counted value: the chunk holding the room-th, then one chunk's scan
        before = np.concatenate([[0], np.cumsum(per_chunk)])
        j = int(np.searchsorted(before, room, side="left")) - 1
        cut = _nth_tie(values, starts[j], starts[j + 1], float(t), room - int(before[j]), plan.magnitude)
    return SampledSelection(threshold, count_gt, count_gt + count_eq, cut)


def kth_largest_sampled(values: torch.Tensor, k: int, magnitude: bool) -> SampledSelection | None:
    """Exact k-th largest score of a large flat tensor through a sampled bracket.

    The score is ``|values|`` when ``magnitude`` is set (without materialising it on CPU), else
    ``values``. A strided sample brackets the k-th largest score in ``[lo, hi]`` with a
    5-sigma margin; counting the scores above ``hi`` and gathering the few inside the bracket
    turns one selection over ``n`` entries into one over ``O(sqrt(n))``. A bracket end that holds
    a large share of the sample (heavy ties: small integer or quantized values) is counted per
    chunk instead of gathered. The answer is always exact: when the bracket misses, ``None`` is
    returned and the caller runs the full selection.

    Args:
        values: Flat scores (or values whose magnitudes are the scores).
        k: Rank from the top, ``0 < k < numel``.
        magnitude: Score ``|values|`` instead of ``values``.

    Returns:
        A :class:`SampledSelection`: the k-th largest score ``t``, how many scores are ``> t`` and
        ``>= t``, and where the lower-index tie rule cuts the ties at ``t``; or ``None``.
    """
    values = values.detach()
    n = values.numel()
    stride = max(1, n // _SAMPLE_SIZE)
    on_numpy = _numpy_compatible(values) and values.is_contiguous()
    if on_numpy:  # NumPy's strided copy is several times faster than torch's
        array = values.reshape(-1).numpy()[::stride]
        sample = torch.from_numpy(np.abs(array) if magnitude else array.copy())
    else:
        sample = values[::stride].contiguous()
        sample = sample.abs() if magnitude else sample
    m = sample.numel()
    q = k / n
    margin = int(5.0 * math.sqrt(m * q * (1.0 - q))) + 16
    rank = int(q * m)
    hi_rank, lo_rank = rank - margin, rank + margin
    if hi_rank < 0 or lo_rank >= m:
        return None
    hi, lo = _sample_order_statistics(sample, [hi_rank, lo_rank])
    if not (math.isfinite(hi) and math.isfinite(lo)):
        return None  # NaN or inf in the bracket: the full selection decides
    if on_numpy:
        array = sample.numpy()
        mass_hi = lo == hi or _is_mass(array, hi)
        mass_lo = lo != hi and _is_mass(array, lo)
        return _select_numpy(values.reshape(-1).numpy(), k, _Plan(lo, hi, magnitude, mass_lo, mass_hi))
    scores = values.abs() if magnitude else values
    above_hi = scores > hi
    count_above_hi = int(torch.count_nonzero(above_hi))
    band = scores[(scores >= lo).logical_xor_(above_hi)]
    needed = k - count_above_hi
    if needed <= 0 or band.numel() < needed:
        return None
    threshold = torch.kthvalue(band, band.numel() - needed + 1).values
    count_gt = count_above_hi + int(torch.count_nonzero(band > threshold))
    count_ge = count_above_hi + int(torch.count_nonzero(band >= threshold))
    cut = None
    if count_ge > k:
        cut = int(torch.nonzero(scores.reshape(-1) == threshold)[k - count_gt - 1, 0])
    return SampledSelection(threshold, count_gt, count_ge, cut)


def _kth_largest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest entry of every row, shape ``(rows, 1)``."""
    n = rows.shape[-1]
    if rows.shape[0] == 1 and n >= SAMPLED_SELECT_MIN_NUMEL:
        found = kth_largest_sampled(rows[0], k, magnitude=False)
        if found is not None:
            return found[0].reshape(1, 1)
    if _numpy_compatible(rows):
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
    if _numpy_compatible(scores) and n <= _COLUMN_SCAN_MAX_WIDTH:
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
    ties = mask.logical_and_(~above)
    if rows.shape[0] == 1:  # one row (a whole tensor): the indices of its ties, not a rank per entry
        first = torch.nonzero(ties[0]).reshape(-1)[: int(room)]
        return above.index_fill_(1, first, True)
    tie_rank = torch.cumsum(ties.to(torch.int64), dim=-1)
    return above.logical_or_(ties.logical_and_(tie_rank <= room))


def _band(scores: np.ndarray, k: int) -> np.ndarray:
    """The scores at or above a floor a little below the k-th largest (at least ``k`` of them), or all of them.

    The floor is an order statistic of a strided sample of :data:`_BAND_SAMPLE` scores, a 5-sigma margin below the
    k-th largest's rank: the k-th largest of the band is the k-th largest of ``scores`` (every score left out is
    below the floor, which is at most the band's k-th largest), found by an introselect over a few times ``k``
    entries instead of all of them. All of them for a small array, with a NaN (the full introselect's answer
    stands: NaNs sort above every number), or when the floor missed (fewer than ``k`` at or above it).
    """
    n = scores.shape[0]
    if n < _BAND_MIN_NUMEL or k > n // 2 or np.isnan(scores.max()):
        return scores
    sample = scores[:: n // _BAND_SAMPLE]
    m = sample.shape[0]
    q = k / n
    rank = int(q * m) + int(5.0 * math.sqrt(m * q * (1.0 - q))) + 16  # from the top
    if rank >= m:
        return scores
    floor = np.partition(sample, m - 1 - rank)[m - 1 - rank]
    band = np.compress(scores >= floor, scores)  # about twice as fast as indexing with the mask
    return band if band.shape[0] >= k else scores


def _largest_magnitude_numpy(values: np.ndarray, k: int) -> SampledSelection | None:
    """The exact k-th largest magnitude of a small array and its ties (one introselect over the magnitudes of
    :func:`_band`, two counts), or ``None`` when it is not finite or NaNs are present."""
    scores = np.abs(values)
    n = scores.shape[0]
    band = _band(scores, k)
    m = band.shape[0]
    threshold = np.partition(band, m - k)[m - k]
    if not np.isfinite(threshold):
        return None
    count_gt, count_ge = int(np.count_nonzero(band > threshold)), int(np.count_nonzero(band >= threshold))
    if count_ge < k:  # NaNs sort above every number
        return None
    cut = _nth_tie(scores, 0, n, threshold, k - count_gt, magnitude=False) if count_ge > k else None
    return SampledSelection(torch.as_tensor(np.asarray(threshold, dtype=values.dtype)), count_gt, count_ge, cut)


def project_largest_magnitudes(x: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x`` with all but its ``k`` largest magnitudes zeroed (ties to the lower flat index), or ``None``.

    For contiguous tensors with ``0 < k < numel``: the threshold comes from
    :func:`kth_largest_sampled` for large ones (at least :data:`SAMPLED_SELECT_MIN_NUMEL` entries: it
    reads ``x`` once, heavy ties included), from one NumPy introselect on the magnitudes for smaller
    float CPU ones, over a band of candidates from :data:`_BAND_MIN_NUMEL` entries (:func:`_band`; no boolean
    tensor: comparisons into ``bool`` tensors are slow on CPU); then
    ``torch.hardshrink`` writes the result in one pass, split in two at the tie cut when only some
    of the entries tied at the threshold are kept. Nothing of ``x``'s size is allocated besides the
    result (and, for small tensors, the magnitudes), and not even the result when ``out``
    (contiguous, ``x``'s shape, dtype and device; ``x`` itself is allowed) is given. ``None`` when
    the path does not apply (non-contiguous or small non-CPU tensor, NaN or inf at the threshold,
    the bracket missed): the caller masks instead.
    """
    n = x.numel()
    if not (0 < k < n and x.is_contiguous() and x.is_floating_point()) or (out is not None and not out.is_contiguous()):
        return None
    if n >= SAMPLED_SELECT_MIN_NUMEL:
        found = kth_largest_sampled(x.reshape(-1), k, magnitude=True)
    elif _numpy_compatible(x):
        found = _largest_magnitude_numpy(x.reshape(-1).numpy(), k)
    else:
        return None
    if found is None:
        return None
    out = torch.empty_like(x) if out is None else out
    _hardshrink_split(x.reshape(-1), out.view(-1), found.threshold, n - 1 if found.cut is None else found.cut)
    return out
