"""True-sequential pruning inside a block: which targeted layers share an input, in call order.

By default every targeted layer of a block is pruned from the Gram matrix of its input in the
*dense* block (SparseGPT's and Wanda's setting). With ``--set true_sequential=true`` (GPTQ's
"true sequential" order) the layers are pruned group by group, where a group is the layers called
with the same input tensor (a LLaMA block: ``q, k, v`` | ``o`` | ``gate, up`` | ``down``); each
group's Gram matrices are accumulated from the block with the earlier groups already pruned, so a
later layer (``o_proj``, ``down_proj``) is fitted to the inputs it will really see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from constrainedsparse import distributed

__all__ = ["InputGroups", "block_groups", "input_groups"]

Layer = tuple[str, nn.Module]


class InputGroups(list):
    """Groups of ``(name, module)`` in the order the block first calls them.

    Attributes:
        called_once: Whether every layer was called exactly once per forward (then a group's Gram
            matrices are complete when its last layer has been called, and the forward can stop there).
        uncalled: The layers that forward did not call (each alone in a last group).
    """

    called_once: bool = True
    uncalled: tuple[str, ...] = ()


@torch.no_grad()
def input_groups(layers: Sequence[Layer], run_once: Callable[[], None]) -> InputGroups:
    """Groups ``layers`` by the tensor they are called with, from one forward of their block.

    Args:
        layers: The block's targeted layers.
        run_once: Runs the block once (on one calibration batch).

    Returns:
        The groups in first-call order (a layer the forward never calls ends up alone, last).
    """
    keys: dict[str, int] = {}
    calls = dict.fromkeys((name for name, _ in layers), 0)
    alive: list[torch.Tensor] = []  # keeps every input alive, so no id() is reused during the pass

    def hook_for(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            calls[name] += 1
            if name not in keys:
                alive.append(args[0])
                keys[name] = id(args[0])

        return record

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers]
    try:
        run_once()
    finally:
        for handle in handles:
            handle.remove()
    by_key: dict[int | str, list[Layer]] = {}
    ordered = sorted(layers, key=lambda layer: list(keys).index(layer[0]) if layer[0] in keys else len(keys))
    for name, module in ordered:
        by_key.setdefault(keys.get(name, name), []).append((name, module))
    groups = InputGroups(by_key.values())
    groups.called_once = all(count == 1 for count in calls.values())
    groups.uncalled = tuple(name for name, count in calls.items() if count == 0)
    return groups


def block_groups(block: nn.Module, layers: Sequence[Layer], inputs: Sequence[Any], device: Any) -> InputGroups:
    """:func:`input_groups` of ``block`` from its first calibration batch (a driver ``BlockInputs``, run on
    ``device`` if given); under several processes rank 0's grouping, so every rank walks the same groups."""

    def run_once() -> None:
        call = inputs[0].to(device) if device is not None else inputs[0]
        block(*call.args, **call.kwargs)

    groups = input_groups(layers, run_once) if inputs else InputGroups([list(layers)])
    if not distributed.is_distributed():
        return groups
    holder = [([[name for name, _ in group] for group in groups], groups.called_once, groups.uncalled)]
    dist.broadcast_object_list(holder, src=0)
    names, called_once, uncalled = holder[0]
    modules = dict(layers)
    shared = InputGroups([[(name, modules[name]) for name in group] for group in names])
    shared.called_once, shared.uncalled = called_once, uncalled
    return shared
