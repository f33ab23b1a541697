"""The formulation registry: :func:`register_formulation` adds a class under a name, :func:`make`
builds the one a name picks on a :class:`~constrainedsparse.SparsityProblem`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import torch

from constrainedsparse.formulations.base import Formulation
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.registry import REGISTRY

if TYPE_CHECKING:  # the built-ins import this module to register themselves
    from constrainedsparse.formulations.admm import ADMM
    from constrainedsparse.formulations.l0.constrained import L0
    from constrainedsparse.formulations.l0.gated import L0Penalty
    from constrainedsparse.formulations.magnitude import Magnitude
    from constrainedsparse.formulations.slr import SLR

__all__ = ["available_formulations", "describe_formulations", "formulation_class", "make", "register_formulation"]


_FormulationClass = TypeVar("_FormulationClass", bound=type[Formulation])


def register_formulation(name: str) -> Callable[[_FormulationClass], _FormulationClass]:
    """Class decorator adding a training formulation to the registry under ``name``.

    Returns:
        The decorator; it returns the class itself (its type kept for type checkers).

    Raises:
        ValueError: If ``name`` is already registered.
    """
    register = REGISTRY.register("training", name, Formulation)

    def decorate(cls: _FormulationClass) -> _FormulationClass:
        register(cls)
        return cls

    return decorate


def available_formulations() -> list[str]:
    """Registered training formulation names, sorted."""
    return REGISTRY.names("training")


def describe_formulations() -> dict[str, str]:
    """``{name: one-line description}``."""
    return REGISTRY.describe("training")


def formulation_class(name: str) -> type[Formulation]:
    """The training formulation registered as ``name``.

    Raises:
        ValueError: For an unknown name, listing the known ones.
    """
    return REGISTRY.get("training", name)


# The overloads tell type checkers each built-in's class (make("slr", ...) is an SLR); a new parameter of make()
# goes into every one of them and into the implementation below.
@overload
def make(
    name: Literal["slr"],
    problem: SparsityProblem,
    config: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    dual_lr: float = 1e-2,
    **hyperparameters: Any,
) -> SLR: ...


@overload
def make(
    name: Literal["admm"],
    problem: SparsityProblem,
    config: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    dual_lr: float = 1e-2,
    **hyperparameters: Any,
) -> ADMM: ...


@overload
def make(
    name: Literal["l0"],
    problem: SparsityProblem,
    config: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    dual_lr: float = 1e-2,
    **hyperparameters: Any,
) -> L0: ...


@overload
def make(
    name: Literal["l0-penalty"],
    problem: SparsityProblem,
    config: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    dual_lr: float = 1e-2,
    **hyperparameters: Any,
) -> L0Penalty: ...


@overload
def make(
    name: Literal["magnitude"],
    problem: SparsityProblem,
    config: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    dual_lr: float = 1e-2,
    **hyperparameters: Any,
) -> Magnitude: ...


@overload
def make(
    name: str,
    problem: SparsityProblem,
    config: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    dual_lr: float = 1e-2,
    **hyperparameters: Any,
) -> Formulation: ...


def make(
    name: str,
    problem: SparsityProblem,
    config: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    dual_lr: float = 1e-2,
    **hyperparameters: Any,
) -> Formulation:
    """Builds the formulation ``name`` on ``problem``.

    Args:
        name: A registered training formulation (``slr``, ``admm``, ``l0``, ``l0-penalty``, ``magnitude``).
        problem: The :class:`SparsityProblem`.
        config: Optional: an instance of the formulation's ``Config`` (or a mapping of hyperparameters).
        optimizer: The user's primal optimizer (``None``: ``Adam(lr)``), see :class:`Formulation`.
        lr: Learning rate of the default Adam.
        dual_lr: Gradient-ascent step of the user constraints' multipliers.
        **hyperparameters: The formulation's hyperparameters by key (``rho=0.05, interval=20``);
            :func:`constrainedsparse.describe` lists them.

    Returns:
        The formulation, an instance of the class registered as ``name`` (for a built-in name, type
        checkers know its class: ``make("slr", ...)`` is an :class:`~constrainedsparse.formulations.slr.SLR`).

    Raises:
        ValueError: For an unknown name, an unknown key (listing the allowed ones), or a value of
            the wrong type or range.
    """
    cls = formulation_class(name)
    if not isinstance(problem, SparsityProblem):
        raise ValueError(f"problem must be a SparsityProblem, got {type(problem).__name__}")
    if isinstance(config, Mapping):
        hyperparameters = {**config, **hyperparameters}
        config = None
    if config is not None and hyperparameters:
        raise ValueError("give either a config object or hyperparameters as keywords, not both")
    if config is None:
        config = cls.Config.from_values(hyperparameters, where=f" for formulation {name!r}")
    return cls(problem, config, optimizer=optimizer, lr=lr, dual_lr=dual_lr)
