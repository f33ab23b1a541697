r"""Reconstruction of the kept weights after fw's mask: damped least squares, then joint sweeps.

**Reconstruction** (``reconstruct=True``, beyond the paper). On the kept support :math:`S` of every
row the kept weights are re-solved by damped least squares

.. math::

    \hat w_S = \arg\min_{u} \|(w - u)X\|^2 + \lambda \|u_S - w_S\|^2
    \;\Rightarrow\; (G_{SS} + \lambda I)\, \hat w_S = (G w)_S + \lambda w_S ,

with :math:`\lambda` = ``damp`` × mean diag(G). The proximal term pulls towards the original weights
rather than towards 0 (plain ridge) so that :math:`u_S = w_S` — the mask-only solution — is feasible
with the same value: the reconstructed error is never larger than the mask-only error, for any
:math:`\lambda` and any number of conjugate-gradient iterations (:func:`reconstruct_rows`).

**Joint sweeps** (``reconstruct_sweeps``, beyond the paper). A mask chosen for the mask-only
objective is not the best support for least squares. Given the reconstructed weights
:math:`\hat W`, every N:M group may change its kept set *and* its kept values,

.. math::

    \min_{t,\; u_t} \; (w - \hat w')\,(G + \lambda I)\,(w - \hat w')^\top,
    \qquad \hat w' = \hat w \text{ outside the group}, \; u_t \text{ on its kept set } t,

whose inner minimum is a :math:`n \times n` solve per candidate set
(:func:`~constrainedsparse.layerwise.fw.groups.group_sweep_polish` with ``values``); for ``row``
and ``unstructured`` a row swaps one kept weight for a pruned one at its best value
(:func:`~constrainedsparse.layerwise.fw.search.joint_swap_polish`). With the damped Gram the
objective is the reconstruction's own (up to a constant for a fixed support), so sweeps and
re-solves alternate as exact block-coordinate descent and the damped objective never increases. A
row whose plain error ends above the least squares on the Frank-Wolfe mask keeps that, so
``reconstruct_sweeps`` never makes a row worse (:func:`reconstruct_layer`).
"""

from __future__ import annotations

import dataclasses

import torch

from constrainedsparse.layerwise.base import LayerProblem
from constrainedsparse.layerwise.fw.config import FWConfig, ReconstructionConfig
from constrainedsparse.layerwise.fw.core import residual_row_errors
from constrainedsparse.layerwise.fw.groups import group_sweep_polish
from constrainedsparse.layerwise.fw.search import SearchResult, joint_swap_polish
from constrainedsparse.sets import FeasibleSet, NMSparse

__all__ = ["Reconstruction", "joint_sweeps", "reconstruct_layer", "reconstruct_rows"]


def _conjugate_gradient(
    g: torch.Tensor, support: torch.Tensor, lam: float, x: torch.Tensor, residual: torch.Tensor, iterations: int
) -> torch.Tensor:
    r"""Jacobi-preconditioned CG on :math:`x \mapsto (xG) \odot M + \lambda x`, every row with its own scalars.

    ``x`` (updated in place and returned) starts the iteration; ``residual`` is its residual.
    """
    tiny = torch.finfo(x.dtype).tiny
    inverse_diag = 1.0 / (g.diagonal() + lam).clamp_min(tiny)
    z = residual * inverse_diag
    direction = z.clone()
    rho = (residual * z).sum(dim=1, keepdim=True)
    zero = torch.zeros_like(rho)
    for _ in range(iterations):
        applied = (direction @ g) * support + lam * direction
        curvature = (direction * applied).sum(dim=1, keepdim=True)
        step = torch.where(curvature > 0, rho / curvature.clamp_min(tiny), zero)
        x += step * direction
        residual -= step * applied
        z = residual * inverse_diag
        rho_next = (residual * z).sum(dim=1, keepdim=True)
        beta = torch.where(rho > 0, rho_next / rho.clamp_min(tiny), zero)
        direction = z + beta * direction
        rho = rho_next
    return x


def reconstruct_rows(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    damp: float,
    iterations: int,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Damped least-squares kept weights of every row on its support (see the module docstring).

    Solves :math:`(G_{SS} + \lambda I)\,\hat w_S = (G w)_S + \lambda w_S` for all rows at once by
    Jacobi-preconditioned conjugate gradients on the masked operator
    :math:`x \mapsto (xG) \odot M + \lambda x` (one :math:`d_{out} \times d_{in} \times d_{in}`
    product per iteration), started from the mask-only weights :math:`w_S` or from ``start``. CG
    decreases the row's damped objective, which bounds the plain error from above and equals the
    mask-only error at the mask-only start, so any iteration count keeps the error at or below the
    mask-only error; with as many iterations as kept weights the solve is exact (up to round-off).
    A row whose result is nonetheless worse in floating point than its start keeps the start.

    Args:
        weight: Dense weight, ``(d_out, d_in)``.
        gram: :math:`G`, ``(d_in, d_in)``.
        mask: Boolean support, ``(d_out, d_in)``.
        damp: :math:`\lambda` as a fraction of the mean of diag(G), > 0: a Gram accumulated in float32 from
            fewer tokens than inputs can have slightly negative eigenvalues, which undamped least squares follows
            to huge weights (and an error measured on the same Gram misses it).
        iterations: Conjugate-gradient iterations.
        start: Kept weights to start from (zero outside ``mask``); ``None``: the mask-only weights.

    Returns:
        The reconstructed weight (zero outside ``mask``), dtype of ``weight``.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w, g = weight.to(dtype), gram.to(dtype)
    support = mask.to(dtype)
    lam = damp * float(g.diagonal().mean())
    initial = w * support if start is None else start.to(dtype) * support
    x = initial.clone()
    residual = ((w - x) @ g - lam * (x - w)) * support
    x = _conjugate_gradient(g, support, lam, x, residual, iterations) * support
    solved_rows, initial_rows = residual_row_errors(w, g, x), residual_row_errors(w, g, initial)
    x = torch.where((solved_rows <= initial_rows).unsqueeze(1), x, initial)
    return x.to(weight.dtype)


def joint_sweeps(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    feasible: FeasibleSet,
    config: ReconstructionConfig,
    polish_steps: int,
) -> SearchResult:
    r"""Rounds of joint mask-and-weight search on :math:`G + \lambda I`, each followed by a warm re-solve.

    A round is one reconstruction-aware group sweep (``nm``) or up to ``polish_steps`` joint swap
    steps (``row``, ``unstructured``); the re-solve starts from its kept weights with a third of
    ``reconstruct_iterations`` (measured: enough next to the solution). Rounds stop after
    ``reconstruct_sweeps`` or when one changes nothing.

    Args:
        weight: :math:`W`, ``(d_out, d_in)``, float32.
        gram: :math:`G`, same dtype.
        mask: The start mask.
        values: Its least-squares kept weights, dtype of ``weight``.
        feasible: The layer's pattern.
        config: ``damp``, ``reconstruct_iterations`` and ``reconstruct_sweeps`` are used.
        polish_steps: Maximum joint swap steps per round (``row``, ``unstructured``).

    Returns:
        The final mask and kept weights, their plain per-row error (on :math:`G`), the number of
        rounds and of moves.
    """
    lam = config.damp * float(gram.diagonal().mean())
    damped = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    joint_mask, changes, rounds = mask, 0, 0
    warm_iterations = max(1, config.reconstruct_iterations // 3)
    for rounds in range(1, config.reconstruct_sweeps + 1):  # noqa: B007 - the count is returned
        if isinstance(feasible, NMSparse):
            searched = group_sweep_polish(weight, damped, joint_mask, feasible.m, 1, values=values)
        else:
            searched = joint_swap_polish(weight, damped, joint_mask, values, polish_steps)
        joint_mask = searched.mask
        values = reconstruct_rows(weight, gram, joint_mask, config.damp, warm_iterations, start=searched.kept)
        changes += searched.moves
        if searched.moves == 0:
            break
    return SearchResult(joint_mask, residual_row_errors(weight, gram, values), rounds, changes, kept=values)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """Outcome of :func:`reconstruct_layer`.

    Args:
        mask: The final mask.
        weight: Its kept weights (zero outside ``mask``), dtype of the layer's weight.
        row_errors: Their per-row error on :math:`G`, float64.
        joint_changes: Group replacements or swaps of the joint sweeps.
    """

    mask: torch.Tensor
    weight: torch.Tensor
    row_errors: torch.Tensor
    joint_changes: int


def reconstruct_layer(
    layer: LayerProblem,
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    feasible: FeasibleSet,
    config: FWConfig,
    group_search: bool,
) -> Reconstruction:
    """Kept weights by damped least squares on ``mask``, then :func:`joint_sweeps` where they apply.

    Rows whose plain error ends above the least squares on ``mask`` keep that.

    Args:
        layer: The layer (its own weight and Gram matrix, in their dtypes, for the first solve).
        weight: :math:`W` as contiguous float32.
        gram: :math:`G` as contiguous float32.
        mask: fw's mask.
        feasible: The layer's pattern.
        config: ``reconstruction`` and ``search.polish_steps`` are used.
        group_search: Whether the pattern allows the group searches (no joint sweeps otherwise).
    """
    settings = config.reconstruction
    original = layer.weight.detach()
    solved = reconstruct_rows(original, layer.gram.detach(), mask, settings.damp, settings.reconstruct_iterations)
    plain_rows = residual_row_errors(weight, gram, solved.to(weight.dtype))
    if settings.reconstruct_sweeps == 0 or not group_search:
        return Reconstruction(mask, solved, plain_rows, 0)
    joint = joint_sweeps(weight, gram, mask, solved.to(weight.dtype), feasible, settings, config.search.polish_steps)
    keep = joint.row_errors <= plain_rows
    return Reconstruction(
        torch.where(keep.unsqueeze(1), joint.mask, mask),
        torch.where(keep.unsqueeze(1), joint.kept.to(original.dtype), solved),
        torch.where(keep, joint.row_errors, plain_rows),
        joint.moves,
    )
