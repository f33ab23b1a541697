"""Batches of any structure: tensors inside tuples, lists, dicts and dataclasses (what a user's loss takes).

The runners and formulations never unpack a batch themselves: they move it, count it and shard it
through these functions, so ``(x, y)`` pairs, ``(x, y, w)`` triples and ``transformers``-style dicts
all work the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["batch_size", "map_tensors", "tensors_in", "to_device"]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The same structure with ``fn`` applied to every tensor (other leaves are kept)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):  # dicts and transformers' BatchEncoding alike become plain dicts
        return {key: map_tensors(value, fn) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(value, fn) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(value, fn) for value in batch)
    if _is_dataclass_instance(batch):  # a batch class of the user's: its init fields mapped
        changes = {f.name: map_tensors(getattr(batch, f.name), fn) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch


def tensors_in(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor of the batch, depth first in order."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from tensors_in(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from tensors_in(value)
    elif _is_dataclass_instance(batch):
        for field in dataclasses.fields(batch):
            yield from tensors_in(getattr(batch, field.name))


def _is_dataclass_instance(batch: Any) -> bool:
    return dataclasses.is_dataclass(batch) and not isinstance(batch, type)


def batch_size(batch: Any) -> int:
    """Number of samples: the leading dimension of the batch's first tensor (1 for a 0-d tensor).

    Raises:
        ValueError: If the batch holds no tensor.
    """
    first = next(tensors_in(batch), None)
    if first is None:
        raise ValueError(f"the batch holds no tensor (got a {type(batch).__name__})")
    return int(first.shape[0]) if first.dim() else 1


def to_device(batch: Any, device: torch.device | str) -> Any:
    """The batch with every tensor on ``device`` (non-blocking copies)."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))
