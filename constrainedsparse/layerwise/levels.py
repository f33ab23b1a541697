"""Per-layer levels, for the CLI runner and :func:`~constrainedsparse.prune_layerwise` alike.

Given by the user (:func:`override_levels`: ``Targets.overrides``, a glob per level) or by rule
(:func:`solve_levels`): ``uniform`` (every layer at the target, no allocation), ``lagrangian``
(:mod:`~constrainedsparse.layerwise.allocation`: measured error curves, Lagrangian relaxation) or
``owl`` (:mod:`~constrainedsparse.layerwise.owl`: OWL's published outlier-ratio rule). The knobs are
the driver's ``allocation*`` and ``owl_*`` settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from constrainedsparse.layerwise.allocation import Allocation, allocate, grid_levels, measure_curves
from constrainedsparse.layerwise.driver import GRAM_DTYPES, block_prefixes
from constrainedsparse.layerwise.layers import targeted_layers, weight_name
from constrainedsparse.layerwise.owl import measure_outliers, owl_allocation
from constrainedsparse.layerwise.settings import DriverSettings
from constrainedsparse.targets import SparsityConfig, Targets, glob_names

__all__ = ["override_levels", "solve_levels"]


def override_levels(
    model: nn.Module, blocks: Sequence[nn.Module], targets: Targets, target: SparsityConfig
) -> dict[str, SparsityConfig]:
    """The levels ``targets.overrides`` gives, by layer weight name in the model (others keep ``target``).

    A glob matches a layer's weight name in the model (``model.layers.0.mlp.down_proj.weight``) or
    within its block (``mlp.down_proj.weight``, as ``include``/``exclude`` do in a layer-wise run);
    the first glob that matches sets the layer's level, at the run's pattern (row or layer scope).
    Whether every glob matches a layer, and every level fits its layer, is checked with the shapes
    (:func:`~constrainedsparse.layerwise.checks.check_layer_shapes`); overrides beside a pattern that fixes its
    own level (N:M) are refused before, by :func:`~constrainedsparse.layerwise.checks.check_allocation`.
    """
    if not targets.overrides:
        return {}
    levels = {}
    for prefix, block in zip(block_prefixes(model, blocks), blocks):
        for name, _ in targeted_layers(block, targets, prefix):
            level = targets.override_for(*glob_names(weight_name("", name), prefix))
            if level is not None:
                levels[weight_name(prefix, name)] = target.with_sparsity(level)
    return levels


def solve_levels(
    driver: DriverSettings,
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    target: SparsityConfig,
    targets: Targets,
    device: str,
    on_block: Callable[[], None] | None = None,
) -> Allocation | None:
    """The per-layer levels of ``driver.allocation`` on the dense model (``None`` for ``uniform``).

    Args:
        driver: The driver settings (``allocation``, its bounds, ``allocation_step`` and
            ``allocation_weight`` for ``lagrangian``, ``owl_m`` and ``owl_lambda`` for ``owl``, and
            ``gram_dtype``, ``offload``, ``activations`` for the measuring walk).
        model: The dense model.
        blocks: Its blocks, in execution order.
        batches: Calibration batches.
        target: The level shared out (its pattern is every layer's).
        targets: Which layers of a block are pruned.
        device: Where the measuring walk computes.
        on_block: Called after each measured block (progress).
    """
    if driver.allocation == "uniform":
        return None
    walk = {"gram_dtype": GRAM_DTYPES[driver.gram_dtype], "device": device, "offload": driver.offload,
            "activations": driver.activations, "on_block": on_block}  # fmt: skip
    if driver.allocation == "lagrangian":
        levels = grid_levels(driver.allocation_min, driver.allocation_max, driver.allocation_step)
        curves = measure_curves(model, blocks, batches, target, targets, levels, weight_by=driver.allocation_weight,
                                **walk)  # fmt: skip
        return allocate(curves, target.sparsity)
    ratios = measure_outliers(model, blocks, batches, target, targets, driver.owl_m, **walk)
    return owl_allocation(ratios, target.sparsity, driver.owl_lambda, driver.allocation_min, driver.allocation_max)
