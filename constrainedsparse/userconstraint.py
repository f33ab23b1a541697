r"""A constraint of the user's, next to the sparsity target: :class:`UserConstraint`.

.. math::
    g(W) \le 0 \quad\text{or}\quad h(W) = 0, \qquad
    \lambda \leftarrow \lambda + \eta\,\tilde g(W) \ \ (\text{then } \lambda \leftarrow \max(\lambda, 0) \text{ for }
    \le),

with :math:`g` the differentiable ``fn`` (it enters the primal Lagrangian :math:`f + \lambda^\top g`) and
:math:`\tilde g` what the multiplier's step reads: ``fn`` again, or the *proxy* measurement ``strict_fn``
(Cotter et al., 2019; Cooper's ``strict_violation``), which need not be differentiable (a count of nonzero
weights, an accuracy, a latency). :math:`\eta` is the formulation's ``dual_lr`` unless the constraint has a
``dual_lr`` of its own (constraints of different scales: a norm of order 1 beside a FLOPs budget of order
:math:`10^6`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import cooper
import torch
from torch import nn

from constrainedsparse.errors import UserInputError, is_number

__all__ = ["SENSES", "UserConstraint", "ViolationFn"]

ViolationFn = Callable[..., torch.Tensor]
SENSES = {"<=": cooper.ConstraintType.INEQUALITY, "==": cooper.ConstraintType.EQUALITY}


@dataclass(frozen=True)
class UserConstraint:
    """A constraint of the user's: ``fn(model)`` or ``fn(model, batch)`` ``<= 0`` or ``== 0``.

    Args:
        fn: Returns a tensor (any shape; every entry is one constraint) differentiable in the
            model's parameters. If it takes two arguments it receives the current batch.
        sense: ``"<="`` (inequality, multiplier kept >= 0) or ``"=="`` (equality).
        restarts: Dual restarts for an inequality: its multiplier is reset to 0 whenever the
            constraint holds (:class:`~constrainedsparse.multipliers.RestartingMultiplier`). Plain
            gradient ascent keeps pushing while the multiplier unwinds, so a budget that binds
            early overshoots (the model ends far inside it); restarts stop the push as soon as the
            budget holds, at the price of small oscillations around it.
        dual_lr: This constraint's multiplier step size (a finite number > 0); ``None`` (default): the
            formulation's ``dual_lr``.
        strict_fn: A *proxy constraint*: ``strict_fn(model)`` or ``strict_fn(model, batch)`` measures the
            constraint as it truly is (need not be differentiable; run under ``torch.no_grad()``), with as many
            entries as ``fn``. The multiplier's step, its restarts, the logged ``violation/<name>`` and the
            final report read it; ``fn`` stays the differentiable surrogate in the primal Lagrangian (logged as
            ``surrogate/<name>``). ``None`` (default): ``fn`` is both.

    Raises:
        ValueError: For a ``sense`` other than ``"<="`` and ``"=="``, a ``restarts`` that is not a bool,
            ``restarts=True`` on an equality, an ``fn`` or ``strict_fn`` that is not callable or takes neither
            ``(model)`` nor ``(model, batch)``, or a ``dual_lr`` that is not a finite number > 0.
    """

    fn: ViolationFn
    sense: Literal["<=", "=="] = "<="
    restarts: bool = False
    dual_lr: float | None = None
    strict_fn: ViolationFn | None = None
    _uses_batch: bool = field(init=False, repr=False, compare=False)
    _strict_uses_batch: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.sense, str) or self.sense not in SENSES:
            raise ValueError(f"constraint sense must be '<=' or '==', got {self.sense!r}")
        if not isinstance(self.restarts, bool):
            raise ValueError(f"restarts must be True or False, got {self.restarts!r}")
        if self.restarts and self.sense != "<=":
            raise ValueError("restarts apply to inequality constraints ('<='), not to an equality")
        if self.dual_lr is not None and (not is_number(self.dual_lr) or not 0 < self.dual_lr < math.inf):
            raise ValueError(f"constraint dual_lr must be a finite number > 0 (or None: the formulation's), "
                             f"got {self.dual_lr!r}")  # fmt: skip
        for key in ("fn", "strict_fn"):
            value = getattr(self, key)
            if not callable(value) and not (key == "strict_fn" and value is None):
                raise ValueError(f"constraint {key} must be callable, got {type(value).__name__}")
        # Read once: inspecting the signature at every step costs more than a small model's step.
        object.__setattr__(self, "_uses_batch", _takes_batch(self.fn, "fn"))
        strict = self.strict_fn is not None and _takes_batch(self.strict_fn, "strict_fn")
        object.__setattr__(self, "_strict_uses_batch", strict)

    @property
    def uses_batch(self) -> bool:
        """Whether ``fn`` (or ``strict_fn``) takes the batch as its second argument."""
        return self._uses_batch or self._strict_uses_batch

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``fn``'s value: the differentiable violation."""
        return self.fn(model, batch) if self._uses_batch else self.fn(model)

    def measure(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The violation as the multiplier's step reads it: ``strict_fn``'s value (under ``torch.no_grad()``),
        or ``fn``'s without one."""
        if self.strict_fn is None:
            return self(model, batch)
        with torch.no_grad():
            return self.strict_fn(model, batch) if self._strict_uses_batch else self.strict_fn(model)


def _takes_batch(fn: Callable[..., Any], key: str) -> bool:
    """Whether a constraint's ``fn`` is ``fn(model, batch)`` (else ``fn(model)``).

    Raises:
        ValueError: For any other signature (no argument, or more than two required ones).
    """
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: called as fn(model, batch)
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    if len(required) > 2 or (not positional and not varargs):
        names = ", ".join(p.name for p in parameters)
        raise ValueError(f"constraint {key} must take (model) or (model, batch), got a function of ({names})")
    return len(positional) >= 2 or varargs


def _type_name(value: Any) -> str:
    """A value's type as a user tells it apart: ``float``, but ``numpy.float32`` (not torch's dtype)."""
    kind = type(value)
    module = kind.__module__.split(".")[0]
    return kind.__name__ if module == "builtins" else f"{module}.{kind.__name__}"


def checked_violation(name: str, value: Any, key: str = "") -> torch.Tensor:
    """A violation (``key``: ``"strict_fn"``'s, which need not be differentiable) as a flat tensor.

    Raises:
        UserInputError: For a value that is not a non-empty floating-point tensor.
    """
    who = f"constraint {name!r}" + (f" {key}" if key else "")
    if not isinstance(value, torch.Tensor):
        what = "a tensor" if key else "a tensor differentiable in the model's parameters"
        raise UserInputError(f"{who} must return {what}, got {_type_name(value)}")
    if not torch.is_floating_point(value) or value.numel() == 0:
        got = "an empty tensor" if value.numel() == 0 else value.dtype
        raise UserInputError(f"{who} must return a non-empty floating-point tensor, got {got}")
    return value.reshape(-1)
