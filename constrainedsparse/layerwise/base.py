r"""Layer-wise pruning: one linear layer at a time, from its calibration Gram matrix.

A layer with weight :math:`W \in \mathbb{R}^{d_{out} \times d_{in}}` and calibration inputs
:math:`X \in \mathbb{R}^{d_{in} \times n}` (one column per token) is pruned by choosing a mask
:math:`M` in the target pattern (and, for some solvers, new kept weights :math:`\hat W`) to make
the reconstruction error small:

.. math::

    E(\hat W) = \|W X - \hat W X\|_F^2 = \operatorname{tr}\big((W - \hat W)\, G\, (W - \hat W)^\top\big),
    \qquad G = X X^\top .

Everything a solver needs is therefore :math:`W` and :math:`G` (memory :math:`O(d_{in}^2)`; the
driver never holds all activations). A :class:`LayerwiseSolver` maps a :class:`LayerProblem` to a
:class:`LayerResult`; solvers are picked by name from a registry, like training formulations.
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from constrainedsparse.config import Hyperparameters, check_config
from constrainedsparse.errors import UserInputError, is_ours, plugin_code, user_stacklevel
from constrainedsparse.registry import REGISTRY
from constrainedsparse.sets import FeasibleSet
from constrainedsparse.sets.base import set_text
from constrainedsparse.targets import SparsityConfig

__all__ = [
    "LayerProblem",
    "LayerResult",
    "LayerwiseSolver",
    "available_solvers",
    "below_per_row",
    "check_result",
    "check_solver",
    "describe_solvers",
    "register_solver",
    "solve",
    "solver_class",
    "wanda_scores",
]


@dataclasses.dataclass
class LayerProblem:
    r"""One layer to prune.

    Args:
        name: The weight's full name in the model (``encoder.layer.0.attention.self.query.weight``).
        weight: Dense weight :math:`W`, shape ``(d_out, d_in)``, float32 (the solver must not modify it).
        gram: :math:`G = \sum_t x_t x_t^\top` over the calibration tokens, shape ``(d_in, d_in)``,
            float32 or float64, symmetric positive semi-definite.
        target: Sparsity level and pattern (``row``: per output row, ``unstructured``: per layer,
            ``nm``: N:M along the input dimension).
        tokens: Number of calibration tokens summed into ``gram``.
    """

    name: str
    weight: torch.Tensor
    gram: torch.Tensor
    target: SparsityConfig
    tokens: int = 0

    def checked_shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight.

        Raises:
            ValueError: If the weight is not 2-D or the Gram matrix is not ``(d_in, d_in)``.
        """
        if self.weight.dim() != 2:
            raise ValueError(f"{self.name}: layer-wise solvers need a 2-D weight, got shape {tuple(self.weight.shape)}")
        d_out, d_in = self.weight.shape
        if tuple(self.gram.shape) != (d_in, d_in):
            raise ValueError(
                f"{self.name}: the Gram matrix must have shape ({d_in}, {d_in}) for a weight of shape "
                f"({d_out}, {d_in}), got {tuple(self.gram.shape)}"
            )
        return d_out, d_in

    def feasible_set(self, shape: Sequence[int] | None = None) -> FeasibleSet:
        """The target pattern's feasible set for the weight (or for a block of columns of ``shape``)."""
        return self.target.feasible_set(self.weight.shape if shape is None else shape)

    def error(self, weight_hat: torch.Tensor) -> float:
        r"""Reconstruction error :math:`\operatorname{tr}(D G D^\top)` with :math:`D = W - \hat W`, a sum of squares:
        at least 0 (a rank-deficient :math:`G` in float32 can round it to a tiny negative number, reported as 0)."""
        diff = (self.weight - weight_hat).to(self.gram.dtype)
        return max(float(((diff @ self.gram) * diff).sum()), 0.0)

    def relative_error(self, weight_hat: torch.Tensor) -> float:
        r""":math:`\|(W - \hat W)X\|_F^2 / \|W X\|_F^2` (0 for a layer whose output is all zero)."""
        dense = self.error(torch.zeros_like(self.weight))
        return self.error(weight_hat) / dense if dense > 0 else 0.0


@dataclasses.dataclass
class LayerResult:
    """What a solver returns for one layer.

    Args:
        weight: The pruned weight :math:`\\hat W` (zero outside ``mask``), shape and dtype of the input.
        mask: Boolean support, satisfying the layer's feasible set.
        metrics: Scalars worth logging once per layer (e.g. ``fw/iterations``, ``fw/gap``).
        trace: Sampled per-iteration scalars of iterative solvers (e.g. objective and duality gap).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    trace: list[dict[str, float]] = dataclasses.field(default_factory=list)


def solve(solver: LayerwiseSolver, layer: LayerProblem) -> LayerResult:
    """``solver.prune(layer)``, its answer checked (:func:`check_result`).

    A solver defined outside this package (the user's, e.g. registered in a problem file) that raises is
    reported as one :class:`UserInputError` line naming it and the layer (``--debug``: its own traceback);
    a built-in solver's exception is a bug of ours and keeps its traceback.
    """
    yours = not is_ours(type(solver))
    before = layer.weight.clone() if yours else None  # the contract says W is read only: a user's solver is checked
    with plugin_code(type(solver), f"layer-wise solver {solver.name!r} on {layer.name}"):
        result = solver.prune(layer)
    if before is not None and not torch.allclose(before, layer.weight, rtol=0, atol=0, equal_nan=True):
        raise UserInputError(
            f"layer-wise solver {solver.name!r} on {layer.name}: prune() modified layer.weight in place (it is read "
            "only: the layer's error is measured against it); work on a copy, layer.weight.clone()"
        )
    check_result(solver.name, layer, result)
    return result


def check_result(solver: str, layer: LayerProblem, result: Any) -> None:
    """What the driver checks of every solver's answer before writing it into the model (a solver of the
    user's may break the contract of :class:`LayerResult`).

    Raises:
        UserInputError: (a ``ValueError``) One line naming the solver and the layer: not a ``LayerResult``,
            a mask that is not a boolean tensor of the weight's shape, a weight of another shape,
            non-finite kept weights, or a mask outside the layer's pattern.
    """
    where = f"layer-wise solver {solver!r} on {layer.name}"
    if not isinstance(result, LayerResult):
        raise UserInputError(f"{where}: prune() must return a LayerResult, got {type(result).__name__}")
    shape = tuple(layer.weight.shape)
    mask, weight = result.mask, result.weight
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise UserInputError(f"{where}: the mask must be a torch.bool tensor of the weight's shape {shape}, got {got}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape or not weight.is_floating_point():
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise UserInputError(f"{where}: the weight must be a floating-point tensor of the shape {shape}, got {got}")
    if not bool(torch.isfinite(weight[mask]).all()):
        raise UserInputError(f"{where}: kept weights must be finite (some are inf or nan)")
    result.metrics = _scalars(where, "metrics", result.metrics)
    if not isinstance(result.trace, list):
        raise UserInputError(f"{where}: trace must be a list of dicts of numbers, got {type(result.trace).__name__}")
    result.trace = [_scalars(where, f"trace[{i}]", entry) for i, entry in enumerate(result.trace)]
    feasible = layer.feasible_set()
    if not feasible.contains(mask):
        pattern = layer.target.describe()
        raise UserInputError(f"{where}: the mask is outside the layer's pattern {pattern} ({set_text(feasible)})")


def check_solver(solver: LayerwiseSolver, target: SparsityConfig) -> None:
    """``solver.check_target(target)``, then a warning naming every hyperparameter set away from its default that
    does nothing at ``target``'s pattern (:meth:`LayerwiseSolver.idle_settings`)."""
    solver.check_target(target)
    idle = solver.idle_settings(target)
    if idle:
        values = solver.config.values()
        warnings.warn(
            f"{solver.name}: at the {target.pattern_text()} pattern, "
            + "; ".join(f"{key}={values[key]} has no effect ({why})" for key, why in idle.items()),
            UserWarning,
            stacklevel=user_stacklevel(),  # the caller of prune_layerwise (the CLI's entry in a run)
        )


def _scalars(where: str, what: str, values: Any) -> dict[str, float]:
    """``values`` as names to floats (a NumPy scalar or a 0-d tensor is converted), what the report and
    summary.json write.

    Raises:
        UserInputError: For anything else (a multi-element tensor, a string, a key that is not a string).
    """
    if not isinstance(values, dict):
        raise UserInputError(f"{where}: {what} must be a dict of names to numbers, got {type(values).__name__}")
    converted = {}
    for key, value in values.items():
        try:
            number = None if isinstance(value, (str, bytes)) else float(value)
        except (TypeError, ValueError, RuntimeError):
            number = None
        if not isinstance(key, str) or number is None:
            raise UserInputError(
                f"{where}: {what} must map names to numbers (float(t) of a tensor t), got {key!r}: "
                f"{type(value).__name__}"
            )
        converted[key] = number
    return converted


@dataclasses.dataclass
class NoSolverConfig(Hyperparameters):
    """Hyperparameters of a solver that has none."""


class LayerwiseSolver(abc.ABC):
    """How one layer's mask (and kept weights) are chosen from :math:`W` and :math:`G`.

    Attributes:
        name: Registry name (``--formulation``).
        description: One line for ``constrainedsparse formulations``.
        Config: Dataclass of hyperparameters (``--set``), validated by its ``validate()``.
        supported_patterns: The patterns it prunes to (``None``: all; checked before any model loads).
        config: The solver's hyperparameters, an instance of its ``Config`` (typed ``Any`` so that a subclass
            reads its own fields, ``self.config.p``; a subclass may narrow it: ``config: WandaPConfig``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[Hyperparameters]] = NoSolverConfig
    config: Any
    supported_patterns: ClassVar[tuple[str, ...] | None] = None
    """Pattern texts the solver handles (``"N:M"`` for any N:M, a kind such as ``"block"`` for every size
    of it); ``None``: every pattern."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """An unregistered solver class (an instance handed to ``prune_layerwise``) is named after its class;
        :func:`register_solver` replaces the name by the registered one."""
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls):  # not the registered name of a class it subclasses
            cls.name = cls.__name__

    @classmethod
    def check_target(cls, target: SparsityConfig) -> None:
        """Raises ``ValueError`` if the solver cannot prune to ``target``'s pattern (named in the message)."""
        supported = cls.supported_patterns
        if supported is None:
            return
        text = target.pattern_text()
        # A pattern text (row, 2:4), "N:M" for any N:M, or a pattern's kind for every size of it (block).
        if not {text, target.pattern, *(("N:M",) if target.nm is not None else ())} & set(supported):
            raise ValueError(f"{cls.name} supports the {', '.join(supported)} patterns, got {text}")

    def idle_settings(self, target: SparsityConfig) -> dict[str, str]:
        """Hyperparameters set away from their defaults that do nothing at ``target``'s pattern, each with the
        reason (none by default)."""
        return {}

    def __init__(self, config: Any | None = None) -> None:
        config = self.Config() if config is None else config
        check_config(self.name, self.Config, config)
        config.validate()
        self.config = config

    @abc.abstractmethod
    def prune(self, layer: LayerProblem) -> LayerResult:
        """Prunes one layer to its target pattern."""

    def keeps_dense_weights(self) -> bool:
        """Whether every kept weight is the dense one (a mask-only solver); ``False`` unless a solver says so."""
        return False


def wanda_scores(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    r"""Wanda's importance :math:`S_{ij} = |W_{ij}| \cdot \|X_j\|_2` with :math:`\|X_j\|_2^2 = G_{jj}`."""
    return weight.abs() * gram.diagonal().clamp_min(0).sqrt().to(weight.dtype)


def below_per_row(feasible: FeasibleSet, rows: torch.Tensor, than: torch.Tensor) -> torch.Tensor:
    """Which rows should take the candidate whose per-row errors are ``rows`` over the one with ``than``.

    Row by row (``rows < than``) where the pattern constrains rows on their own
    (:attr:`~constrainedsparse.sets.FeasibleSet.rows_independent`); else one answer for every row, the
    layer's sums compared, so that a layer-wide count holds in whichever mask is kept.
    """
    if feasible.rows_independent:
        return rows < than
    return torch.full_like(rows, bool(rows.sum() < than.sum()), dtype=torch.bool)


_SolverClass = TypeVar("_SolverClass", bound=type[LayerwiseSolver])


def register_solver(name: str) -> Callable[[_SolverClass], _SolverClass]:
    """Class decorator adding a layer-wise solver to the registry under ``name``.

    Returns:
        The decorator; it returns the class itself (its type kept for type checkers).

    Raises:
        ValueError: If ``name`` is already registered, or the class breaks the contract (no description, a
            ``supported_patterns`` that is not a tuple of strings, ...).
    """
    register = REGISTRY.register("layerwise", name, LayerwiseSolver)

    def decorate(cls: _SolverClass) -> _SolverClass:
        _check_supported_patterns(name, cls)
        register(cls)
        return cls

    return decorate


def _check_supported_patterns(name: str, cls: type) -> None:
    """``supported_patterns`` is ``None`` or a non-empty tuple of pattern texts (``row``, ``2:4``, ``"N:M"`` for
    any N:M, a kind)."""
    supported = getattr(cls, "supported_patterns", None)
    if supported is None:
        return
    if isinstance(supported, str) or not isinstance(supported, (tuple, list)) or not supported:
        raise ValueError(
            f"layer-wise solver {name!r}: supported_patterns must be None or a non-empty tuple of pattern texts "
            f"(('unstructured', 'row', 'N:M')), got {supported!r}"
        )
    odd = [text for text in supported if not isinstance(text, str) or not text]
    if odd:  # the names are matched at run time (a pattern of yours may be registered after the solver)
        raise ValueError(f"layer-wise solver {name!r}: supported_patterns must hold pattern texts, got {odd[0]!r}")


def available_solvers() -> list[str]:
    """Registered layer-wise solver names, sorted."""
    return REGISTRY.names("layerwise")


def describe_solvers() -> dict[str, str]:
    """``{name: one-line description}`` of the layer-wise solvers."""
    return REGISTRY.describe("layerwise")


def solver_class(name: str) -> type[LayerwiseSolver]:
    """The layer-wise solver registered as ``name``.

    Raises:
        ValueError: If no solver has that name.
    """
    return REGISTRY.get("layerwise", name)
