r"""Targets: *which* parameters are pruned, to *what* level, with *which* pattern.

A :class:`Targets` object is the "where" (module types, ``filter_fn(module, fqn)``, include /
exclude name patterns, per-parameter overrides); a :class:`SparsityConfig` is the "what"
(a sparsity fraction or N:M pattern). :meth:`Targets.resolve` binds both to a model and returns
one :class:`TargetParam` per pruned tensor, each carrying its :mod:`~constrainedsparse.sets`
feasible set. Everything is validated up front with precise ``ValueError``\ s.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse.sets import (
    FeasibleSet,
    NMSparse,
    RowTopK,
    StructuredGroups,
    TopK,
    keep_count,
    parse_nm,
)

__all__ = ["PATTERNS", "SparsityConfig", "TargetParam", "Targets", "DEFAULT_MODULE_TYPES"]

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PATTERNS = ("unstructured", "row", "nm", "structured")

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class SparsityConfig:
    """What to reach: a sparsity fraction (with a pattern) or an N:M pattern.

    Args:
        sparsity: Fraction of zeros in ``[0, 1)``; ignored (derived) for ``nm``.
        pattern: ``"unstructured"`` (top-k per tensor), ``"row"`` (top-k per output row),
            ``"structured"`` (whole output rows/channels), or ``"nm"``.
        nm: ``(n, m)`` for the N:M pattern (at most n nonzeros in every m inputs).
    """

    sparsity: float = 0.0
    pattern: str = "unstructured"
    nm: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.pattern == "nm":
            if self.nm is None:
                raise ValueError("pattern 'nm' needs nm=(n, m)")
            object.__setattr__(self, "sparsity", 1.0 - self.nm[0] / self.nm[1])
        elif (
            not isinstance(self.sparsity, (int, float)) or not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity)
        ):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @classmethod
    def from_pattern(cls, text: str) -> SparsityConfig:
        """Builds an N:M config from text such as ``"2:4"``."""
        return cls(pattern="nm", nm=parse_nm(text))

    def describe(self) -> str:
        """Short human label, e.g. ``'0.9'`` or ``'2:4'``."""
        return f"{self.nm[0]}:{self.nm[1]}" if self.pattern == "nm" else f"{self.sparsity:g}"

    def feasible_set(self, shape: Sequence[int]) -> FeasibleSet:
        """The pattern's feasible set for a tensor of this shape at this level.

        Raises:
            ValueError: If the shape does not fit the pattern (e.g. N:M on a width not divisible by M).
        """
        feasible = _make_set(self.pattern, torch.Size(shape), self.sparsity, self.nm)
        if isinstance(feasible, NMSparse):
            feasible.check_shape(shape)
        return feasible


@dataclass
class TargetParam:
    """One pruned tensor: its module, names and feasible set at the target level."""

    name: str
    module_name: str
    param_name: str
    module: nn.Module
    sparsity: float
    feasible_set: FeasibleSet

    @property
    def tensor(self) -> torch.Tensor:
        """The current (possibly parametrized) tensor."""
        return getattr(self.module, self.param_name)

    @property
    def stored(self) -> torch.nn.Parameter:
        """The stored parameter (under a parametrization: its ``original``), what an optimizer updates."""
        if parametrize.is_parametrized(self.module, self.param_name):
            return self.module.parametrizations[self.param_name].original
        return getattr(self.module, self.param_name)

    def set_at(self, sparsity: float) -> FeasibleSet:
        """The same pattern at another sparsity level (used by schedules)."""
        return _make_set(self.feasible_set, self.tensor.shape, sparsity)


def _make_set(like: FeasibleSet | str, shape: torch.Size, sparsity: float, nm=None) -> FeasibleSet:
    kind = like if isinstance(like, str) else type(like).__name__
    numel = math.prod(shape)
    if kind in ("unstructured", "TopK"):
        return TopK(keep_count(numel, sparsity))
    if kind in ("row", "RowTopK"):
        return RowTopK(keep_count(numel // shape[0], sparsity))
    if kind in ("structured", "StructuredGroups"):
        return StructuredGroups(keep_count(shape[0], sparsity), dim=0)
    if kind == "nm":
        return NMSparse(*nm)
    if kind == "NMSparse":
        return like
    raise ValueError(f"unknown pattern {kind!r}")


@dataclass
class Targets:
    """Where to prune: which modules/parameters are targeted and per-parameter overrides.

    Args:
        module_types: Module classes whose parameters are targeted (Linear and Conv by default).
        param_names: Parameter names on those modules (``weight`` by default).
        filter_fn: Optional ``filter_fn(module, fqn) -> bool``; only modules where it is true.
        include: Glob patterns on the parameter's full name (``fc1.weight``); if given, a
            parameter must match at least one.
        exclude: Glob patterns; a matching parameter is never pruned.
        overrides: ``{glob: sparsity}`` per-parameter sparsity levels (first match wins).
    """

    module_types: tuple[type[nn.Module], ...] = DEFAULT_MODULE_TYPES
    param_names: tuple[str, ...] = ("weight",)
    filter_fn: FilterFn | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.module_types:
            raise ValueError("module_types must name at least one module class")
        for pattern, level in self.overrides.items():
            if not isinstance(level, (int, float)) or not 0.0 <= level < 1.0:
                raise ValueError(f"override {pattern!r} must be a sparsity in [0, 1), got {level!r}")

    def select(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        """``(module_fqn, param_name, module)`` for every targeted parameter, in model order."""
        chosen = []
        for fqn, module in model.named_modules():
            if not isinstance(module, self.module_types):
                continue
            if self.filter_fn is not None and not self.filter_fn(module, fqn):
                continue
            for param_name in self.param_names:
                if getattr(module, param_name, None) is None:
                    continue
                full = f"{fqn}.{param_name}" if fqn else param_name
                if self.include and not any(fnmatch.fnmatchcase(full, p) for p in self.include):
                    continue
                if any(fnmatch.fnmatchcase(full, p) for p in self.exclude):
                    continue
                chosen.append((fqn, param_name, module))
        return chosen

    def resolve(self, model: nn.Module, config: SparsityConfig) -> list[TargetParam]:
        """Binds the targets to ``model`` at the level of ``config``.

        Raises:
            ValueError: If nothing is selected, or a pattern does not fit a tensor (e.g. N:M on a
                width not divisible by M).
        """
        selected = self.select(model)
        if not selected:
            raise ValueError(
                "the target filter selects no parameters (module types "
                f"{', '.join(t.__name__ for t in self.module_types)}, include={list(self.include)}, "
                f"exclude={list(self.exclude)})"
            )
        resolved = []
        for fqn, param_name, module in selected:
            full = f"{fqn}.{param_name}" if fqn else param_name
            shape = getattr(module, param_name).shape
            sparsity = config.sparsity
            for pattern, level in self.overrides.items():
                if fnmatch.fnmatchcase(full, pattern):
                    sparsity = float(level)
                    break
            if config.pattern == "nm":
                feasible = NMSparse(*config.nm)
                try:
                    feasible.check_shape(shape)
                except ValueError as err:
                    raise ValueError(f"{full}: {err}") from None
            else:
                feasible = _make_set(config.pattern, shape, sparsity)
            resolved.append(TargetParam(full, fqn, param_name, module, sparsity, feasible))
        return resolved
