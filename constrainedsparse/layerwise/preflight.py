"""The model-side preflight of a layer-wise run, one home for the CLI runner and
:func:`~constrainedsparse.prune_layerwise`: the blocks, their order, the per-layer levels, and every layer against
its pattern and level, all checked before a calibration batch runs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from constrainedsparse.errors import user_input, user_stacklevel
from constrainedsparse.layerwise.checks import check_consecutive, check_layer_shapes, check_reachable, checked_blocks
from constrainedsparse.layerwise.driver import block_prefixes, offloaded_elsewhere
from constrainedsparse.layerwise.layers import layer_module_types
from constrainedsparse.layerwise.levels import override_levels
from constrainedsparse.layerwise.settings import DriverSettings
from constrainedsparse.targets import SparsityConfig, Targets

__all__ = ["UNPRUNABLE_SHARE", "BlockLayout", "check_block_layout", "warn_unprunable"]


@dataclass
class BlockLayout:
    """What the preflight found: the blocks in execution order, their names in the model, and the levels the
    ``overrides`` of the targets set (by weight name; empty without overrides)."""

    blocks: list[nn.Module]
    prefixes: list[str]
    levels: dict[str, SparsityConfig]


def check_block_layout(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    targets: Targets,
    target: SparsityConfig,
    driver: DriverSettings,
    device: torch.device | str,
    *,
    allow_empty_layers: bool,
    keywords: bool = False,
    prefix: str | None = None,
) -> BlockLayout:
    """Checks the blocks (a list of the model's own, consecutive when offloaded elsewhere) and every targeted layer
    (fits its pattern and level, override globs match, the level is reachable by its rows).

    Args:
        keywords: Errors name Python keywords (``allow_empty_layers=True``) instead of CLI flags.
        prefix: If given, the errors about the blocks become one-line ``UserInputError``\\ s starting with it
            (the CLI names the problem).

    Raises:
        ValueError: Naming the first block or layer that does not fit.
    """

    def named() -> contextlib.AbstractContextManager[None]:
        return user_input(prefix) if prefix is not None else contextlib.nullcontext()

    with named():
        checked = checked_blocks(model, blocks)
    prefixes = block_prefixes(model, checked)
    with named():
        check_consecutive(prefixes, offloaded_elsewhere(model, device, driver.offload))
    levels = override_levels(model, checked, targets, target)
    check_layer_shapes(checked, targets, target, allow_empty_layers, levels, prefixes, keywords=keywords)
    check_reachable(checked, targets, target, driver, prefixes)
    warn_unprunable(checked, prefixes)
    return BlockLayout(checked, prefixes, levels)


UNPRUNABLE_SHARE = 0.05
"""The share of the blocks' matrix weights outside prunable layers from which :func:`warn_unprunable` warns (a
relative position bias is below it; a mixture-of-experts model's fused experts far above)."""


def warn_unprunable(blocks: Iterable[nn.Module], prefixes: Iterable[str]) -> None:
    """Warns when weights of two or more dimensions that make up :data:`UNPRUNABLE_SHARE` or more of the blocks'
    lie outside the layers layer-wise pruning prunes (``nn.Linear``, GPT-2's ``Conv1D``): they stay dense whatever
    the targets, so ``achieved_sparsity`` (over the pruned layers) says nothing of them."""
    prunable = layer_module_types()
    outside: list[tuple[str, int]] = []
    total = 0
    for block, prefix in zip(blocks, prefixes, strict=True):
        for name, module in block.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() < 2:
                    continue
                total += param.numel()
                if not isinstance(module, prunable):
                    outside.append((".".join(p for p in (prefix, name, param_name) if p), param.numel()))
    share = sum(numel for _, numel in outside) / total if total else 0.0
    outside.sort(key=lambda named: -named[1])  # the largest first
    if outside and share >= UNPRUNABLE_SHARE:
        others = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
        warnings.warn(
            f"{outside[0][0]}{others} ({share:.0%} of the blocks' matrix weights) are not in a layer layer-wise "
            f"pruning prunes ({', '.join(kind.__name__ for kind in prunable)}) and stay dense: a mixture-of-experts "
            "model's fused experts, a convolution; achieved_sparsity counts the pruned layers, model_sparsity the "
            "whole model",
            stacklevel=user_stacklevel(),
        )
