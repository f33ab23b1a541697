"""``--set KEY=VALUE`` handling shared by the training engine and the layer-wise runner, and the training
runner's own keys (:class:`TrainingSettings`; the layer-wise driver's are in ``layerwise/settings.py``)."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from constrainedsparse.config import Bounds, DeviceName, Hyperparameters, hyperparameter
from constrainedsparse.errors import UserInputError
from constrainedsparse.sets import check_sparsity, parse_pattern, pattern_class
from constrainedsparse.targets import SparsityConfig

__all__ = [
    "TrainingSettings",
    "check_keeps_weights",
    "config_field_types",
    "parse_value",
    "resolve_device",
    "route_settings",
    "target_from_flags",
]


@dataclasses.dataclass
class TrainingSettings(Hyperparameters):
    """The training runner's own ``--set`` keys (defaults from the problem).

    Attributes:
        lr: Learning rate of the primal Adam (dense pre-training, pruning, retraining).
        dual_lr: Gradient-ascent step of the user constraints' multipliers.
        batch_size: Minibatch size (the global batch under several processes).
        log_every: Log the training loss and dual dynamics every this many steps.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        allow_empty_layers: Let a hard prune leave a targeted tensor without any weight.
        batchnorm_batches: Training batches over which BatchNorm statistics are re-estimated after
            the hard prune (:func:`~constrainedsparse.postprune.batchnorm_stage`).
    """

    error_prefix: ClassVar[str] = "--set "
    lr: float = hyperparameter(1e-3, "learning rate of the primal Adam", Bounds(low=0, low_inclusive=False))
    dual_lr: float = hyperparameter(
        1e-2,
        "gradient-ascent step of the user constraints' multipliers (a constraint's own dual_lr overrides it)",
        Bounds(low=0, low_inclusive=False),
    )
    batch_size: int = hyperparameter(64, "minibatch size (the global batch under several processes)", Bounds(low=1))
    log_every: int = hyperparameter(10, "log the loss and dual dynamics every this many steps", Bounds(low=1))
    device: str = hyperparameter("cpu", "where the run trains (auto: CUDA when available)", DeviceName())
    allow_empty_layers: bool = hyperparameter(
        False, "let a hard prune leave a targeted tensor without any weight (stops the run otherwise)"
    )
    batchnorm_batches: int = hyperparameter(
        0,
        "after the hard prune, re-estimate BatchNorm running statistics over this many training batches "
        "(models with BatchNorm only; 0 keeps those of training)",
        Bounds(low=0),
    )


def parse_value(key: str, text: str, kind: type) -> Any:
    """Converts the text of ``--set key=text`` to ``kind`` (a bool takes true/false/1/0/yes/no).

    Raises:
        ValueError: Naming the key and the expected type.
    """
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--set {key}={text!r} must be a bool (true/false)")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--set {key}={text!r} must be {'an' if kind is int else 'a'} {kind.__name__}") from None


def config_field_types(config_cls: type) -> dict[str, type]:
    """``{key: type}`` of a hyperparameter dataclass (flat keys of nested groups; annotations resolved)."""
    if issubclass(config_cls, Hyperparameters):
        return config_cls.field_types()
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def resolve_device(name: str | torch.device, key: str = "--set device") -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available), or a ``torch.device`` of them -> a usable
    device string.

    ``key`` names the setting in messages (``device`` for a Python keyword).
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if isinstance(name, str) and (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={name} but CUDA is not available here; use cpu or auto")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{key}={name}: only {torch.cuda.device_count()} CUDA device(s)")
        return name
    raise ValueError(f"{key} must be cpu, cuda, cuda:N or auto, got {name!r}")


def route_settings(
    settings: Mapping[str, str], groups: Mapping[str, Mapping[str, type]], where: str
) -> dict[str, dict[str, Any]]:
    """Parses every ``--set key=text`` into the first group (in order) that declares ``key``.

    Args:
        settings: ``{key: text}`` from the command line.
        groups: ``{group: {key: type}}`` in priority order (e.g. formulation, problem options, training).
        where: Context for the error message (``"for formulation 'slr' and problem 'digits-mlp'"``).

    Returns:
        ``{group: {key: value}}`` with only the keys that were given (every group present).

    Raises:
        ValueError: For an unknown key (listing every allowed one), a value of the wrong type, or a
            problem option (group ``options``) named like a key of another group.
    """
    for key in groups.get("options", {}):  # a problem's own option named like a runner's or formulation's key
        other = next((g for g, types in groups.items() if g != "options" and key in types), None)
        if other is not None:
            raise ValueError(
                f"the problem's option {key!r} has the name of a {other} --set key {where}, so --set {key}=... "
                "would set only one of them: rename the option"
            )
    routed: dict[str, dict[str, Any]] = {group: {} for group in groups}
    for key, text in settings.items():
        group = next((g for g, types in groups.items() if key in types), None)
        if group is None:
            allowed = sorted({k for types in groups.values() for k in types})
            raise ValueError(f"unknown --set key {key!r} {where}; allowed: {', '.join(allowed)}")
        routed[group][key] = parse_value(key, text, groups[group][key])
    return routed


def target_from_flags(
    sparsity: float | None,
    pattern: str | None,
    default_sparsity: float,
    unstructured_pattern: str = "unstructured",
    keywords: bool = False,
) -> SparsityConfig:
    """The run's :class:`SparsityConfig` from ``--sparsity`` / ``--pattern`` (both runners use it).

    Args:
        sparsity: ``--sparsity`` (``None``: not given).
        pattern: ``--pattern`` (``None``: not given): any registered pattern text (``2:4``, ``row``,
            ``structured:columns``, ``block:4x4``, ...).
        default_sparsity: Level used when ``--sparsity`` is not given (and the pattern needs one).
        unstructured_pattern: Pattern of a ``--sparsity`` target without ``--pattern``
            (``unstructured``, or ``row`` for the layer-wise driver's default mask scope).
        keywords: Messages name the Python keywords ``sparsity``/``pattern`` instead of the flags.

    Raises:
        ValueError: If the level is outside [0, 1), the pattern text is unknown or malformed, or
            ``--sparsity`` is given with a pattern that fixes its own level (N:M).
    """
    if pattern is not None:
        kind, _ = parse_pattern(pattern)
        if pattern_class(kind).fixed_level:
            if sparsity is not None:
                if keywords:
                    raise ValueError(f"pattern={pattern!r} fixes its own level: give sparsity or pattern, not both")
                raise ValueError(
                    f"argument --pattern: not allowed with argument --sparsity (the pattern {pattern} fixes its own "
                    "level)"
                )
            return SparsityConfig.parse(pattern)
    level = check_sparsity(default_sparsity if sparsity is None else sparsity, "sparsity" if keywords else "--sparsity")
    if pattern is not None:
        return SparsityConfig.parse(pattern, level)
    return SparsityConfig(sparsity=level, pattern=unstructured_pattern)


def check_keeps_weights(
    sets: Mapping[str, tuple[Any, Any]],
    target: SparsityConfig,
    level_name: str = "--sparsity",
    allow: str = "set --set allow_empty_layers=true to cut such layers on purpose",
) -> None:
    """Every targeted tensor keeps at least one weight at the target level (both runners check it).

    Args:
        sets: ``{name: (feasible set, shape)}`` of the targeted tensors.
        target: The level of these tensors, named in the message.
        level_name: What set that level, named in the message.
        allow: The other way out, named in the message (the CLI's setting that accepts it).

    Raises:
        UserInputError: Naming the first tensor the level would empty and the way to allow it.
    """
    for name, (feasible, shape) in sets.items():
        if math.prod(shape) == 0:
            raise UserInputError(
                f"{name} has no weights (shape {tuple(shape)}): the model has a layer of width 0 (check the "
                "options that size it)"
            )
        if not feasible.keeps_any(shape):
            raise UserInputError(
                f"{level_name} {target.sparsity!r} keeps no weight of {name} ({math.prod(shape)} weights): lower it, "
                f"or {allow}"
            )
