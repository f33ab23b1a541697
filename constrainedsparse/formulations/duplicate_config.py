"""Hyperparameters shared by ``slr`` and ``admm``: :class:`DuplicateConfig` (the same defaults for both)."""

from __future__ import annotations

import dataclasses

from constrainedsparse.config import Bounds, Hyperparameters, OneOf, hyperparameter

__all__ = ["DuplicateConfig", "INTERVAL_UNITS", "MASK_SOURCES", "RHO_RULES", "SCHEDULES"]

INTERVAL_UNITS = ("epoch", "step", "per-epoch")
MASK_SOURCES = ("w", "z")
SCHEDULES = ("constant", "cubic")
RHO_RULES = ("growth", "balance")


@dataclasses.dataclass
class DuplicateConfig(Hyperparameters):
    """Hyperparameters shared by ``slr`` and ``admm`` (the same defaults for both).

    Attributes:
        rho: Penalty coefficient :math:`\\rho > 0` of :math:`\\frac{\\rho}{2}\\lVert W - Z\\rVert^2`.
            0.03 (the papers use 0.1): with ``s0 = 0.001`` it lifts retrain-free accuracy at
            90-95 % sparsity (``benchmarks/slr_vs_admm.py``, README) and keeps it at 80-90 %.
        rho_growth: Factor :math:`\\gamma \\ge 1` applied to :math:`\\rho` after every coordination.
        rho_max: Upper bound on :math:`\\rho` when it grows (with SGD also :meth:`PenaltyRule.stable`).
        interval: Coordinate (Z-step and dual steps) every ``interval`` units.
        interval_unit: ``"epoch"``, ``"step"`` (minibatches), or ``"per-epoch"``: ``interval``
            coordinations per epoch, evenly spaced over its ``steps_per_epoch`` steps. Default 4 per
            epoch (was every 10 steps): :math:`\\rho`'s growth and the dual steps then follow the
            epoch whatever the dataset and batch size (every 10 steps is 4 an epoch on mnist1d-mlp,
            2.3 on digits-mlp and 156 on CIFAR-10 at batch 32, where :math:`\\rho` grew 1.05-fold
            156 times an epoch); on digits-mlp it lifts retrain-free SLR at 95 % from 90.0 to 94.4 %
            (``benchmarks/slr_vs_admm.py``, README).
        mask_from: Hard pruning keeps the top-k of ``"w"`` (the trained weights) or the support of
            ``"z"`` (the last projection).
    """

    rho: float = hyperparameter(
        0.03, "penalty coefficient rho of rho/2 ||W - Z||^2", Bounds(low=0, low_inclusive=False)
    )
    rho_growth: float = hyperparameter(1.05, "factor applied to rho after every coordination", Bounds(low=1))
    rho_max: float = hyperparameter(
        1e4,
        "upper bound on rho when it grows (>= rho; with your own SGD rho also stays <= 1/lr)",
        Bounds(low=0, low_inclusive=False),
    )
    interval: int = hyperparameter(
        4, "coordinate (Z-step, dual steps) every this many units", Bounds(low=1, integer=True)
    )
    interval_unit: str = hyperparameter("per-epoch", "unit of interval", OneOf(INTERVAL_UNITS))
    mask_from: str = hyperparameter(
        "w", "hard masks from the top-k of the weights (w) or Z's support (z)", OneOf(MASK_SOURCES)
    )
    sparsity_schedule: str = hyperparameter(
        "constant", "sparsity level of Z: the target from the start, or reached on a cubic schedule", OneOf(SCHEDULES)
    )
    schedule_end: float = hyperparameter(
        0.5,
        "fraction of the pruning steps at which the cubic schedule reaches the target (sparsity_schedule=cubic only)",
        Bounds(0, 1, low_inclusive=False),
    )
    rho_rule: str = hyperparameter(
        "growth", "rho after a coordination: times rho_growth, or residual balancing", OneOf(RHO_RULES)
    )

    def check(self) -> None:
        """``rho_max >= rho``; ``schedule_end`` other than its default only with the cubic schedule."""
        if not self.rho_max >= self.rho:
            raise ValueError(f"rho_max must be >= rho ({self.rho}), got {self.rho_max}")
        default_end = self.keys()["schedule_end"].default
        if self.sparsity_schedule == "constant" and self.schedule_end != default_end:
            raise ValueError(
                f"schedule_end={self.schedule_end} applies only with sparsity_schedule=cubic (the constant "
                "schedule projects to the target from the start)"
            )
