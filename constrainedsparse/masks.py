"""Masks through :mod:`torch.nn.utils.parametrize`, hard pruning and sparsity measurement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse.claims import attached_formulation
from constrainedsparse.report import empty_layers
from constrainedsparse.targets import TargetParam, resolved_targets

__all__ = [
    "Mask",
    "canonical_parameters",
    "achieved_sparsity",
    "apply_masks",
    "check_masks",
    "current_masks",
    "find_parametrization",
    "foreign_parametrization",
    "hard_prune",
    "register_parametrization",
    "remove_parametrization",
    "layer_sparsity",
    "parametrized",
    "remove_masks",
    "temporarily_pruned",
]


class Mask(nn.Module):
    """Parametrization ``W -> W * mask`` with a fixed boolean mask kept as a buffer.

    The product uses the mask in the weight's dtype, made once per mask value, dtype and device (a
    boolean factor is converted on every forward and again in the backward: a third of a small
    layer's masked step).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())
        self._factor: tuple[tuple[int, int, torch.dtype, torch.device], torch.Tensor] | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced into the user's compiled graph: the cache's version check would break the graph at every
            # pruned layer and recompile after every mask update; the conversion fuses into the product there.
            return weight * self.mask.to(weight.dtype)
        return weight * self.factor(weight)

    def factor(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask as 0/1 in ``weight``'s dtype and device (rebuilt after the mask changed in place)."""
        key = (id(self.mask), self.mask._version, weight.dtype, self.mask.device)  # id: a buffer assigned anew
        if self._factor is None or self._factor[0] != key:
            self._factor = (key, self.mask.to(weight.dtype))
        return self._factor[1]

    @torch.no_grad()
    def set_(self, mask: torch.Tensor) -> None:
        """Replaces the mask in place (keeps the buffer identity for checkpoints)."""
        self.mask.copy_(mask)


def canonical_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters in an order that parametrizations do not change.

    While a parametrization is registered, the tensor it parametrizes is listed under the module's
    ``parametrizations`` child, after the module's other parameters (:func:`remove_parametrization`
    puts it back in its place). Here every module's parameters come by name (a parametrized tensor's stored ``original``
    under its own name), so an optimizer built before or after a phase that masked the model holds
    its parameters in the same order, and a checkpointed optimizer state loads back onto the same
    tensors.
    """
    found: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        own = {name: p for name, p in module.named_parameters(recurse=False) if p is not None}
        if parametrize.is_parametrized(module):
            own.update({name: module.parametrizations[name].original for name in module.parametrizations})
        for name in sorted(own):
            if id(own[name]) not in seen and not isinstance(module, parametrize.ParametrizationList):
                seen.add(id(own[name]))
                found.append(own[name])
    return found


def parametrized(model: nn.Module) -> bool:
    """Whether a module of ``model`` carries a parametrization (masks or gates still on it)."""
    return any(parametrize.is_parametrized(m) for m in model.modules())


def find_parametrization(module: nn.Module, param_name: str, kind: type[nn.Module]) -> nn.Module | None:
    """The first parametrization of type ``kind`` on ``module.<param_name>``, if any."""
    if not parametrize.is_parametrized(module, param_name):
        return None
    return next((p for p in module.parametrizations[param_name] if isinstance(p, kind)), None)


def _mask_module(module: nn.Module, param_name: str) -> Mask | None:
    return find_parametrization(module, param_name, Mask)


def check_masks(targets: Sequence[TargetParam], masks: Mapping[str, torch.Tensor]) -> None:
    """Every mask names a target, is boolean and has its tensor's shape.

    Raises:
        ValueError: For a name that is no target (a typo would leave that tensor dense), a mask that is
            not boolean (scores or 0/1 floats: which entries they keep is not said), or a shape that differs.
    """
    if not isinstance(masks, Mapping):
        raise ValueError(
            f"masks must be a dict {{target name: boolean tensor}} (what hard_masks() returns), got a "
            f"{type(masks).__name__}"
        )
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor):
            kind = f"{type(mask).__module__}.{type(mask).__name__}".removeprefix("builtins.")
            raise ValueError(f"the mask of {name} is a {kind}, not a torch tensor (torch.from_numpy converts one)")
    unknown = sorted(set(masks) - {target.name for target in targets})
    if unknown:
        known = ", ".join(target.name for target in targets) or "none (an empty list)"
        raise ValueError(f"masks name no target: {', '.join(map(repr, unknown))}; the targets are {known}")
    not_bool = [(name, mask.dtype) for name, mask in masks.items() if mask.dtype != torch.bool]
    if not_bool:
        name, dtype = not_bool[0]
        raise ValueError(
            f"the mask of {name} is {dtype}; masks are boolean tensors, True where a weight is kept "
            "(what hard_masks() returns; from scores, keep the top k: scores >= threshold)"
        )
    for target in targets:
        if target.name in masks and tuple(masks[target.name].shape) != tuple(target.tensor.shape):
            raise ValueError(
                f"the mask of {target.name} has shape {tuple(masks[target.name].shape)}, the tensor "
                f"{tuple(target.tensor.shape)}"
            )


def apply_masks(
    targets: Iterable[TargetParam], masks: Mapping[str, torch.Tensor], *, allow_empty: bool = False
) -> None:
    """Registers (or updates) a :class:`Mask` parametrization on every target in ``masks``.

    Args:
        targets: What :meth:`~constrainedsparse.Targets.resolve` returned.
        masks: Boolean masks by target name (``True``: kept).
        allow_empty: Accept a mask that keeps no weight of its tensor (the tensor stays 0 and never trains).

    Raises:
        ValueError: If a mask names no target or has another shape than its tensor (:func:`check_masks`), a
            mask keeps nothing (unless ``allow_empty``), or a target in ``masks`` carries a formulation (its
            gates, or an slr/admm not finalized: a mask of yours would fight the formulation's own). Nothing
            is changed then.
    """
    targets = resolved_targets(targets, "apply_masks(targets, masks): ")
    check_masks(targets, masks)
    if not allow_empty:
        _check_keeps_weights(masks, "apply_masks(targets, masks)", "the tensor would stay 0 and never train")
    _check_no_formulation([t for t in targets if t.name in masks], "apply_masks()")
    _write_masks(targets, masks)


def set_masks(targets: Sequence[TargetParam], masks: Mapping[str, torch.Tensor]) -> None:
    """:func:`apply_masks` for a formulation that owns its targets' masks (``magnitude``, the fixed-mask
    retraining): the masks are checked (a state loaded), not whether a formulation is attached.

    Raises:
        ValueError: As :func:`check_masks`.
    """
    check_masks(targets, masks)
    _write_masks(targets, masks)


def _write_masks(targets: Sequence[TargetParam], masks: Mapping[str, torch.Tensor]) -> None:
    for target in targets:
        if target.name not in masks:
            continue
        mask = masks[target.name].to(target.tensor.device)
        existing = _mask_module(target.module, target.param_name)
        if existing is None:
            register_parametrization(target.module, target.param_name, Mask(mask))
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


def foreign_parametrization(target: TargetParam) -> str | None:
    """The class name of a parametrization on the target that is not a :class:`Mask`, if any."""
    if not parametrize.is_parametrized(target.module, target.param_name):
        return None
    other = [p for p in target.module.parametrizations[target.param_name] if not isinstance(p, Mask)]
    return type(other[0]).__name__ if other else None


_ORDER = "_constrainedsparse_parameter_order"  # a module's parameter names before its first parametrization


def register_parametrization(module: nn.Module, name: str, parametrization: nn.Module) -> None:
    """``torch.nn.utils.parametrize.register_parametrization``, noting the order of the module's parameters first
    (:func:`remove_parametrization` puts them back in it)."""
    if not parametrize.is_parametrized(module):
        module.__dict__[_ORDER] = list(module._parameters)
    parametrize.register_parametrization(module, name, parametrization)


@torch.no_grad()
def remove_parametrization(module: nn.Module, name: str, *, leave_parametrized: bool) -> None:
    """``torch.nn.utils.parametrize.remove_parametrizations`` that leaves copies of ``module`` working and its
    parameters in their order.

    torch removes a parametrization by deleting the tensor's property from the module's parametrized class, which
    every ``copy.deepcopy`` of the module made while it was parametrized shares (an EMA or best-so-far copy of the
    model): the copy would lose its weight. The module gets a class of its own first (the same bases and members).
    torch also puts the tensor back at the end of the module's parameters (``model.parameters()`` and
    ``state_dict()`` listed a bias before its weight: a copy of the model made before, an EMA updated by position
    or an optimizer state saved before, no longer lined up): the order noted at registration is restored.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(vars(cls)))
    parametrize.remove_parametrizations(module, name, leave_parametrized=leave_parametrized)
    order = module.__dict__.get(_ORDER)
    if order is not None:
        params = module._parameters
        for key in sorted(params, key=lambda key: order.index(key) if key in order else len(order)):
            params[key] = params.pop(key)  # to the end, in the noted order
        if not parametrize.is_parametrized(module):
            del module.__dict__[_ORDER]


def _check_no_formulation(targets: Iterable[TargetParam], call: str) -> None:
    """Refuses targets that carry a formulation: a parametrization of its own, or one not finalized.

    Raises:
        ValueError: Naming the target, the formulation and ``call``.
    """
    for target in targets:
        foreign = foreign_parametrization(target)
        if foreign is not None:
            raise ValueError(
                f"{target.name} still carries a {foreign} parametrization: call the formulation's finalize() "
                f"before {call}"
            )
        owner = attached_formulation(target)
        if owner is not None:  # slr/admm: no parametrization, but gradient hooks that would stay
            raise ValueError(
                f"{target.name} carries a {owner!r} formulation that was not finalized (its masks or gradient hooks "
                f"would stay on the model): call its finalize() before {call}"
            )


def remove_masks(targets: Iterable[TargetParam]) -> None:
    """Ends masked training: writes each target's masked value (exact zeros outside its :class:`Mask`)
    into its stored parameter and removes the parametrization, leaving a plain ``nn.Parameter``.

    Raises:
        ValueError: If a target carries a parametrization that is not a :class:`Mask` (a
            formulation's gates: call the formulation's ``finalize()`` first, which bakes them), or a
            formulation that was not finalized (its gradient hooks would stay).
    """
    targets = list(targets)
    _check_no_formulation(targets, "remove_masks() / hard_prune()")
    for target in targets:
        if parametrize.is_parametrized(target.module, target.param_name):
            remove_parametrization(target.module, target.param_name, leave_parametrized=True)


@torch.no_grad()
def hard_prune(targets: Iterable[TargetParam], masks: Mapping[str, torch.Tensor], *, allow_empty: bool = False) -> None:
    """Writes exact zeros outside ``masks`` and leaves plain (un-parametrized) weights.

    Args:
        targets: What :meth:`~constrainedsparse.Targets.resolve` returned.
        masks: Boolean masks by target name (what a formulation's ``hard_masks()`` returns).
        allow_empty: Accept a mask that keeps no weight of its tensor (the layer is cut from the model).

    Raises:
        ValueError: If a target still carries a formulation's parametrization (call ``finalize()``
            first), a mask names no target, a mask's shape differs from its tensor's, or a mask keeps
            nothing (unless ``allow_empty``). Nothing is changed then.
    """
    targets = resolved_targets(targets, "hard_prune(targets, masks): ")
    check_masks(targets, masks)
    if not allow_empty:
        _check_keeps_weights(masks, "hard_prune(targets, masks)", "the layer would be cut from the model")
    remove_masks(targets)
    for target in targets:
        if target.name in masks:
            weight = getattr(target.module, target.param_name)
            weight.masked_fill_(~masks[target.name].to(weight.device), 0.0)  # 0, also where it held inf or NaN


def _check_keeps_weights(masks: Mapping[str, torch.Tensor], call: str, why: str) -> None:
    """Raises ``ValueError`` naming every mask that keeps no weight (``why``: what that would do)."""
    emptied = empty_layers(masks)
    if emptied:
        raise ValueError(
            f"{call}: the mask of {', '.join(emptied)} keeps no weight ({why}); pass allow_empty=True to accept that"
        )


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
                stored = target.stored
                saved.append((stored, stored.detach().clone()))
                stored.masked_fill_(~masks[target.name].to(stored.device), 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for stored, value in saved:
                stored.copy_(value)


@torch.no_grad()
def layer_sparsity(targets: Iterable[TargetParam]) -> dict[str, float]:
    """Fraction of exact zeros in every targeted tensor (as the model computes it).

    Raises:
        ValueError: If ``targets`` is not what :meth:`Targets.resolve` returns.
    """
    targets = resolved_targets(targets, "layer_sparsity(targets): ")
    return {t.name: 1.0 - int(torch.count_nonzero(t.tensor)) / t.tensor.numel() for t in targets}


@torch.no_grad()
def achieved_sparsity(targets: Iterable[TargetParam]) -> float:
    """Fraction of exact zeros over all targeted weights together.

    Raises:
        ValueError: If ``targets`` is not what :meth:`Targets.resolve` returns.
    """
    targets = resolved_targets(targets, "achieved_sparsity(targets): ")
    zeros = total = 0
    for t in targets:
        zeros += t.tensor.numel() - int(torch.count_nonzero(t.tensor))
        total += t.tensor.numel()
    return zeros / total if total else 0.0
