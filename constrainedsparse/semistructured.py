"""2:4 sparse weights on sparse tensor cores: :func:`to_semi_structured` converts a loaded model's 2:4 ``nn.Linear``
weights to ``torch.sparse.to_sparse_semi_structured`` (CUDA, fp16/bf16)."""

from __future__ import annotations

import torch
from torch import nn

from constrainedsparse.sets import NMSparse

__all__ = ["SEMI_STRUCTURED_DTYPES", "is_two_four", "to_semi_structured"]

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a 2-D weight in which every group of 4 consecutive inputs (dim 1) has at most 2
    nonzeros (membership in the 2:4 set)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return NMSparse(2, 4).contains(weight)


def to_semi_structured(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Converts 2:4 ``nn.Linear`` weights to ``torch.sparse.to_sparse_semi_structured``, in place.

    Args:
        model: A model on a CUDA device in float16 or bfloat16.
        names: Module names to convert (each must be a 2:4 ``nn.Linear``); ``None`` converts every
            ``nn.Linear`` whose weight is 2:4 sparse (and not dense).

    Returns:
        The converted module names.

    Raises:
        ValueError: With one line, before any layer is converted: the model is not on CUDA, not
            fp16/bf16, a named layer is not a 2:4 Linear, or no Linear layer is 2:4 sparse.
    """
    from torch.sparse import to_sparse_semi_structured

    if isinstance(names, str) or (names is not None and not all(isinstance(name, str) for name in names)):
        raise ValueError(f"to_semi_structured: names must be a list of module names, got {names!r}")
    modules = dict(model.named_modules())
    chosen = list(names) if names is not None else [n for n, m in modules.items() if _is_two_four_linear(m)]
    if not chosen:
        raise ValueError("to_semi_structured: no nn.Linear of the model is 2:4 sparse (prune with --pattern 2:4)")
    for name in chosen:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"to_semi_structured: {name!r} is not an nn.Linear of the model")
        if not is_two_four(module.weight.detach()):
            raise ValueError(f"to_semi_structured: {name!r} is not 2:4 sparse (N:M 2:4 along the input dimension)")
        weight = module.weight
        if weight.device.type != "cuda" or weight.dtype not in SEMI_STRUCTURED_DTYPES:
            raise ValueError(
                f"to_semi_structured needs float16 or bfloat16 weights on a CUDA device, "
                f"{name!r} is {weight.dtype} on {weight.device}"
            )
    for name in chosen:
        module = modules[name]
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return chosen


def _is_two_four_linear(module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    weight = module.weight.detach()
    return bool(torch.count_nonzero(weight) < weight.numel()) and is_two_four(weight)
