r"""Layer-wise ADMM (``--formulation admm`` on a layer-wise problem): mask and weights together, then least squares.

The layer problem with new kept weights (see :mod:`constrainedsparse.layerwise.base`) is split like
the training formulations ``slr``/``admm`` split theirs, with a duplicate :math:`Z` that carries the
pattern:

.. math::

    \min_{\hat W,\, Z}\ \|(W - \hat W)X\|_F^2 + \iota_C(Z) \quad \text{s.t.} \quad \hat W = Z .

Scaled ADMM (Boyd et al. 2011, 3.1.1) with the penalty :math:`\rho_t = \rho_0\,\bar g\,\gamma^t`
(:math:`\bar g` the mean of :math:`\operatorname{diag} G`, ``rho`` :math:`= \rho_0`, ``rho_growth``
:math:`= \gamma`), for ``iterations`` steps from :math:`Z = W`, :math:`V = 0`:

.. math::

    \hat W &\leftarrow (WG + \rho_t (Z - V))\,(G + \rho_t I)^{-1}, \\
    Z &\leftarrow \Pi_C(\hat W + V), \\
    V &\leftarrow V + \hat W - Z .

The :math:`\hat W`-step is exact and cheap: with :math:`G = Q \Lambda Q^\top` computed once,
:math:`(G + \rho I)^{-1} = Q (\Lambda + \rho I)^{-1} Q^\top` for every :math:`\rho`, i.e. two
:math:`d_{out} \times d_{in} \times d_{in}` products per iteration (:func:`penalised_solve`). The
:math:`Z`-step is the pattern's own projection (:mod:`constrainedsparse.sets`: the largest
:math:`|\hat W + V|` per row, per layer, per N:M group, ...), so every pattern works. The growing
penalty makes the iterates meet (:math:`\hat W - Z \to 0`) and the support settle; :math:`V` is left
as it is when :math:`\rho` grows (the unscaled multiplier :math:`\rho V` grows with it), which
settles the support sooner than the textbook rescaling (measured in ``docs/formulations/admm-layerwise.md``).

The layer keeps the support :math:`M` of the last :math:`Z` and its kept weights are re-solved by
damped least squares on :math:`M` (:func:`~constrainedsparse.layerwise.fw.reconstruct.reconstruct_rows`,
``damp``, ``reconstruct_iterations`` conjugate-gradient steps, started from :math:`Z`). A row whose
error ends above the Wanda mask's (kept weights unchanged) takes that instead, so no row is worse than
Wanda's (``admm/fallback_rows`` counts them); for patterns with a layer-wide count (``unstructured``,
``structured``, ``block``) the whole layer does, if its error is. This is the approach of ALPS (Meng
et al. 2024), with a plain geometric penalty schedule.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import torch

from constrainedsparse.config import Bounds, Hyperparameters, hyperparameter
from constrainedsparse.layerwise.base import (
    LayerProblem,
    LayerResult,
    LayerwiseSolver,
    below_per_row,
    register_solver,
    wanda_scores,
)
from constrainedsparse.layerwise.fw.core import residual_row_errors
from constrainedsparse.layerwise.fw.reconstruct import reconstruct_rows
from constrainedsparse.sets import FeasibleSet

__all__ = ["ADMMLayerConfig", "ADMMLayerSolver", "EigenGram", "admm_support", "penalised_solve"]


@dataclasses.dataclass
class ADMMLayerConfig(Hyperparameters):
    """Hyperparameters of the layer-wise ``admm`` solver (``--set key=value``).

    Attributes:
        iterations: ADMM iterations :math:`T`.
        rho: Initial penalty :math:`\\rho_0` as a fraction of the mean of :math:`\\operatorname{diag} G`.
        rho_growth: Factor :math:`\\gamma` applied to the penalty after every iteration.
        damp: Damping of the final least squares as a fraction of the mean of :math:`\\operatorname{diag} G`.
        reconstruct_iterations: Conjugate-gradient iterations of the final least squares.
    """

    error_prefix: ClassVar[str] = "admm: "
    iterations: int = hyperparameter(30, "ADMM iterations", Bounds(low=1, integer=True))
    rho: float = hyperparameter(
        0.03, "initial penalty rho as a fraction of mean(diag G)", Bounds(low=0, low_inclusive=False, finite=True)
    )
    rho_growth: float = hyperparameter(1.2, "factor applied to rho after every iteration", Bounds(low=1, finite=True))
    damp: float = hyperparameter(
        0.01,
        "damping of the final least squares as a fraction of mean(diag G)",
        Bounds(low=0, low_inclusive=False, finite=True),
    )
    reconstruct_iterations: int = hyperparameter(
        10, "conjugate-gradient iterations of the final least squares", Bounds(low=1, integer=True)
    )


@dataclasses.dataclass(frozen=True)
class EigenGram:
    r""":math:`G = Q \Lambda Q^\top` (eigenvalues clipped at 0), for solves with :math:`G + \rho I` at any :math:`\rho`.

    Args:
        vectors: :math:`Q`, ``(d_in, d_in)``, dtype of the products.
        values: :math:`\operatorname{diag}\Lambda`, ``(d_in,)``, same dtype.
    """

    vectors: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, gram: torch.Tensor, dtype: torch.dtype = torch.float32) -> EigenGram:
        """The decomposition of ``gram`` (computed in float64, returned in ``dtype``)."""
        values, vectors = torch.linalg.eigh(gram.to(torch.float64))
        return cls(vectors.to(dtype), values.clamp_min(0).to(dtype))


def penalised_solve(rhs: torch.Tensor, eigen: EigenGram, rho: float) -> torch.Tensor:
    r""":math:`X` with :math:`X (G + \rho I) = \text{rhs}` for every row.

    Computed as :math:`\text{rhs}\, Q (\Lambda + \rho I)^{-1} Q^\top`: two products, no factorisation.
    """
    return ((rhs @ eigen.vectors) / (eigen.values + rho)) @ eigen.vectors.T


@dataclasses.dataclass(frozen=True)
class ADMMRun:
    """Outcome of :func:`admm_support`.

    Args:
        mask: The support of the last :math:`Z` (the pattern's mask of :math:`|\\hat W + V|`).
        z: The last :math:`Z` (zero outside ``mask``).
        support_changes: Fraction of the mask's entries that changed, per iteration (the first
            against the projection of :math:`W`).
        residuals: :math:`\\|\\hat W - Z\\|_F / \\|\\hat W\\|_F` per iteration.
        rho: The penalty of the last iteration, as a fraction of the mean of :math:`\\operatorname{diag} G`.
    """

    mask: torch.Tensor
    z: torch.Tensor
    support_changes: list[float]
    residuals: list[float]
    rho: float


RHO_MAX = 1e30
"""The penalty's ceiling: growth beyond it (500 iterations at x1.2) would overflow float32 and changes nothing."""


def admm_support(weight: torch.Tensor, gram: torch.Tensor, feasible: FeasibleSet, config: ADMMLayerConfig) -> ADMMRun:
    """The ADMM iterations of the module docstring: the support and :math:`Z` they end on.

    Args:
        weight: :math:`W`, float32, ``(d_out, d_in)``.
        gram: :math:`G`, float32, ``(d_in, d_in)``.
        feasible: The layer's pattern :math:`C`.
        config: Iterations and penalty schedule.
    """
    eigen = EigenGram.of(gram, weight.dtype)
    mean_diagonal = float(gram.diagonal().mean())
    scale = mean_diagonal if mean_diagonal > 0 else 1.0  # an all-zero G: any rho works
    rho = min(config.rho * scale, RHO_MAX)
    wg = weight @ gram
    z, v = weight, torch.zeros_like(weight)
    mask = feasible.mask(weight.abs())
    changes, residuals = [], []
    for _ in range(config.iterations):
        last = rho
        w_hat = penalised_solve(torch.add(wg, z - v, alpha=rho), eigen, rho)
        u = w_hat + v
        new_mask = feasible.mask(u.abs())
        z = u * new_mask
        v = u - z  # = V + Ŵ - Z
        changes.append((new_mask ^ mask).sum())
        residuals.append(torch.linalg.vector_norm(w_hat - z) / torch.linalg.vector_norm(w_hat))
        mask = new_mask
        rho = min(rho * config.rho_growth, RHO_MAX)  # past it W_hat = Z - V already: growth changes nothing
    numel = mask.numel()
    return ADMMRun(
        mask,
        z,
        (torch.stack(changes).double() / numel).tolist(),
        torch.stack(residuals).nan_to_num(0.0).tolist(),
        (last if config.iterations else rho) / scale,
    )


@register_solver("admm")
class ADMMLayerSolver(LayerwiseSolver):
    """Layer-wise ADMM on the split :math:`\\hat W = Z`, :math:`Z` in the pattern, then least squares on the support."""

    description: ClassVar[str] = (
        "ADMM on W_hat = Z with Z in the pattern (mask and weights together), then least squares on its support"
    )
    Config = ADMMLayerConfig

    def prune(self, layer: LayerProblem) -> LayerResult:
        """Prunes ``layer`` (``layer.weight`` is not modified); every pattern of :mod:`constrainedsparse.sets`.

        Raises:
            ValueError: For a weight or Gram matrix of the wrong shape, or a pattern the weight's shape
                does not fit (N:M with a width not divisible by M).
        """
        cfg: ADMMLayerConfig = self.config
        started = time.perf_counter()
        layer.checked_shape()
        feasible = layer.feasible_set()
        weight = layer.weight.detach().to(torch.float32).contiguous()
        gram = layer.gram.detach().to(torch.float32).contiguous()
        wanda = feasible.mask(wanda_scores(weight, gram))  # the per-row fallback; checks the pattern first
        run = admm_support(weight, gram, feasible, cfg)
        solved = reconstruct_rows(weight, gram, run.mask, cfg.damp, cfg.reconstruct_iterations, start=run.z)
        rows = residual_row_errors(weight, gram, solved)
        wanda_weight = weight * wanda
        wanda_rows = residual_row_errors(weight, gram, wanda_weight)
        fallback = below_per_row(feasible, wanda_rows, rows)  # Wanda's rows where strictly better
        mask = torch.where(fallback.unsqueeze(1), wanda, run.mask)
        weight_hat = torch.where(fallback.unsqueeze(1), wanda_weight, solved).to(layer.weight.dtype)
        metrics = {
            "admm/iterations": float(cfg.iterations),
            "admm/rho_final": run.rho,
            "admm/support_change_last": run.support_changes[-1],
            "admm/residual_last": run.residuals[-1],
            "admm/fallback_rows": float(fallback.sum()),
            "admm/objective_final": float(torch.where(fallback, wanda_rows, rows).sum()),
            "admm/seconds": time.perf_counter() - started,
        }
        trace = [
            {"iteration": float(t), "support_change": change, "residual": residual}
            for t, (change, residual) in enumerate(zip(run.support_changes, run.residuals))
        ]
        return LayerResult(weight=weight_hat, mask=mask, metrics=metrics, trace=trace)
