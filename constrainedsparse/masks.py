"""Masks through :mod:`torch.nn.utils.parametrize`, hard pruning and sparsity measurement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse.targets import TargetParam

__all__ = [
    "Mask",
    "achieved_sparsity",
    "apply_masks",
    "current_masks",
    "find_parametrization",
    "hard_prune",
    "layer_sparsity",
    "remove_masks",
    "temporarily_pruned",
]


class Mask(nn.Module):
    """Parametrization ``W -> W * mask`` with a fixed boolean mask kept as a buffer."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    @torch.no_grad()
    def set_(self, mask: torch.Tensor) -> None:
        """Replaces the mask in place (keeps the buffer identity for checkpoints)."""
        self.mask.copy_(mask)


def find_parametrization(module: nn.Module, param_name: str, kind: type[nn.Module]) -> nn.Module | None:
    """The first parametrization of type ``kind`` on ``module.<param_name>``, if any."""
    if not parametrize.is_parametrized(module, param_name):
        return None
    return next((p for p in module.parametrizations[param_name] if isinstance(p, kind)), None)


def _mask_module(module: nn.Module, param_name: str) -> Mask | None:
    return find_parametrization(module, param_name, Mask)


def apply_masks(targets: Iterable[TargetParam], masks: Mapping[str, torch.Tensor]) -> None:
    """Registers (or updates) a :class:`Mask` parametrization on every target in ``masks``."""
    for target in targets:
        if target.name not in masks:
            continue
        mask = masks[target.name].to(target.tensor.device)
        existing = _mask_module(target.module, target.param_name)
        if existing is None:
            parametrize.register_parametrization(target.module, target.param_name, Mask(mask))
        else:
            existing.set_(mask)


def current_masks(targets: Iterable[TargetParam]) -> dict[str, torch.Tensor]:
    """The registered masks, by parameter name (targets without a mask are skipped)."""
    found = {}
    for target in targets:
        existing = _mask_module(target.module, target.param_name)
        if existing is not None:
            found[target.name] = existing.mask.clone()
    return found


@torch.no_grad()
def remove_masks(targets: Iterable[TargetParam]) -> None:
    """Bakes the masks into the weights (exact zeros) and removes the parametrizations."""
    for target in targets:
        if parametrize.is_parametrized(target.module, target.param_name):
            parametrize.remove_parametrizations(target.module, target.param_name, leave_parametrized=True)


@torch.no_grad()
def hard_prune(targets: Iterable[TargetParam], masks: Mapping[str, torch.Tensor]) -> None:
    """Writes exact zeros outside ``masks`` and leaves plain (un-parametrized) weights."""
    targets = list(targets)
    remove_masks(targets)
    for target in targets:
        if target.name in masks:
            weight = getattr(target.module, target.param_name)
            weight.mul_(masks[target.name].to(weight.device))


def _stored_parameter(target: TargetParam) -> torch.Tensor:
    if parametrize.is_parametrized(target.module, target.param_name):
        return target.module.parametrizations[target.param_name].original
    return getattr(target.module, target.param_name)


@contextlib.contextmanager
def temporarily_pruned(targets: Iterable[TargetParam], masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block the targets hold exact zeros outside ``masks``; restored on exit.

    Works on plain and parametrized weights alike (the stored tensor is masked, parametrizations
    stay registered), so a run can measure its hard-prune accuracy without leaving its state.
    """
    saved = []
    with torch.no_grad():
        for target in targets:
            if target.name in masks:
                stored = _stored_parameter(target)
                saved.append((stored, stored.detach().clone()))
                stored.mul_(masks[target.name].to(stored.device))
    try:
        yield
    finally:
        with torch.no_grad():
            for stored, value in saved:
                stored.copy_(value)


@torch.no_grad()
def layer_sparsity(targets: Iterable[TargetParam]) -> dict[str, float]:
    """Fraction of exact zeros in every targeted tensor (as the model computes it)."""
    return {t.name: 1.0 - int(torch.count_nonzero(t.tensor)) / t.tensor.numel() for t in targets}


@torch.no_grad()
def achieved_sparsity(targets: Iterable[TargetParam]) -> float:
    """Fraction of exact zeros over all targeted weights together."""
    zeros = total = 0
    for t in targets:
        zeros += t.tensor.numel() - int(torch.count_nonzero(t.tensor))
        total += t.tensor.numel()
    return zeros / total if total else 0.0
