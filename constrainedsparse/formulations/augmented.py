r"""Cooper's Augmented Lagrangian for the W = Z constraints of ``slr`` and ``admm``, with a one-pass backward.

:class:`FusedAugmentedLagrangian` computes the same primal and dual contributions as
:class:`cooper.formulations.AugmentedLagrangian` (a test pins value and gradients to it), and
:func:`dots` reads many dot products back to the host in one transfer.
"""

from __future__ import annotations

import cooper
import torch
from cooper.formulations import ContributionStore

__all__ = ["FusedAugmentedLagrangian", "dots", "squared_norms"]


class _AugmentedTerm(torch.autograd.Function):
    """:math:`\\langle\\Lambda, h\\rangle + \\frac\\rho2\\lVert h\\rVert^2` as one autograd node.

    Backward is one fused pass, :math:`\\partial/\\partial h = \\Lambda + \\rho h`, instead of the
    einsum/expand/square graph of Cooper's generic formula (3x the time of a ResNet-18 step on CPU).
    """

    @staticmethod
    def forward(ctx, violation: torch.Tensor, multiplier: torch.Tensor, rho: float) -> torch.Tensor:
        ctx.save_for_backward(violation, multiplier)
        ctx.rho = rho
        return torch.dot(multiplier, violation) + 0.5 * rho * torch.dot(violation, violation)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        violation, multiplier = ctx.saved_tensors
        grad = torch.add(multiplier, violation, alpha=ctx.rho)
        if grad_output.device.type != "cpu" or float(grad_output) != 1.0:
            grad.mul_(grad_output)
        return grad, None, None


class FusedAugmentedLagrangian(cooper.formulations.AugmentedLagrangian):
    """Cooper's Augmented Lagrangian formulation for the equality constraints W − Z = 0.

    Same primal contribution as :class:`cooper.formulations.AugmentedLagrangian`,
    :math:`\\langle\\Lambda, h\\rangle + \\frac\\rho2\\lVert h\\rVert^2` with the multiplier detached,
    computed by :class:`_AugmentedTerm`, and the same dual contribution :math:`\\langle\\Lambda, h\\rangle`
    (gradient :math:`h` for the multiplier) as one dot product. The penalty coefficient is a 0-d
    CPU tensor so reading it never synchronises a GPU.
    """

    def compute_contribution_to_primal_lagrangian(
        self,
        constraint_state: cooper.ConstraintState,
        multiplier: cooper.multipliers.Multiplier,
        penalty_coefficient: cooper.penalty_coefficients.PenaltyCoefficient,
    ) -> ContributionStore | None:
        if not constraint_state.contributes_to_primal_update:
            return None
        violation = constraint_state.violation.reshape(-1)
        value = multiplier.weight.detach().reshape(-1)
        rho = penalty_coefficient.value
        return ContributionStore(_AugmentedTerm.apply(violation, value, float(rho)), value, rho)

    def compute_contribution_to_dual_lagrangian(
        self,
        constraint_state: cooper.ConstraintState,
        multiplier: cooper.multipliers.Multiplier,
        penalty_coefficient: cooper.penalty_coefficients.PenaltyCoefficient,
    ) -> ContributionStore | None:
        if not constraint_state.contributes_to_dual_update:
            return None
        value = multiplier.weight.reshape(-1)
        violation = constraint_state.violation.detach().reshape(-1)
        return ContributionStore(torch.dot(value, violation), value, penalty_coefficient.value)


def dots(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """:math:`\\langle a, b\\rangle` for every pair (one BLAS dot each), read back to the host at once.

    One host transfer for the whole list: a coordination synchronises a GPU a few times, not once per dot.
    """
    if not pairs:
        return []
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in pairs]).tolist()


def squared_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """:math:`\\lVert t_n\\rVert^2` per tensor (one BLAS dot each, one host transfer)."""
    return dict(zip(tensors, dots([(t, t) for t in tensors.values()])))
