r"""Per-layer sparsity allocation as a constrained problem, solved by Lagrangian relaxation.

Uniform allocation (every layer at the target level :math:`S`) is what SparseGPT, Wanda and the
Frank-Wolfe paper use; OWL sets non-uniform levels by an outlier heuristic. Here the levels are the
solution of

.. math::

    \min_{s}\ \sum_l w_l\,e_l(s_l) \quad\text{s.t.}\quad \sum_l n_l s_l = S \sum_l n_l,
    \qquad s_{\min} \le s_l \le s_{\max},

where :math:`e_l(s)` is what pruning layer :math:`l` alone to level :math:`s` by Wanda's closed form
(a mask from scores, no solve) costs, measured on a grid of levels on the *dense* model's
calibration inputs, and :math:`n_l` is its number of weights. Three measures of the cost
(``--set allocation_weight``):

* ``block`` (default): the relative change of the layer's *block output*,
  :math:`\|h' - h\|^2 / \|h\|^2`, with :math:`h` the dense block's output on the calibration inputs
  and :math:`h'` the same block with layer :math:`l` pruned. It sees what a layer's error does after
  the block's nonlinearities and the residual connection, and is scale-free across blocks. One
  block forward per layer and level.
* ``equal``: the relative layer error :math:`\|(W - \hat W)X\|^2 / \|WX\|^2` (:math:`w_l = 1`), free
  given the Gram matrices.
* ``energy``: the absolute layer error :math:`\|(W - \hat W)X\|^2` (:math:`w_l` = the layer's output
  energy).

Measured on MiniLM (wanda at 60 %, 32 calibration paragraphs, embedding fidelity to dense): uniform
0.737; ``equal`` 0.632 (mean relative layer error 0.024 against uniform's 0.063: the sum it
minimises is not what the embeddings feel), ``energy`` 0.480, ``block`` 0.765 (0.773 on a 0.05
grid). The layer errors of one block add into its output non-linearly, and later blocks amplify
early errors; the block measure captures the first effect, none of the three the second.

**Lagrangian relaxation.** For a multiplier :math:`\lambda \ge 0` on the budget, the problem splits
per layer: :math:`s_l(\lambda) = \arg\min_s\ w_l e_l(s) - \lambda n_l s`, which on the piecewise-linear
interpolation of a convex curve is a grid level where the curve's slope per weight passes
:math:`\lambda`. :math:`\sum_l n_l s_l(\lambda)` grows with :math:`\lambda`, so bisection finds
:math:`\lambda^*` where it crosses the budget; the layers at the crossing take the interpolated
level that meets the budget, and a final repair on whole weights makes the kept count exact (to the
granularity of the pattern: a ``row`` level keeps the same count in every row). The curves are made
convex (their lower convex hull) first, the textbook condition under which the relaxation is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from constrainedsparse.layerwise.base import LayerProblem, wanda_scores
from constrainedsparse.layerwise.driver import accumulate_grams, run_block, walk_blocks
from constrainedsparse.layerwise.layers import layer_weight, set_layer_weight, targeted_layers, weight_name
from constrainedsparse.targets import SparsityConfig, Targets

__all__ = [
    "Allocation",
    "ErrorCurve",
    "allocate",
    "dense_layer_problems",
    "error_curve",
    "grid_levels",
    "kept_per_row",
    "level_targets",
    "measure_curves",
    "round_levels",
    "reachable_range",
    "row_width",
]


def grid_levels(low: float, high: float, step: float) -> list[float]:
    """The grid of levels ``low, low + step, ..., high`` (both ends included; ``[low]`` when they are one)."""
    if high <= low:
        return [low]
    count = max(1, round((high - low) / step))
    return [low + (high - low) * i / count for i in range(count + 1)]


@dataclasses.dataclass
class ErrorCurve:
    """One layer's error at each grid level.

    Attributes:
        name: The weight's name.
        size: Its number of weights :math:`n_l`.
        width: Entries per row (a ``row`` level's keep counts are multiples of the row count).
        levels: The grid.
        errors: :math:`e_l` at each level (relative error of Wanda's mask).
    """

    name: str
    size: int
    width: int
    levels: list[float]
    errors: list[float]

    def hull(self) -> list[tuple[float, float]]:
        """The lower convex hull of the points (level, error): the convex curve the relaxation uses."""
        hull: list[tuple[float, float]] = []
        for point in zip(self.levels, self.errors):
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (y2 - y1) * (point[0] - x1) >= (point[1] - y1) * (x2 - x1):
                    hull.pop()
                else:
                    break
            hull.append(point)
        return hull


@torch.no_grad()
def error_curve(layer: LayerProblem, levels: Sequence[float], weight_by: str = "equal") -> ErrorCurve:
    r"""Wanda's error of ``layer`` at every level (the layer's pattern, the level varied).

    Args:
        layer: The layer (dense weight, Gram matrix, pattern).
        levels: The grid.
        weight_by: ``"equal"``: the relative error :math:`e_l` (:math:`w_l = 1`); ``"energy"``: the
            absolute error :math:`\|(W - \hat W)X\|^2 = \|WX\|^2 e_l` (:math:`w_l` = the layer's output
            energy per calibration token).
    """
    weight = layer.weight.to(torch.float64)
    gram = layer.gram.to(torch.float64)
    dense = float(((weight @ gram) * weight).sum())
    scores = wanda_scores(layer.weight, layer.gram)
    errors = []
    for level in levels:
        mask = layer.target.with_sparsity(level).feasible_set(weight.shape).mask(scores)
        removed = weight.masked_fill(mask, 0.0)
        absolute = float(((removed @ gram) * removed).sum())
        if weight_by == "energy":
            errors.append(absolute / max(layer.tokens, 1))
        else:
            errors.append(absolute / dense if dense > 0 else 0.0)
    # A row level keeps the same count in every row; a layer-wide (unstructured) level any count.
    return ErrorCurve(layer.name, weight.numel(), row_width(weight.shape, layer.target.pattern), list(levels), errors)


@dataclasses.dataclass
class Allocation:
    """The solved allocation.

    Attributes:
        levels: The level of every layer, by weight name.
        multiplier: :math:`\\lambda^*`, the price of one more pruned weight in error units
            (``None`` for ``owl``, which has no multiplier).
        budget: The target level :math:`S` over all the layers.
        achieved: :math:`\\sum_l n_l s_l / \\sum_l n_l` of the final levels.
        method: ``"lagrangian"`` or ``"owl"`` (:mod:`~constrainedsparse.layerwise.owl`).
        outlier_ratios: ``owl``: every block's outlier ratio :math:`D_b`, by block name.
    """

    levels: dict[str, float]
    multiplier: float | None
    budget: float
    achieved: float
    method: str = "lagrangian"
    outlier_ratios: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``summary.json``."""
        return dataclasses.asdict(self)


def _choice(hull: list[tuple[float, float]], size: int, price: float) -> float:
    """:math:`\\arg\\min_s e(s) - \\text{price}\\cdot n\\,s` on a convex piecewise-linear curve (largest on ties)."""
    best = hull[0][0]
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        if (y2 - y1) / ((x2 - x1) * size) <= price:  # the segment's cost per pruned weight is below the price
            best = x2
    return best


def _total(curves: Sequence[ErrorCurve], hulls: Sequence[list], price: float) -> float:
    return sum(c.size * _choice(h, c.size, price) for c, h in zip(curves, hulls))


def allocate(curves: Sequence[ErrorCurve], budget: float, *, iterations: int = 100) -> Allocation:
    """Levels minimising the summed error with the budget met (see the module docstring).

    Args:
        curves: One error curve per layer, all on grids spanning ``[s_min, s_max]``.
        budget: The target level :math:`S` over all the layers, within the grids' span.
        iterations: Bisection steps on :math:`\\lambda`.

    Raises:
        ValueError: If the budget lies outside what the grids can reach.
    """
    hulls = [c.hull() for c in curves]
    sizes = sum(c.size for c in curves)
    wanted = budget * sizes
    low, high = reachable_range([(c.size, c.width, c.levels[0], c.levels[-1]) for c in curves])
    if not low - 1e-9 <= budget <= high + 1e-9:
        raise ValueError(
            f"the allocation budget {budget} is outside the levels the bounds allow with whole weights per row "
            f"[{low:.4g}, {high:.4g}]"
        )
    slopes = [(y2 - y1) / ((x2 - x1) * c.size) for c, h in zip(curves, hulls) for (x1, y1), (x2, y2) in zip(h, h[1:])]
    low, high = min(slopes, default=0.0) - 1.0, max(slopes, default=0.0) + 1.0
    for _ in range(iterations):  # smallest price whose choices reach the budget
        middle = (low + high) / 2
        if _total(curves, hulls, middle) >= wanted:
            high = middle
        else:
            low = middle
    levels = {c.name: _choice(h, c.size, low) for c, h in zip(curves, hulls)}
    upper = {c.name: _choice(h, c.size, high) for c, h in zip(curves, hulls)}
    _interpolate(curves, levels, upper, wanted)
    round_levels(curves, levels, wanted)
    achieved = sum(c.size * levels[c.name] for c in curves) / sizes
    return Allocation(levels, max(high, 0.0), budget, achieved)


def _interpolate(
    curves: Sequence[ErrorCurve], levels: dict[str, float], upper: Mapping[str, float], wanted: float
) -> None:
    """Moves the layers that change at :math:`\\lambda^*` part of the way, so the total meets ``wanted``."""
    total = sum(c.size * levels[c.name] for c in curves)
    for curve in curves:
        gap = wanted - total
        step = upper[curve.name] - levels[curve.name]
        if gap <= 0 or step <= 0:
            continue
        move = min(step, gap / curve.size)
        levels[curve.name] += move
        total += move * curve.size


def kept_per_row(width: int, s_min: float, s_max: float) -> tuple[int, int]:
    """The fewest and most weights a row of ``width`` keeps at levels within ``[s_min, s_max]``."""
    return math.ceil((1 - s_max) * width - 1e-9), math.floor((1 - s_min) * width + 1e-9)


def row_width(shape: Sequence[int], pattern: str) -> int:
    """Entries per row of a level: a ``row`` target keeps a count per output row, others per tensor."""
    return int(shape[1]) if pattern == "row" else math.prod(shape)


def reachable_range(layers: Sequence[tuple[int, int, float, float]]) -> tuple[float, float]:
    """The lowest and highest overall levels of layers ``(size, width, s_min, s_max)`` with whole
    weights per row (a narrow row cannot reach ``s_max`` exactly: 8 inputs at 0.95 keep 1, level 0.875)."""
    total = sum(size for size, _, _, _ in layers)
    fewest = most = 0
    for size, width, s_min, s_max in layers:
        low_count, high_count = kept_per_row(width, s_min, s_max)
        fewest += low_count * (size // width)
        most += high_count * (size // width)
    return 1.0 - most / total, 1.0 - fewest / total


def round_levels(curves: Sequence[ErrorCurve], levels: dict[str, float], wanted: float) -> None:
    """Rounds every level to a whole number of kept weights per row and makes the kept total exact.

    Each layer keeps a whole number of weights per row, within its bounds (the ends of its grid);
    the remainder of the global count is moved one row-count at a time to the layers whose level is
    furthest from its rounded value.
    """
    rows = {c.name: c.size // c.width for c in curves}
    fewest = {c.name: kept_per_row(c.width, c.levels[0], c.levels[-1])[0] for c in curves}
    most = {c.name: kept_per_row(c.width, c.levels[0], c.levels[-1])[1] for c in curves}
    kept = {c.name: min(max(round((1 - levels[c.name]) * c.width), fewest[c.name]), most[c.name]) for c in curves}
    target = round(sum(c.size for c in curves) - wanted)
    for _ in range(sum(c.width for c in curves)):
        gap = target - sum(kept[n] * rows[n] for n in kept)
        room = [c for c in curves if (kept[c.name] < most[c.name] if gap > 0 else kept[c.name] > fewest[c.name])]
        room = [c for c in room if rows[c.name] <= abs(gap) or 2 * abs(gap) > rows[c.name]]
        if gap == 0 or not room:
            break
        # the layer whose exact level is furthest from its rounded count in the direction of the gap
        chosen = max(room, key=lambda c: math.copysign(1, gap) * ((1 - levels[c.name]) * c.width - kept[c.name]))
        kept[chosen.name] += 1 if gap > 0 else -1
    for curve in curves:
        levels[curve.name] = 1.0 - kept[curve.name] / curve.width


def level_targets(target: SparsityConfig, levels: Mapping[str, float]) -> dict[str, SparsityConfig]:
    """The per-layer targets of an allocation (the run's pattern at each layer's level)."""
    return {name: target.with_sparsity(level) for name, level in levels.items()}


@torch.no_grad()
def dense_layer_problems(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    target: SparsityConfig,
    targets: Targets,
    *,
    gram_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    offload: bool = False,
    activations: str = "device",
) -> Generator[tuple[str, nn.Module, list[Any], Any, list[tuple[nn.Module, LayerProblem]]], None, None]:
    """The walk every allocation measures on: the *dense* model's blocks, each with its layers' problems.

    The same walk as pruning (:func:`~constrainedsparse.layerwise.driver.walk_blocks`) without
    changing any weight: yields ``(prefix, block, inputs, compute, [(module, problem), ...])`` per
    block, the problems built from the block's Gram matrices (float32 weights, the run's pattern);
    the dense block then runs to produce the next block's inputs.
    """
    walk = walk_blocks(model, blocks, batches, device=device, offload=offload, activations=activations)
    with contextlib.closing(walk):  # closing this walk closes that one: an offloaded block goes home
        for _, block, prefix, inputs, compute in walk:
            layers = targeted_layers(block, targets, prefix)  # globs match the model's names too, as pruning's
            grams = accumulate_grams(block, layers, inputs, gram_dtype, compute, prefix=prefix)
            problems = []
            for name, module in layers:
                gram, tokens = grams[name]
                weight = layer_weight(module).detach().to(torch.float32)
                problems.append((module, LayerProblem(weight_name(prefix, name), weight, gram, target, tokens)))
            yield prefix, block, inputs, compute, problems


@torch.no_grad()
def measure_curves(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    target: SparsityConfig,
    targets: Targets,
    levels: Sequence[float],
    *,
    gram_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    offload: bool = False,
    activations: str = "device",
    weight_by: str = "equal",
    on_block: Callable[[], None] | None = None,
) -> list[ErrorCurve]:
    """Every targeted layer's error curve, measured block by block on the *dense* model's inputs
    (:func:`dense_layer_problems`). ``on_block()`` is called after each block (progress).
    """
    curves = []
    walk = dense_layer_problems(model, blocks, batches, target, targets, gram_dtype=gram_dtype, device=device,
                                offload=offload, activations=activations)  # fmt: skip
    with contextlib.closing(walk):
        for _, block, inputs, compute, problems in walk:
            dense = _hidden_states(run_block(block, inputs, compute)) if weight_by == "block" else None
            for module, layer in problems:
                if weight_by == "block":
                    curves.append(_block_curve(layer, module, block, inputs, compute, dense, levels))
                else:
                    curves.append(error_curve(layer, levels, weight_by))
            if on_block is not None:
                on_block()
    return curves


def _hidden_states(outputs: Sequence[Any]) -> list[torch.Tensor]:
    return [item.hidden.detach() for item in outputs]


@torch.no_grad()
def _block_curve(
    layer: LayerProblem,
    module: nn.Module,
    block: nn.Module,
    inputs: Sequence[Any],
    compute: Any,
    dense: Sequence[torch.Tensor],
    levels: Sequence[float],
) -> ErrorCurve:
    r"""The layer's effect on its block's output: :math:`\|h' - h\|^2 / \|h\|^2` with the layer alone
    pruned by Wanda at each level (:math:`h` the dense block's output on the calibration inputs; padding left
    out, as the Gram matrices leave it out)."""
    original = layer_weight(module).detach().clone()
    scores = wanda_scores(layer.weight, layer.gram)
    energy = sum(float(item.token_sum(h.double().square())) for h, item in zip(dense, inputs, strict=True))
    errors = []
    try:
        for level in levels:
            mask = layer.target.with_sparsity(level).feasible_set(layer.weight.shape).mask(scores)
            set_layer_weight(module, layer.weight.masked_fill(~mask, 0.0))
            pruned = _hidden_states(run_block(block, inputs, compute))
            change = sum(
                float(item.token_sum((p - h).double().square()))
                for p, h, item in zip(pruned, dense, inputs, strict=True)
            )
            errors.append(change / energy if energy > 0 else 0.0)
    finally:
        set_layer_weight(module, original)
    width = row_width(layer.weight.shape, layer.target.pattern)
    return ErrorCurve(layer.name, layer.weight.numel(), width, list(levels), errors)
