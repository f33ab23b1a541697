"""The model side of layer-wise pruning: which modules are layers, their ``(d_out, d_in)`` weights, the blocks.

``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored transposed, ``(d_in, d_out)``) are layers;
solvers always see :math:`W` as ``(d_out, d_in)`` through :func:`layer_weight`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from constrainedsparse.errors import UserInputError, user_stacklevel
from constrainedsparse.targets import Targets

__all__ = [
    "find_blocks",
    "layer_module_types",
    "layer_weight",
    "set_layer_weight",
    "targeted_layers",
    "to_layer_layout",
    "weight_name",
]


def _conv1d_type() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is an optional extra; plain modules need only nn.Linear
        return None
    return Conv1D


def layer_module_types() -> tuple[type[nn.Module], ...]:
    """Module types the driver prunes: ``nn.Linear`` and (if transformers is installed) ``Conv1D``."""
    conv1d = _conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def _is_transposed(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(d_out, d_in)`` (a view; GPT-2's ``Conv1D`` stores it transposed)."""
    return module.weight.t() if _is_transposed(module) else module.weight


def to_layer_layout(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``module.weight`` (its gradient, say) as ``(d_out, d_in)``, like :func:`layer_weight`."""
    return tensor.t() if _is_transposed(module) else tensor


def set_layer_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Writes a ``(d_out, d_in)`` weight back into the module, in place, in the module's dtype."""
    with torch.no_grad():
        layer_weight(module).copy_(weight.to(module.weight.dtype))


def written_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a solved layer as written back: float64 for a float64 model, else the solvers' float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def written_weight(pruned: torch.Tensor, unchanged: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The solved layer to write back: ``pruned`` (float32), where a float64 model's kept weights the solver left
    ``unchanged`` (from its float32 input; every kept one of a mask-only solver) take their float64 values back from
    ``original``, not float32's rounding."""
    if written_dtype(original.dtype) == torch.float32:
        return pruned
    return torch.where(unchanged, original, pruned.to(torch.float64))


def check_in_range(name: str, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuses a solved weight that ``dtype`` (the model's) cannot hold: written back it would be inf.

    Raises:
        UserInputError: If a weight update left a kept weight beyond the dtype's range (float16's 65504).
    """
    largest = float(weight.abs().max()) if weight.numel() else 0.0
    if largest > torch.finfo(dtype).max:
        raise UserInputError(
            f"{name}: the solver's kept weights reach {largest:.3g}, beyond {dtype}'s range "
            f"({torch.finfo(dtype).max:.3g}; written back they would be inf): prune a float32 copy of the "
            "model, or use a method that keeps the weights (wanda, fw without reconstruct)"
        )


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of blocks: its largest ``nn.ModuleList`` of two or more entries of one class that hold
    layers layer-wise pruning prunes, not counting a list inside an entry of another such list (a block's experts
    of a mixture-of-experts model); without one, its largest ``ModuleList`` of one class (a single block).

    Works for BERT (``encoder.layer``), GPT-2 (``transformer.h``), LLaMA (``model.layers``) and a
    plain module holding its blocks in a ``ModuleList``.

    Raises:
        ValueError: If the model has no such list, or two or more of the largest length (an encoder-decoder's
            stacks, a two-tower model's towers: which one to prune is the caller's to say with ``blocks=``).

    Warns:
        UserWarning: When another such list, shorter, holds prunable layers too (a decoder shorter than its
            encoder): it stays dense.
    """
    lists = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(child) for child in module}) == 1
    }
    prunable = layer_module_types()
    stacks = {
        name: module
        for name, module in lists.items()
        if len(module) > 1 and any(isinstance(layer, prunable) for layer in module.modules())
    }
    outer = {name: module for name, module in stacks.items() if not any(_inside(name, o) for o in stacks)}
    if not outer:  # one block, or blocks without a layer to prune (refused by the layer checks, naming them)
        if not lists:
            raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to prune layer by layer")
        return max(lists.values(), key=len)
    size = max(len(module) for module in outer.values())
    largest = [name for name, module in outer.items() if len(module) == size]
    if len(largest) > 1:
        raise ValueError(
            f"{type(model).__name__} has {len(largest)} lists of {size} blocks ({', '.join(largest)}): name the "
            "one to prune with blocks= (of prune_layerwise, or a LayerwiseProblem's); an encoder-decoder's stacks "
            "or a two-tower model's towers run on inputs of their own"
        )
    others = [f"{name} ({len(module)})" for name, module in outer.items() if name != largest[0]]
    if others:
        warnings.warn(
            f"the blocks pruned are {largest[0]} ({size}); {', '.join(others)} also hold layers and stay dense: "
            "name the blocks to prune with blocks=",
            stacklevel=user_stacklevel(),
        )
    return outer[largest[0]]


def _inside(name: str, other: str) -> bool:
    """Whether module ``name`` is inside module ``other`` (the model itself is ``""``)."""
    return name != other and (other == "" or name.startswith(f"{other}."))


def weight_name(prefix: str, layer: str) -> str:
    """The full name of a block's layer's weight (``encoder.layer.0`` + ``attention.self.query`` + ``.weight``).

    Either part may be empty: a block that is itself a layer (a ``ModuleList`` of ``nn.Linear``) names its
    weight ``blocks.0.weight``.
    """
    return ".".join(part for part in (prefix, layer, "weight") if part)


def targeted_layers(block: nn.Module, targets: Targets, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(name within the block, module)`` of the block's targeted linear layers, in order.

    ``prefix`` is the block's name in the model: ``include``/``exclude`` then also match layer names
    in the model (``model.layers.0.mlp.down_proj.weight``), not only within the block.
    """
    return [(fqn, module) for fqn, param_name, module in targets.select(block, prefix) if param_name == "weight"]
