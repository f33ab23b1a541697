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

from constrainedsparse.formulations.duplicate import DuplicateConfig, DuplicateVariables, Iterate
from constrainedsparse.formulations.factory import register_formulation

__all__ = ["ADMM"]


@register_formulation("admm")
class ADMM(DuplicateVariables):
    """ADMM on W = Z: dual step :math:`\\Lambda \\mathrel{+}= \\rho(W - Z)` every interval."""

    description = "ADMM with duplicate variables W = Z: Z by projection, constant dual step rho(W - Z)"
    Config = DuplicateConfig

    def dual_step_before_z(self, it: Iterate) -> tuple[float | None, dict[str, float]]:
        return None, {}

    def dual_step_after_z(self, it: Iterate) -> tuple[float | None, dict[str, float]]:
        return self.rho, {}
