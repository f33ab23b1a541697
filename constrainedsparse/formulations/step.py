"""What :meth:`~constrainedsparse.formulations.base.Formulation.backward` returns and
:meth:`~constrainedsparse.formulations.base.Formulation.post_step` takes: one evaluation of the Lagrangian."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import cooper
import torch

from constrainedsparse.formulations.checks import described

__all__ = ["LagrangianStep", "checked_steps"]


@dataclasses.dataclass
class LagrangianStep:
    """One evaluation of the Lagrangian on a batch (what :meth:`Formulation.backward` returns).

    Attributes:
        cmp_state: Loss, violations and misc of the batch (Cooper's ``CMPState``).
        lagrangian: The primal Lagrangian :math:`f + \\sum_j \\lambda_j g_j + \\dots` (a scalar tensor).
    """

    cmp_state: cooper.cmp.CMPState
    lagrangian: torch.Tensor
    taken: bool = dataclasses.field(default=False, repr=False, compare=False)  # post_step() used it
    dual: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)  # λᵀg·scale, g detached
    dual_scale: float = dataclasses.field(default=1.0, repr=False, compare=False)  # backward()'s scale

    @property
    def loss(self) -> torch.Tensor:
        """The objective :math:`f` on the batch (without constraint terms)."""
        return self.cmp_state.loss


def checked_steps(step: Any, call: str = "post_step()") -> list[LagrangianStep]:
    """What ``post_step()`` (or ``call``) got, as a non-empty list of new :class:`LagrangianStep` (one, or the
    micro-batches' with gradient accumulation).

    Raises:
        ValueError: For anything else, or a last step already taken (a second dual step on it).
    """
    steps = list(step) if isinstance(step, Sequence) else [step]
    if not steps or not all(isinstance(item, LagrangianStep) for item in steps):
        raise ValueError(
            f"{call} takes what backward() returned (a LagrangianStep, or a non-empty list of them with "
            f"gradient accumulation), got {described(step)}"
        )
    if steps[-1].taken:
        raise ValueError(
            f"{call} got a step it has already taken: call backward() (or training_step()) for each new step"
        )
    if len({id(item) for item in steps}) < len(steps):
        raise ValueError(f"{call} got the same step twice in its list: give each backward()'s step once")
    return steps
