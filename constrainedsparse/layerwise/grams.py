r"""Gram matrices :math:`G = \sum_t x_t x_t^\top` of a block's linear layers over its calibration inputs.

One home for the accumulation (padding left out, any accumulation dtype, summed over ranks): the
driver's layer-wise solve, the allocation's error curves and the block mask search all call it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from constrainedsparse import distributed
from constrainedsparse.errors import UserInputError
from constrainedsparse.layerwise.blockinputs import BlockInputs
from constrainedsparse.layerwise.layers import layer_weight, weight_name

__all__ = ["StopForward", "accumulate_grams"]


class StopForward(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """Raised by a hook to stop a forward once what it records is recorded."""


def accumulate_grams(
    block: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    inputs: Sequence[BlockInputs],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    stop_after: str | None = None,
    prefix: str = "",
) -> dict[str, tuple[torch.Tensor, int]]:
    r"""Streams the block over the batches and sums :math:`G = \sum_t x_t x_t^\top` per layer.

    Padding tokens (``token_mask`` False) are left out. With ``device`` each batch moves there
    before the block runs (activations kept elsewhere). The sums accumulate in ``dtype`` whatever
    the model's dtype (bfloat16 weights still give float32 Gram matrices). With ``stop_after`` (a
    layer called once per forward) each forward stops once that layer's input is added. ``prefix``
    (the block's name in the model) names the layers in errors.

    Returns:
        ``{layer name: (G, number of tokens)}``.

    Raises:
        UserInputError: For an input that does not fit a layer, or a layer whose forward never ran on the
            batches (a module that reads its weight directly, such as ``nn.MultiheadAttention``'s ``out_proj``).
    """
    grams: dict[str, list] = {}
    current_mask: list[torch.Tensor | None] = [None]
    calls = dict.fromkeys((name for name, _ in layers), 0)

    def hook_for(name: str, d_in: int) -> Callable:
        def add(module: nn.Module, args: tuple) -> None:
            calls[name] += 1
            _check_input(weight_name(prefix, name), args[0], layer_weight(module))
            rows = args[0].reshape(-1, d_in)
            mask = current_mask[0]
            if mask is not None:
                if mask.numel() != rows.shape[0]:
                    raise ValueError(
                        f"{weight_name(prefix, name)}: {rows.shape[0]} input rows do not match the {mask.numel()} "
                        "tokens of the batch"
                    )
                rows = rows[mask.reshape(-1)]
            rows = rows.to(dtype)
            entry = grams[name]
            entry[0].addmm_(rows.t(), rows)
            entry[1] += rows.shape[0]
            if name == stop_after:
                raise StopForward

        return add

    handles = []
    for name, module in layers:
        d_in = layer_weight(module).shape[1]
        grams[name] = [torch.zeros(d_in, d_in, dtype=dtype, device=module.weight.device), 0]
        handles.append(module.register_forward_pre_hook(hook_for(name, d_in)))
    try:
        for item in inputs:
            call = item.to(device) if device is not None else item
            current_mask[0] = call.token_mask
            with contextlib.suppress(StopForward):
                block(*call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if distributed.is_distributed():  # each rank saw its share of the batches: sum over ranks
        counts = torch.tensor([entry[1] for entry in grams.values()] + list(calls.values()) + [len(inputs)],
                              dtype=torch.float64)  # fmt: skip
        dist.all_reduce(counts)
        summed = [int(count) for count in counts.tolist()]
        calls, batches = dict(zip(calls, summed[len(grams) : -1])), summed[-1]
        for entry, count in zip(grams.values(), summed):
            dist.all_reduce(entry[0])
            entry[1] = count
    else:
        batches = len(inputs)
    _check_called(calls, batches, prefix)
    return {name: (gram, tokens) for name, (gram, tokens) in grams.items()}


def _check_input(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """A layer's input fits its weight: its width, a floating dtype, the weight's dtype (outside autocast).

    Raises:
        UserInputError: Naming the layer's weight (``name``), what its input is and what the weight takes.
    """
    d_in = weight.shape[1]
    if x.shape[-1] != d_in:
        raise UserInputError(
            f"{name}: its input has width {x.shape[-1]}, its weight takes {d_in} features: the calibration "
            "batches do not fit the model"
        )
    if not x.is_floating_point():
        raise UserInputError(
            f"{name}: its input is {x.dtype}, not floating point: the calibration batches do not fit the model "
            "(token ids go through an embedding first)"
        )
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise UserInputError(
            f"{name}: its input is {x.dtype}, its weight {weight.dtype}: give calibration batches in the "
            f"model's dtype (batch.to({weight.dtype}))"
        )


def _check_called(calls: dict[str, int], batches: int, prefix: str) -> None:
    """Every layer's forward ran on the ``batches`` (a layer it never ran on has no Gram matrix to prune from).

    Raises:
        UserInputError: Naming the first layer never called (every rank sees the same summed counts).
    """
    never = next((name for name, count in calls.items() if count == 0), None)
    if batches and never is not None:
        raise UserInputError(
            f"{weight_name(prefix, never)}: its forward never ran on the {batches} calibration batches (a module "
            "that reads its weight directly, such as nn.MultiheadAttention's out_proj, or an expert no token was "
            "routed to): exclude it from the targets"
        )
