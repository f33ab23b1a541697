"""The model-side preflight of a layer-wise run, one home for the CLI runner and
:func:`~constrainedsparse.prune_layerwise`: the blocks, their order, the per-layer levels, and every layer against
its pattern and level, all checked before a calibration batch runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from constrainedsparse.errors import user_input
from constrainedsparse.layerwise.checks import check_consecutive, check_layer_shapes, check_reachable, checked_blocks
from constrainedsparse.layerwise.driver import block_prefixes, offloaded_elsewhere
from constrainedsparse.layerwise.levels import override_levels
from constrainedsparse.layerwise.settings import DriverSettings
from constrainedsparse.targets import SparsityConfig, Targets

__all__ = ["BlockLayout", "check_block_layout"]


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
    return BlockLayout(checked, prefixes, levels)
