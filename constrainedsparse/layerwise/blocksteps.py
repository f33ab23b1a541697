"""The block-level steps after a block is pruned, in their one order: the mask search, then the refit.

:func:`dense_layers` takes what the mask search needs before the solver overwrites the block (the dense
weights and every layer's pattern); :func:`block_steps` runs the steps :class:`BlockFit` asks for and
returns the metrics every layer report of the block gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from constrainedsparse.layerwise.blockfit import BlockFit, fit_block
from constrainedsparse.layerwise.blockinputs import BlockInputs
from constrainedsparse.layerwise.blockmask import search_block_masks
from constrainedsparse.layerwise.layers import layer_weight, targeted_layers, weight_name
from constrainedsparse.sets import FeasibleSet
from constrainedsparse.targets import SparsityConfig, Targets

__all__ = ["MaskLayers", "block_steps", "dense_layers"]

MaskLayers = list[tuple[nn.Module, torch.Tensor, FeasibleSet]]


def dense_layers(
    block: nn.Module,
    prefix: str,
    targets: Targets,
    target: SparsityConfig,
    levels: Mapping[str, SparsityConfig] | None,
) -> MaskLayers:
    """``(module, dense weight as (d_out, d_in) in the model's dtype, pattern)`` of the block's targeted layers."""
    layers = []
    for name, module in targeted_layers(block, targets, prefix):
        dense = layer_weight(module).detach().clone()
        own = (levels or {}).get(weight_name(prefix, name), target)
        layers.append((module, dense, own.feasible_set(dense.shape)))
    return layers


def block_steps(
    block: nn.Module,
    prefix: str,
    targets: Targets,
    mask_layers: MaskLayers | None,
    inputs: Sequence[BlockInputs],
    wanted: Sequence[BlockInputs],
    fit: BlockFit,
    device: torch.device | str | None,
) -> dict[str, float]:
    """Runs the mask search (``fit.mask_rounds``, from ``mask_layers``) and then the refit (``fit.epochs``).

    Returns:
        ``block_error`` (before either step), ``block_error_masked`` and ``block_mask_changed`` (the
        search), ``block_error_fitted`` (the refit): the relative block errors on the calibration batches;
        ``block_fit_reverted`` = 1 where the refit raised the error and was undone.
    """
    metrics: dict[str, float] = {}
    if mask_layers is not None:  # taken by the driver when fit.mask_rounds > 0
        searched = search_block_masks(block, mask_layers, inputs, wanted, fit.mask_rounds, device)
        metrics.update(
            block_error=searched.before, block_error_masked=searched.after, block_mask_changed=float(searched.changed)
        )
    if fit.epochs:
        fitted = fit_block(block, targeted_layers(block, targets, prefix), inputs, wanted, fit, device)
        metrics.setdefault("block_error", fitted.before)
        metrics["block_error_fitted"] = fitted.after
        if fitted.reverted:
            metrics["block_fit_reverted"] = 1.0
    return metrics
