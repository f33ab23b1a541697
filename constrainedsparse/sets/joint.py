r"""Patterns over several tensors together: one budget across layers (:class:`GlobalTopK`).

A global budget lets one tensor lose every entry to the others; :func:`lift_floors` ranks each
tensor's own best ``floor`` entries above everything else, so that every prefix of the joint
ranking at least as long as the floors together keeps them (``--set min_layer_density``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from constrainedsparse.selection import topk_mask
from constrainedsparse.sets.base import JointFeasibleSet, _lmo_mask, check_count, check_input

__all__ = ["GlobalTopK", "lift_floors", "nearest_prefix"]


class GlobalTopK(JointFeasibleSet):
    r"""At most ``k`` nonzeros across several tensors together (one budget, layer-wise free).

    Works on sequences of tensors: :math:`\{(x_1..x_L) : \sum_l \|x_l\|_0 \le k\}`.
    """

    def __init__(self, k: int) -> None:
        k = check_count(k)
        self.k = k

    @staticmethod
    def _check(xs: Sequence[torch.Tensor], ranked: bool = True) -> None:
        if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
            raise ValueError(f"GlobalTopK takes a sequence of tensors (one per layer), got a {type(xs).__name__}")
        if not xs:
            raise ValueError("GlobalTopK needs at least one tensor")
        for x in xs:
            check_input(x, ranked)

    def _flat(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check(xs)
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

    def lmo(self, grads: Sequence[torch.Tensor], only_negative: bool = False) -> list[torch.Tensor]:
        """Vertex of the joint mask hull minimising the summed inner product."""
        self._check(grads)
        flat = torch.cat([g.reshape(-1) for g in grads])
        vertex = _lmo_mask(-flat.unsqueeze(0), self.k, only_negative)[0]
        return [v.to(g.dtype) for v, g in zip(self._split(vertex, grads), grads)]

    def contains(self, xs: Sequence[torch.Tensor]) -> bool:
        """Whether the tensors have at most ``k`` nonzeros in total."""
        self._check(xs, ranked=False)
        return sum(int(torch.count_nonzero(x)) for x in xs) <= self.k

    def __repr__(self) -> str:
        return f"GlobalTopK(k={self.k})"


def lift_floors(scores: Sequence[torch.Tensor], floors: Sequence[int]) -> list[torch.Tensor]:
    r"""Scores under which every prefix of the joint ranking keeps each tensor's floor first.

    The ``floors[l]`` best entries of tensor :math:`l` (by ``|score|``, ties to the lower index, as
    :class:`GlobalTopK` ranks) are raised above every score of every tensor; the others keep their
    magnitude. So the top-:math:`k` of the lifted scores, for any :math:`k \ge \sum_l f_l`, is the
    floors plus the best :math:`k - \sum_l f_l` of the rest: a global budget with per-tensor minimums.

    Args:
        scores: One score tensor per tensor (magnitudes rank, as in :class:`GlobalTopK`).
        floors: The least number of entries each tensor keeps, ``0 <= floors[l] <= numel``.

    Returns:
        The lifted scores, float64, one per tensor.

    Raises:
        ValueError: If the lengths differ or a floor is outside ``[0, numel]``.
    """
    if len(floors) != len(scores):
        raise ValueError(f"{len(floors)} floors for {len(scores)} score tensors")
    for floor, score in zip(floors, scores):
        if not 0 <= floor <= score.numel():
            raise ValueError(f"a floor must be in [0, {score.numel()}], got {floor}")
    magnitudes = [s.detach().abs().to(torch.float64) for s in scores]
    top = max((float(m.max()) for m in magnitudes if m.numel()), default=0.0)
    lifted = []
    for magnitude, floor in zip(magnitudes, floors):
        keep = topk_mask(magnitude.reshape(1, -1), floor)[0].reshape(magnitude.shape)
        lifted.append(torch.where(keep, magnitude + (top + 1.0), magnitude))
    return lifted


def nearest_prefix(
    scores: Sequence[torch.Tensor], size: Callable[[list[int]], float], budget: float, minimum: int = 0
) -> list[torch.Tensor]:
    r"""The top-:math:`k` entries of one ranking across tensors, :math:`k` chosen so their size is nearest a budget.

    The prefixes of :class:`GlobalTopK` are nested (ties to the lower index), so the size
    :math:`S(k)` of the kept set, any function of the per-tensor counts that grows with them,
    never decreases with :math:`k`; a bisection finds the smallest :math:`k` with
    :math:`S(k) \ge B` and keeps :math:`k` or :math:`k - 1` entries, whichever is nearer to
    :math:`B` (a tie keeps :math:`k`).

    Args:
        scores: One score tensor per tensor (an entry may stand for a whole group of weights).
        size: ``size(counts)`` of a prefix from its kept count per tensor (e.g. kept weights, or
            the parameters of a purged model).
        budget: :math:`B`; at most the size of everything.
        minimum: The least :math:`k` (with :func:`lift_floors`: the floors' sum, so that they are kept).

    Returns:
        The boolean masks of the chosen prefix, one per score tensor.
    """

    def prefix(k: int) -> list[torch.Tensor]:
        return GlobalTopK(k).masks(scores)

    def prefix_size(k: int) -> float:
        return size([int(m.sum()) for m in prefix(k)])

    low, high = minimum, sum(s.numel() for s in scores)
    while low < high:  # smallest k with S(k) >= B (S(all) >= B)
        middle = (low + high) // 2
        if prefix_size(middle) >= budget:
            high = middle
        else:
            low = middle + 1
    k = low
    if k > minimum and budget - prefix_size(k - 1) < prefix_size(k) - budget:
        k -= 1
    return prefix(k)
