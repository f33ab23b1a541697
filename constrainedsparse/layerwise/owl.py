r"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): per-block levels from outlier ratios.

The published rule, as a baseline for ``--set allocation=lagrangian``. On the *dense* model's
calibration inputs, block by block, every targeted weight gets Wanda's score
:math:`S_{ij} = |W_{ij}|\,\|X_j\|_2`; the block's **outlier ratio** is the fraction of its scores
(all its targeted layers together) above :math:`M` times their mean,

.. math::

    D_b = \frac{|\{(l, i, j) \in b : S_{lij} > M\,\bar S_b\}|}{N_b} .

The ratios are mapped onto :math:`[0, 2\lambda]` and centred on the target density, so blocks with
more outliers are pruned less:

.. math::

    D'_b = 2\lambda\,\frac{D_b - \min_c D_c}{\max_c D_c - \min_c D_c}, \qquad
    s_b = S - \big(D'_b - \overline{D'}\big),

with :math:`\overline{D'}` the mean over blocks weighted by their sizes :math:`N_b` (OWL's plain
mean when, as in a transformer, every block has the same size), so that
:math:`\sum_b N_b s_b = S \sum_b N_b`. Every targeted layer of block :math:`b` gets :math:`s_b`,
clipped into ``[allocation_min, allocation_max]``, then rounded to whole weights per row with the
total kept count exact (:func:`~constrainedsparse.layerwise.allocation.round_levels`, the same
repair as the Lagrangian allocation). The paper's defaults: :math:`M = 5`, :math:`\lambda = 0.08`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from constrainedsparse.layerwise.allocation import (
    Allocation,
    ErrorCurve,
    dense_layer_problems,
    reachable_range,
    round_levels,
    row_width,
)
from constrainedsparse.layerwise.base import wanda_scores
from constrainedsparse.targets import SparsityConfig, Targets

__all__ = ["BlockOutliers", "measure_outliers", "outlier_ratio", "owl_allocation"]


@dataclasses.dataclass
class BlockOutliers:
    """One block's outlier ratio and its targeted layers.

    Attributes:
        name: The block's name in the model (``model.layers.3``).
        ratio: :math:`D_b`, the fraction of its Wanda scores above :math:`M` times their mean.
        layers: ``(weight name, number of weights, entries per row of a level)`` of its layers.
    """

    name: str
    ratio: float
    layers: list[tuple[str, int, int]]

    @property
    def size(self) -> int:
        """:math:`N_b`, the block's number of targeted weights."""
        return sum(size for _, size, _ in self.layers)


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    r"""The fraction of all ``scores`` (one tensor per layer, pooled) above ``m`` times their mean."""
    count = sum(s.numel() for s in scores)
    if count == 0:
        return 0.0
    mean = sum(float(s.double().sum()) for s in scores) / count
    return sum(int((s > m * mean).sum()) for s in scores) / count


@torch.no_grad()
def measure_outliers(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    target: SparsityConfig,
    targets: Targets,
    m: float,
    *,
    gram_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    offload: bool = False,
    activations: str = "device",
    on_block: Callable[[], None] | None = None,
) -> list[BlockOutliers]:
    """Every block's outlier ratio, on the dense model's calibration inputs (the walk of pruning, no change).

    ``on_block()`` is called after each block (progress).
    """
    measured = []
    walk = dense_layer_problems(model, blocks, batches, target, targets, gram_dtype=gram_dtype, device=device,
                                offload=offload, activations=activations)  # fmt: skip
    with contextlib.closing(walk):
        for prefix, _, _, _, problems in walk:
            scores = [wanda_scores(layer.weight, layer.gram) for _, layer in problems]
            named = [(layer.name, layer.weight.numel(), row_width(layer.weight.shape, target.pattern))
                     for _, layer in problems]  # fmt: skip
            measured.append(BlockOutliers(prefix, outlier_ratio(scores, m), named))
            if on_block is not None:
                on_block()
    return measured


def owl_allocation(
    blocks: Sequence[BlockOutliers], budget: float, lam: float, s_min: float = 0.0, s_max: float = 0.95
) -> Allocation:
    r"""OWL's levels for the blocks' ratios (module docstring), clipped and rounded with the budget exact.

    Args:
        blocks: The measured blocks.
        budget: The target level :math:`S` over all the targeted weights.
        lam: :math:`\lambda`, half the width of the interval the block levels spread over.
        s_min: Lowest level a layer may get.
        s_max: Highest level a layer may get.

    Raises:
        ValueError: If the budget lies outside what ``[s_min, s_max]`` can reach with whole weights per row.
    """
    blocks = [b for b in blocks if b.layers]
    sizes = [b.size for b in blocks]
    total = sum(sizes)
    low, high = reachable_range([(size, width, s_min, s_max) for b in blocks for _, size, width in b.layers])
    if not low - 1e-9 <= budget <= high + 1e-9:
        raise ValueError(
            f"the allocation budget {budget} is outside the levels the bounds allow with whole weights per row "
            f"[{low:.4g}, {high:.4g}]"
        )
    ratios = [b.ratio for b in blocks]
    spread = max(ratios) - min(ratios) if ratios else 0.0
    mapped = [2 * lam * (r - min(ratios)) / spread if spread > 0 else 0.0 for r in ratios]
    centre = sum(n * d for n, d in zip(sizes, mapped)) / total
    levels: dict[str, float] = {}
    curves = []
    for block, d in zip(blocks, mapped):
        level = min(max(budget - (d - centre), s_min), s_max)
        for name, size, width in block.layers:
            levels[name] = level
            curves.append(ErrorCurve(name, size, width, [s_min, s_max], [0.0, 0.0]))
    round_levels(curves, levels, budget * total)
    achieved = sum(c.size * levels[c.name] for c in curves) / total
    ratios_by_block = {b.name: b.ratio for b in blocks}
    return Allocation(levels, None, budget, achieved, method="owl", outlier_ratios=ratios_by_block)
