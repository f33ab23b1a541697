r"""Multipliers beyond Cooper's: dual restarts (Gallego-Posada et al., 2022).

Cooper 1.0 dropped ``restart_on_feasible``; :class:`RestartingMultiplier` brings it back as a
:class:`cooper.multipliers.DenseMultiplier` subclass whose :meth:`~RestartingMultiplier.post_step_`
runs after every dual step:

.. math::
    \lambda_g \leftarrow \begin{cases} 0 & \text{if } g(x_t) \le 0 \ \text{(constraint satisfied)} \\
    \max(0, \lambda_g) & \text{otherwise.} \end{cases}

The violation :math:`g(x_t)` is read from ``weight.grad``: with the Lagrangian formulation the dual
Lagrangian is :math:`\lambda^\top g(x_t)`, so its gradient in :math:`\lambda` is exactly the
violation measured at this step (Cooper zeroes it at the start of the next ``roll``).

**Dual-optimizer state on a restart.** A restart makes the entry "as if new": its value is 0 and any
per-entry state the dual optimizer keeps for it (SGD momentum buffer, Adam moments) is zeroed by
:func:`reset_dual_state_`, so no stale ascent direction pushes a satisfied constraint's multiplier
back up. The default dual optimizer (:meth:`SparsityProblem.dual_optimizer`) is plain
``SGD(maximize=True)`` without momentum, which has no state: there the restart is just
:math:`\lambda_g \leftarrow 0`. Scalar state (Adam's step counter) is shared and kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cooper
import torch
from cooper.multipliers import DenseMultiplier
from cooper.utils import ConstraintType

__all__ = ["RestartingMultiplier", "cooper_optimizer", "reset_dual_state_", "restarted_multipliers"]


class RestartingMultiplier(DenseMultiplier):
    """A :class:`~cooper.multipliers.DenseMultiplier` with dual restarts (switchable).

    Args:
        num_constraints: Number of entries.
        restarts: If False this is a plain ``DenseMultiplier`` (projection onto :math:`\\lambda \\ge 0`).
        entry_names: The name each entry is logged under (``restart/<entry name>``), for a constraint whose
            entries are logged as constraints of their own (l0's test-gap pair); ``None``: the constraint's name.
        **kwargs: Passed to :class:`~cooper.multipliers.DenseMultiplier` (``init``, ``device``, ``dtype``).

    Attributes:
        last_restart: Boolean tensor, True for the entries the latest :meth:`post_step_` reset from a
            positive value to 0 (what ``restart/<name>`` counts; an entry already at 0 is not restarted).
        last_satisfied: Boolean tensor, True for the entries whose constraint held (:math:`g \\le 0`)
            at the latest :meth:`post_step_`: their dual-optimizer state is cleared.
    """

    def __init__(
        self,
        num_constraints: int | None = None,
        *,
        restarts: bool = True,
        entry_names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_constraints=num_constraints, **kwargs)
        self.restarts = restarts
        self.entry_names = tuple(entry_names) if entry_names is not None else None
        self.last_restart = torch.zeros_like(self.weight, dtype=torch.bool)
        self.last_satisfied = torch.zeros_like(self.weight, dtype=torch.bool)

    @torch.no_grad()
    def post_step_(self) -> None:
        """Projection onto :math:`\\lambda \\ge 0`, then :math:`\\lambda_g = 0` where :math:`g \\le 0`."""
        super().post_step_()
        grad = self.weight.grad
        if not self.restarts or grad is None or self.constraint_type != ConstraintType.INEQUALITY:
            self.last_restart = torch.zeros_like(self.weight, dtype=torch.bool)
            self.last_satisfied = torch.zeros_like(self.weight, dtype=torch.bool)
            return
        self.last_satisfied = grad.reshape(self.weight.shape) <= 0
        self.last_restart = self.last_satisfied & (self.weight.data > 0)
        self.weight.data = self.weight.data.masked_fill(self.last_satisfied, 0.0)


@torch.no_grad()
def reset_dual_state_(optimizer: torch.optim.Optimizer, multiplier: RestartingMultiplier) -> None:
    """Zeroes the dual optimizer's per-entry state of the entries whose constraint just held (their
    multiplier is 0 after :meth:`RestartingMultiplier.post_step_`).

    Every state tensor shaped like the multiplier (momentum buffer, Adam moments) is reset on the
    restarted entries; other state (step counters) is left alone. A no-op for stateless SGD.
    """
    state = optimizer.state.get(multiplier.weight, {})
    if not state:  # stateless (plain SGD) or not stepped yet: nothing to reset, no host sync
        return
    restarted = multiplier.last_satisfied
    if not bool(restarted.any()):
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == multiplier.weight.shape:
            value.masked_fill_(restarted, 0)


def restarted_multipliers(problem: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """After a dual step: resets ``optimizer``'s state of every restarted entry (:func:`reset_dual_state_`) and
    returns ``restart/<name>`` = 1 for every multiplier of ``problem`` (a ``SparsityProblem``) that restarted (per
    restarted entry, ``restart/<entry name>``, for a multiplier with ``entry_names``)."""
    metrics = {}
    for name, multiplier in problem.named_multipliers():
        # Only multipliers with restarts can have restarted: no host sync for the others.
        if not isinstance(multiplier, RestartingMultiplier) or not multiplier.restarts:
            continue
        reset_dual_state_(optimizer, multiplier)
        if not bool(multiplier.last_restart.any()):  # no positive multiplier was reset to 0
            continue
        if multiplier.entry_names is None:
            metrics[f"restart/{name}"] = 1.0
        else:
            restarted = multiplier.last_restart.reshape(-1).tolist()
            metrics.update({f"restart/{entry}": 1.0 for entry, hit in zip(multiplier.entry_names, restarted) if hit})
    return metrics


def cooper_optimizer(
    problem: cooper.cmp.ConstrainedMinimizationProblem,
    primal: torch.optim.Optimizer,
    dual: torch.optim.Optimizer | None,
) -> cooper.optim.CooperOptimizer:
    """Cooper's optimizer of ``problem``: the primal step alone without a dual optimizer, else simultaneous
    gradient descent-ascent (both steps on the same Lagrangian's gradients)."""
    if dual is None:
        return cooper.optim.UnconstrainedOptimizer(problem, primal)
    return cooper.optim.SimultaneousOptimizer(problem, primal, dual)
