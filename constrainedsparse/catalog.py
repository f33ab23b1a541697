"""What is registered and every hyperparameter of it: :func:`describe` (``constrainedsparse formulations NAME``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import constrainedsparse.formulations  # noqa: F401  (registers the built-in formulations)
import constrainedsparse.layerwise  # noqa: F401  (registers the built-in layer-wise solvers)
from constrainedsparse.config import HyperparameterInfo, Hyperparameters, describe_table
from constrainedsparse.registry import KINDS, REGISTRY

__all__ = ["Description", "config_keys", "describe"]


@dataclasses.dataclass
class Description:
    """What :func:`describe` returns: the entry's kind, one line, and its hyperparameters by key.

    ``"rho" in describe("slr")`` and ``describe("slr")["rho"].default`` work; ``print`` shows a table.
    """

    name: str
    kind: str
    summary: str
    hyperparameters: dict[str, HyperparameterInfo]
    also: list[str] = dataclasses.field(default_factory=list)

    def __contains__(self, key: object) -> bool:
        return key in self.hyperparameters

    def __getitem__(self, key: str) -> HyperparameterInfo:
        return self.hyperparameters[key]

    def __iter__(self):
        return iter(self.hyperparameters)

    def __len__(self) -> int:
        return len(self.hyperparameters)

    def __str__(self) -> str:
        head = f"{self.name} ({KINDS[self.kind]}): {self.summary}"
        lines = [head, "hyperparameters (--set KEY=VALUE, or keywords of make / prune_layerwise):"]
        lines.append(describe_table(list(self.hyperparameters.values())))
        lines.extend(f"also a {KINDS[kind]}: describe({self.name!r}, kind={kind!r})" for kind in self.also)
        return "\n".join(lines)


def config_keys(config_cls: Any) -> dict[str, HyperparameterInfo]:
    """The declared keys of a Config class (none for a class that is not :class:`Hyperparameters`)."""
    if isinstance(config_cls, type) and issubclass(config_cls, Hyperparameters):
        return config_cls.keys()
    return {}


def describe(name: str, kind: str | None = None) -> Description:
    """Every hyperparameter of a formulation or layer-wise solver: type, default, allowed values, meaning.

    Args:
        name: A registered name (``"slr"``, ``"fw"``, ...).
        kind: ``"training"`` or ``"layerwise"``; needed only to pick the layer-wise entry of a name
            registered under both kinds (``magnitude``; the training one is the default).

    Raises:
        ValueError: If no entry has this name (listing that kind's names, or every name without ``kind``), or none
            of ``kind`` (listing that kind's).
    """
    kinds = REGISTRY.kinds_of(name)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not kinds:  # the names of the kind asked for (a problem's --set help), else every name
        names = REGISTRY.names(kind) if kind is not None else sorted({n for k in KINDS for n in REGISTRY.names(k)})
        raise ValueError(f"unknown formulation {name!r}; available: {', '.join(names)}")
    if kind is not None and kind not in kinds:
        raise ValueError(
            f"{name!r} is a {KINDS[kinds[0]]}, not a {KINDS[kind]}; {KINDS[kind]}s: {', '.join(REGISTRY.names(kind))}"
        )
    chosen = kind or kinds[0]
    cls = REGISTRY.get(chosen, name)
    return Description(name, chosen, cls.description, config_keys(cls.Config), [k for k in kinds if k != chosen])
