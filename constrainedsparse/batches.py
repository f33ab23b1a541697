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
from torch.utils.data import Dataset, Subset, default_collate

__all__ = ["GuardedDataset", "batch_size", "collate_fn", "map_tensors", "tensors_in", "to_device"]


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


class GuardedDataset(Dataset):
    """A problem's dataset whose item reads and batching report the user's exceptions through ``guard`` (one line
    naming the problem, :func:`~constrainedsparse.usercode.call_user`), not as a traceback from inside a DataLoader.

    Args:
        dataset: The problem's map-style dataset.
        guard: ``guard(what, fn, *args)`` calls ``fn(*args)``; an exception of it is reported as ``what`` failing.
        which: ``"training"`` or ``"test"``, for the messages.
    """

    def __init__(self, dataset: Any, guard: Callable[..., Any], which: str) -> None:
        self.dataset, self.guard, self.which = dataset, guard, which

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.guard(f"reading item {index} of the {self.which} set", self.dataset.__getitem__, index)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """The items at ``indices`` (the dataset's own ``__getitems__`` where it has one, as a DataLoader calls it)."""
        many = getattr(self.dataset, "__getitems__", None)
        if many is None:
            return [self[index] for index in indices]
        return self.guard(f"reading items of the {self.which} set", many, indices)

    def collate(self, samples: list[Any]) -> Any:
        """``default_collate`` of the samples (items of different sizes fail there)."""
        return self.guard(f"batching samples of the {self.which} set (default_collate)", default_collate, samples)


def collate_fn(dataset: Any) -> Callable[[list[Any]], Any] | None:
    """The collate function a DataLoader of ``dataset`` takes: a :class:`GuardedDataset`'s (also under a
    ``Subset``), else ``None`` (the DataLoader's default)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return base.collate if isinstance(base, GuardedDataset) else None
