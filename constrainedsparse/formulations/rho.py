r"""The penalty coefficient :math:`\rho` of the W = Z formulations (``slr``, ``admm``) after every coordination,
and the bounds the user's SGD puts on the W-step.

The W-step is the user's optimizer on :math:`L_\rho`; the penalty adds :math:`\rho(W - Z)` to the gradient of
every pruned weight. With SGD at learning rate :math:`\eta` each step contracts :math:`W - Z` by
:math:`1 - \eta\rho` (plain SGD: stable up to :math:`\eta\rho = 2`; heavy-ball momentum :math:`\beta`: up to
:math:`2(1 + \beta)`; Nesterov momentum 0.9: up to ~1.36), and :math:`\rho` growing 5 % a coordination crosses
those bounds after ~40 epochs at :math:`\eta = 0.05`. So :class:`PenaltyRule` never sets :math:`\rho` above
:math:`1/\eta` (:meth:`PenaltyRule.stable`: a step of the penalty alone then never overshoots Z). Adam's and
other adaptive steps do not scale with the gradient: no bound for them. The optimizer must be a
``torch.optim.SGD`` (or a subclass); a wrapper around one (``ZeroRedundancyOptimizer``) is not recognised.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from constrainedsparse.errors import user_stacklevel

__all__ = ["PenaltyRule"]


class PenaltyRule:
    """:math:`\\rho` after a coordination, capped at ``rho_max`` and at the user's SGD bound.

    Args:
        name: The formulation's name (for the warning).
        config: Its :class:`~constrainedsparse.formulations.duplicate.DuplicateConfig` (``rho_growth``,
            ``rho_max``, ``rho_rule``).
        optimizer: The user's primal optimizer.
        targets: The pruned weights (the optimizer's groups that hold them are looked up once).
    """

    def __init__(self, name: str, config: Any, optimizer: torch.optim.Optimizer, targets: Iterable[Any]) -> None:
        self.name, self.config, self.optimizer = name, config, optimizer
        # Which groups is fixed (make() checked the optimizer holds every target; a parameter is in one group, and
        # groups added later are appended), not the group dicts: load_state_dict replaces them.
        held = frozenset(id(t.stored) for t in targets)
        self.indices = [i for i, g in enumerate(optimizer.param_groups) if any(id(p) in held for p in g["params"])]
        self.held = False  # stable() has capped rho (warned once)

    def _groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups that hold a pruned weight, as they are now."""
        return [self.optimizer.param_groups[i] for i in self.indices]

    @property
    def sgd(self) -> bool:
        """Whether the W-step is the user's ``torch.optim.SGD``, whose steps scale with the gradient."""
        return isinstance(self.optimizer, torch.optim.SGD)

    def next(self, rho: float, metrics: dict[str, float]) -> float:
        """:math:`\\rho` for the next iteration.

        ``growth``: :math:`\\min(\\gamma\\rho, \\rho_{max})`. ``balance`` (residual balancing, Boyd et al.
        2011, 3.4.1): with primal residual :math:`r = \\lVert W^k - Z^k\\rVert` and dual residual
        :math:`d = \\rho\\lVert Z^k - Z^{k-1}\\rVert`, :math:`\\rho` times :math:`\\gamma` if :math:`r > 10 d`,
        divided by :math:`\\gamma` if :math:`d > 10 r`, else unchanged. Then :meth:`capped`.
        """
        growth = self.config.rho_growth
        if self.config.rho_rule == "balance":
            primal, dual = metrics["dual/residual"], rho * metrics["dual/z_change"]
            if primal > 10 * dual:
                rho *= growth
            elif dual > 10 * primal:
                rho /= growth
        else:
            rho *= growth
        return self.capped(rho)

    def stable(self) -> float:
        """:math:`1/\\eta` for the user's ``torch.optim.SGD`` (:math:`\\eta`: the largest learning rate of the groups
        holding a pruned weight, read at every call: schedules change it), ``inf`` for other optimizers."""
        if not self.sgd:
            return float("inf")
        lr = max((float(g["lr"]) for g in self._groups()), default=0.0)
        return 1.0 / lr if lr > 0 else float("inf")

    def capped(self, rho: float) -> float:
        """``rho`` capped at ``rho_max`` and at :meth:`stable` (warns once, at the user's line, when the latter
        binds)."""
        stable = self.stable()
        if rho > stable and stable < self.config.rho_max:
            if not self.held:
                self.held = True
                warnings.warn(
                    f"{self.name} holds rho at {stable:.4g} = 1 / lr of your SGD instead of {rho:.4g} (beyond it a "
                    "W-step overshoots W = Z, and beyond 2 (1 + momentum) / lr the run diverges): a lower learning "
                    "rate allows a firmer pull",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
            return stable
        return min(rho, self.config.rho_max)

    def momentum_steps(self) -> float:
        """:math:`1/(1 - \\beta)` for SGD's momentum :math:`\\beta` (the largest of the groups holding a pruned
        weight; a swing about the W-step's minimiser decays by a factor e every 1 to 2 such spans), 0 without
        momentum or for other optimizers."""
        if not self.sgd:
            return 0.0
        beta = max((float(g.get("momentum", 0.0)) for g in self._groups()), default=0.0)
        return 1.0 / (1.0 - beta) if 0 < beta < 1 else 0.0
