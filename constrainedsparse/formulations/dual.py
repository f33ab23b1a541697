r"""The dual side of the split step: each Lagrangian's :math:`\lambda^\top g` kept in its step.

:meth:`~constrainedsparse.formulations.base.Formulation.backward` evaluates the violations :math:`g` of a batch;
the dual term :math:`\lambda^\top g` (violations detached, times the step's scale) stays in the
:class:`~constrainedsparse.formulations.step.LagrangianStep` it returns, and
:meth:`~constrainedsparse.formulations.base.Formulation.post_step` backpropagates the terms of the steps it is
given, and of those only, into the multipliers before the dual optimizer's ascent step. A batch skipped after
``backward()`` (a loss spike) therefore moves no multiplier.
"""

from __future__ import annotations

import warnings

import torch

from constrainedsparse.errors import user_stacklevel
from constrainedsparse.formulations.step import LagrangianStep

__all__ = ["DualTerms"]


class DualTerms:
    """Keeps each step's dual term and backpropagates the given steps' terms.

    Attributes:
        evaluated: Steps that got a dual term since the last :meth:`backpropagate`.
    """

    def __init__(self) -> None:
        self.evaluated = 0
        self._warned = False  # the partial-accumulation warning, given once

    def keep(self, step: LagrangianStep, dual: torch.Tensor | None, scale: float) -> None:
        """Stores ``scale · dual`` in ``step`` (nothing under ``no_grad``: an evaluation's Lagrangian)."""
        if dual is None or not dual.requires_grad:
            return
        step.dual, step.dual_scale = (dual if scale == 1.0 else dual * scale), scale
        self.evaluated += 1

    def backpropagate(self, steps: list[LagrangianStep]) -> None:
        """The multipliers' gradients from the dual terms of ``steps`` (their gradients zeroed before by the
        caller); warns once where ``backward()`` ran more often with scales the given steps do not sum to 1
        (gradient accumulation passing its last step only: the dual step would be a fraction)."""
        given = [item for item in steps if item.dual is not None]
        evaluated, self.evaluated = self.evaluated, 0
        partial = evaluated > len(given) and abs(sum(item.dual_scale for item in given) - 1.0) > 1e-6
        if given and partial and not self._warned:
            self._warned = True
            warnings.warn(
                f"post_step() got {len(given)} step{'s' * (len(given) != 1)} whose backward() scales do not sum "
                f"to 1, after {evaluated} backward() calls: the dual step uses the steps given only, so it is a "
                "fraction of the mean violation; with gradient accumulation pass every micro-batch's step "
                "(post_step([step_1, ..., step_n]))",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        if given:
            with torch.enable_grad():  # post_step() may run under no_grad: the terms hold their graphs
                torch.stack([item.dual for item in given]).sum().backward()
