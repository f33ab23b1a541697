r"""Block-level mask search: a pruned block's masks moved towards the dense block outputs, weights unchanged.

A layer-wise solver picks each layer's mask for its own output error. What the model needs is the
block's output: the attention softmax, the gated MLP and the residual stream weigh the layers' errors
differently, and the blocks before hand on theirs. After a mask-only solver (``magnitude``, ``wanda``,
``fw`` without ``reconstruct``) has pruned a block, the search lowers

.. math::

    \mathcal{L}(M) = \frac{\sum_b \| f(W \odot M; X_b) - Y_b \|^2}{\sum_b \|Y_b\|^2}

over the masks of the block's targeted layers, each within its pattern, the kept weights staying the
dense ones (so the result is still a mask of the dense model; :math:`Y_b` as in
:mod:`~constrainedsparse.layerwise.blockfit`, ``block_fit_target``).

**Local model.** Per layer, with :math:`D = W \odot (1 - M)` the pruned part, :math:`D_0` the current
one, :math:`g = \partial\mathcal{L}/\partial \hat W` and :math:`G` the layer's Gram matrix on the
block's current inputs,

.. math::

    \mathcal{L}(D) \approx \mathcal{L}_0 - \langle g, D - D_0\rangle
    + \tau\beta \sum_i (d_i - d_{0,i})^\top G\, (d_i - d_{0,i}),

where :math:`\beta` is the curvature of :math:`\mathcal{L}` along the layer's own error direction
(a second difference at :math:`D_0 (1 \pm \epsilon)` on the first ``CURVATURE_BATCHES`` batches) and
:math:`\tau \ge 1` a trust factor: other directions bend far more than :math:`D_0`'s. Up to the factor
:math:`\tau\beta`, this model is fw's layer objective with its residual :math:`C = DG` replaced by
:math:`C' = (D - D_0)G - g/(2\tau\beta)`, which starts at :math:`-g/(2\tau\beta)`; so fw's own
descents minimise it unchanged: the swap descent
(:func:`~constrainedsparse.layerwise.fw.search.swap_polish`, ``row`` and ``unstructured``: each row
keeps its count) and the N:M group sweep
(:func:`~constrainedsparse.layerwise.fw.groups.group_sweep_polish`).

**A round**: one forward and backward pass for :math:`g`, one forward pass for every :math:`G`
(:func:`~constrainedsparse.layerwise.grams.accumulate_grams`, also on the first batches), two forward
passes per layer on the first batches for :math:`\beta`, then one candidate per :math:`\tau` in ``TRUST`` (all layers
at once) whose exact :math:`\mathcal{L}` is computed; the best candidate is kept if it lowers
:math:`\mathcal{L}`, otherwise the search stops. So the block's calibration loss never increases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from constrainedsparse.layerwise.blockfit import Pairs, batch_loss, block_sums, compute_inputs, widened_block
from constrainedsparse.layerwise.blockinputs import BlockInputs
from constrainedsparse.layerwise.fw.core import SUPPORTED_SETS
from constrainedsparse.layerwise.fw.groups import group_sweep_polish
from constrainedsparse.layerwise.fw.search import swap_polish
from constrainedsparse.layerwise.grams import accumulate_grams
from constrainedsparse.layerwise.layers import layer_weight, set_layer_weight, to_layer_layout
from constrainedsparse.sets import FeasibleSet, NMSparse

__all__ = ["MaskSearchResult", "SEARCHABLE_PATTERNS", "search_block_masks"]

# Patterns whose moves the search has, fw's own: swaps within rows (row, unstructured), group changes (N:M).
SEARCHABLE_PATTERNS = tuple(cls.kind for cls in SUPPORTED_SETS)
# Trust factors tried every round (the model's curvature times each); picked on one block of
# SmolLM2 at 60 % and 2:4 by its calibration loss (lowest at 300-500 there; 100 and below raise it).
TRUST = (200.0, 300.0, 450.0, 700.0, 1000.0, 1500.0)
CURVATURE_BATCHES = 2
EPSILON = 0.5
SWAP_STEPS = 200
GROUP_SWEEPS = 2


@dataclasses.dataclass(frozen=True)
class MaskSearchResult:
    """Relative block error :math:`\\mathcal{L}` before and after, rounds that improved it, entries changed."""

    before: float
    after: float
    rounds: int
    changed: int


@dataclasses.dataclass
class _Layer:
    """One targeted layer: its module, dense weight (the model's dtype: what a mask keeps is written back exactly),
    pattern and current mask; ``dense32``, the dense weight in float32, is what the search computes with."""

    module: nn.Module
    dense: torch.Tensor
    feasible: FeasibleSet
    mask: torch.Tensor
    dense32: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.dense32 = self.dense.float()

    def apply(self, mask: torch.Tensor) -> None:
        set_layer_weight(self.module, self.dense * mask)


def start_mask(pruned: torch.Tensor, dense: torch.Tensor, feasible: FeasibleSet) -> torch.Tensor:
    """The solver's mask, read off its pruned weight: the kept nonzeros, topped up with dense zeros to
    the pattern's count (a kept weight that is zero in the dense model cannot be told apart)."""
    score = (pruned != 0).to(torch.float32) * 2.0 + (dense == 0).to(torch.float32)
    return feasible.mask(score)


def search_block_masks(
    block: nn.Module,
    layers: Sequence[tuple[nn.Module, torch.Tensor, FeasibleSet]],
    inputs: Sequence[BlockInputs],
    targets: Sequence[BlockInputs],
    rounds: int,
    device: torch.device | str | None = None,
) -> MaskSearchResult:
    """Lowers the block error over the masks of ``layers`` (see the module docstring), weights kept dense.

    Args:
        block: The pruned block (its targeted weights are rewritten in place).
        layers: ``(module, dense weight (d_out, d_in) in the model's dtype, pattern)`` of every targeted layer; the
            module's weight is the dense one masked (a mask-only solver's result).
        inputs: The block's calibration inputs.
        targets: The target outputs, one per batch.
        rounds: Rounds at most.
        device: Where the block computes (each batch moves there in turn); ``None``: where they are.

    Returns:
        The block error before and after, the rounds that lowered it, and the mask entries changed.
    """
    pairs = list(zip(inputs, targets))
    with widened_block(block, [module for module, _, _ in layers]):
        state = [
            _Layer(module, dense, feasible, start_mask(layer_weight(module).float(), dense, feasible))
            for module, dense, feasible in layers
        ]
        starts = [layer.mask for layer in state]
        error, energy = block_sums(block, pairs, device)
        before = current = error / energy
        done = 0
        for _ in range(rounds):
            found = _round(block, state, pairs, energy, current, device)
            if found is None:
                break
            current, done = found, done + 1  # every round leaves its chosen masks applied
    changed = sum(int((layer.mask != start).sum()) for layer, start in zip(state, starts))
    return MaskSearchResult(before=before, after=current, rounds=done, changed=changed)


def _round(
    block: nn.Module,
    state: list[_Layer],
    pairs: Pairs,
    energy: float,
    current: float,
    device: torch.device | str | None,
) -> float | None:
    """One round: the best candidate over ``TRUST`` if it beats ``current`` (then applied), else ``None``."""
    grads = _gradients(block, state, pairs, energy, device)
    named, few = [(str(i), layer.module) for i, layer in enumerate(state)], pairs[:CURVATURE_BATCHES]
    items = [compute_inputs(item, target) for item, target in pairs]  # the block computes in float32 or wider
    grams = [gram for gram, _ in accumulate_grams(block, named, items, device=device).values()]
    few_grams = [gram for gram, _ in accumulate_grams(block, named, items[: len(few)], device=device).values()]
    base = block_sums(block, few, device)[0]  # the current error on few: every curvature's middle point
    curvatures = [_curvature(block, layer, few, gram, base, device) / energy for layer, gram in zip(state, few_grams)]
    best, best_masks = current, None
    for trust in TRUST:
        masks = [
            _descend(layer, gram, grad, trust * beta) if beta > 0 else layer.mask
            for layer, gram, grad, beta in zip(state, grams, grads, curvatures)
        ]
        for layer, mask in zip(state, masks):
            layer.apply(mask)
        error, _ = block_sums(block, pairs, device)
        if error / energy < best:
            best, best_masks = error / energy, masks
    for layer, mask in zip(state, best_masks or [layer.mask for layer in state]):
        layer.mask = mask
        layer.apply(mask)
    return best if best_masks is not None else None


def _descend(layer: _Layer, gram: torch.Tensor, grad: torch.Tensor, curvature: float) -> torch.Tensor:
    """The mask minimising the local model from the current one: fw's descents with the shifted residual."""
    residual = grad / (-2.0 * curvature)
    if isinstance(layer.feasible, NMSparse):
        found = group_sweep_polish(layer.dense32, gram, layer.mask, layer.feasible.m, GROUP_SWEEPS, residual=residual)
    else:  # RowTopK, TopK: check_block_mask refuses other patterns at the boundary
        found = swap_polish(layer.dense32, gram, layer.mask, SWAP_STEPS, residual=residual)
    return found.mask


def _curvature(
    block: nn.Module, layer: _Layer, few: Pairs, gram: torch.Tensor, base: float, device: torch.device | str | None
) -> float:
    r"""The curvature of the summed squared error along :math:`D_0` per unit of :math:`\sum_i d_i^\top G d_i`:
    its second difference on ``few`` (``base``: the error there now), over the quadratic form with ``few``'s
    Gram matrix ``gram``."""
    pruned = layer.dense32 * ~layer.mask
    quadratic = float(((pruned @ gram) * pruned).sum())
    if quadratic <= 0:
        return 0.0
    values = []
    for sign in (1.0, -1.0):
        set_layer_weight(layer.module, layer.dense32 * layer.mask - sign * EPSILON * pruned)
        values.append(block_sums(block, few, device)[0])
    layer.apply(layer.mask)
    # few's squared error e(s) ~ e0 + s a + s^2 beta q_few, with q_few the quadratic form on few's Gram.
    return (values[0] + values[1] - 2.0 * base) / (2.0 * EPSILON**2 * quadratic)


def _gradients(
    block: nn.Module, state: list[_Layer], pairs: Pairs, energy: float, device: torch.device | str | None
) -> list[torch.Tensor]:
    """:math:`\\partial\\mathcal{L}/\\partial\\hat W` of every layer (the normalised error), ``(d_out, d_in)``."""
    weights = [layer.module.weight for layer in state]
    try:
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
                w.grad = None
            for item, target in pairs:
                error, _ = batch_loss(block, item, target, device)
                (error / energy).backward()
        # No gradient: a layer whose output the block discards (its error does not depend on it).
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
        return [to_layer_layout(layer.module, grad).float() for layer, grad in zip(state, grads, strict=True)]
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
