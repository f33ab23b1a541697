r"""ADMM: the W = Z core with a constant dual step.

At every coordination iteration :math:`k` (see :mod:`~constrainedsparse.formulations.duplicate`):

.. math::
    Z^k = \Pi_C\!\left(W^k + \Lambda^{k-1}/\rho\right), \qquad
    \Lambda^k = \Lambda^{k-1} + \rho\,(W^k - Z^k), \qquad
    \rho \leftarrow \min(\gamma\rho, \rho_{max})

(Zhang et al., 2018, "A systematic DNN weight pruning framework using ADMM"). This is the
baseline SLR must beat: same problem, same W-step, same Z-step, only the dual step differs.
"""

from __future__ import annotations

import math
import warnings

from constrainedsparse.errors import user_stacklevel
from constrainedsparse.formulations.duplicate import DuplicateConfig, DuplicateVariables, Iterate
from constrainedsparse.formulations.factory import register_formulation

__all__ = ["ADMM"]


@register_formulation("admm")
class ADMM(DuplicateVariables):
    """ADMM on W = Z: dual step :math:`\\Lambda \\mathrel{+}= \\rho(W - Z)` every interval."""

    description = "ADMM with duplicate variables W = Z: Z by projection, constant dual step rho(W - Z)"
    Config = DuplicateConfig
    config: DuplicateConfig

    def dual_step_before_z(self, it: Iterate) -> tuple[float | None, dict[str, float]]:
        return None, {}

    def dual_step_after_z(self, it: Iterate) -> tuple[float | None, dict[str, float]]:
        return self.rho, {}

    def on_setup(self) -> None:
        """Warns when SGD's momentum has not settled between two coordinations (see :meth:`steps_between`)."""
        super().on_setup()
        between, settle = self.steps_between(), self.penalty_rule.momentum_steps()
        if between < settle - 1e-9:  # 1 / (1 - 0.9) is 10.000000000000002
            warnings.warn(
                f"admm coordinates every {between:.3g} W-steps, fewer than the {settle:.3g} that your SGD's momentum "
                "takes to settle: its dual steps rho (W - Z) then read W mid-swing and can diverge; leave at least "
                f"{math.ceil(settle - 1e-9)} W-steps between coordinations (a smaller interval with "
                "interval_unit=per-epoch, or interval_unit=step), or use slr (its surrogate conditions skip the dual "
                "steps that do not improve the Lagrangian)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def steps_between(self) -> float:
        """W-steps between two coordinations on average (after :meth:`setup`).

        ADMM's dual step :math:`\\rho(W - Z)` supposes W minimises :math:`L_\\rho` for the current Z and
        :math:`\\Lambda`. SGD with momentum :math:`\\beta` swings about the minimiser for :math:`\\sim 1/(1 - \\beta)`
        steps or more; a coordination within them reads W mid-swing, and the dual steps can amplify the swing
        (``benchmarks/sgd_stability.py``, a digits MLP with SGD at momentum 0.9: NaN after 27 epochs coordinating
        every 5.5 steps, finite over 60 epochs every 11).
        """
        if self.config.interval_unit == "step":
            return float(self.config.interval)
        if self.steps_per_epoch == 0:  # no steps counted (interval_unit=epoch): nothing to say
            return float("inf")
        return self.steps_per_epoch / self.coordinations_per_epoch()
