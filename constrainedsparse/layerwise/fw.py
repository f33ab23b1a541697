r"""``fw``: layer-wise mask selection by Frank-Wolfe on the convex hull of masks.

After Roux, Zimmer, d'Aspremont and Pokutta (2025), "Don't be greedy, just relax! Pruning LLMs via
Frank-Wolfe". For one linear layer with weight :math:`W` and calibration Gram matrix
:math:`G = XX^\top` the mask is chosen to minimise the reconstruction error

.. math::

    f(M) = \|WX - (M \odot W)X\|_F^2 = \operatorname{tr}(D G D^\top), \qquad D = W - M \odot W,

relaxed from binary masks in the target pattern to their convex hull :math:`\mathcal{C}`. With
:math:`P = (W \odot M)G` the gradient is

.. math::

    \nabla f(M) = -2\, W \odot (WG - P) = -2\, W \odot (DG),

and one Frank-Wolfe iteration takes the vertex :math:`V = \arg\min_{V \in \mathcal{C}} \langle\nabla
f(M), V\rangle` from the feasible set's linear minimisation oracle, moves
:math:`M \leftarrow (1 - \gamma) M + \gamma V` and reports the duality gap
:math:`g(M) = \langle \nabla f(M), M - V\rangle \ge f(M) - \min_{\mathcal{C}} f \ge 0`.

**α-fixed warm start.** Plain Frank-Wolfe from scratch rounds to masks worse than Wanda's. The
:math:`\lfloor \alpha k\rfloor` highest-Wanda-score weights of every unit of the pattern (a row for
``row``, the layer for ``unstructured``, a group of M inputs for ``nm``) are fixed at 1, and
Frank-Wolfe runs over the remaining budget :math:`k - \lfloor \alpha k\rfloor` on the other
coordinates, starting from the Wanda mask. The oracle over that face is the pattern's own oracle
(:mod:`constrainedsparse.sets`) with the reduced budget, run on the free coordinates gathered in
order (``only_negative=True``: the hull of masks with *at most* the free budget, as in the paper).

**Step size.** ``step="open_loop"`` is the paper's :math:`\gamma_t = 2/(t + 2)`. ``step="line_search"``
(default) minimises the quadratic exactly along :math:`V - M`: for a row-separable pattern (``row``,
``nm``) the objective is a sum of independent row objectives over a product of row hulls, so each
row gets its own step

.. math::

    \gamma_i = \operatorname{clip}\Big(\frac{\langle \nabla_i, M_i - V_i\rangle}
        {2\, (W_i \odot (V_i - M_i))\, G\, (W_i \odot (V_i - M_i))^\top}, 0, 1\Big),

whose denominator is :math:`2\langle W_i \odot (V_i - M_i), Q_i - P_i\rangle` with
:math:`Q = (W \odot V) G`, i.e. free given the quantities below (one step for the whole layer under
``unstructured``, whose budget couples the rows). With a warm start, :math:`\gamma_0 = 1` of the open
loop throws the start away; the line search keeps it unless leaving it pays.

**Incremental products.** Everything per iteration is elementwise except :math:`Q = (W\odot V)G`.
Consecutive vertices differ in few coordinates, so :math:`Q` is updated by the sparse difference,
:math:`Q \mathrel{+}= (W \odot (V_t - V_{t-1}))\,G`, at :math:`O(\mathrm{nnz}(\Delta V)\, d_{in})`
instead of :math:`O(d_{out} d_{in}^2)`, and :math:`P \leftarrow P + \gamma (Q - P)` follows the
iterate exactly (recomputed densely every ``refresh_every`` iterations to bound round-off drift).

**Rounding and its guarantee.** The relaxed iterate is rounded to the pattern by the feasible
set's own mask (top-k per unit of the relaxed values, the fixed weights ranked first, ties broken
by lower index, so the pattern holds exactly). Rounding a relaxed point has **no guarantee in
general**: the rounded objective may exceed the relaxed one, and even Wanda's, arbitrarily. What
*is* guaranteed: the swap polish below only ever lowers the rounded mask's objective, and the
polished mask is then compared with the Wanda warm start and the better one is kept — per row for
the row-separable patterns, per layer for ``unstructured`` — so the returned mask satisfies
:math:`f(M_{\text{fw}}) \le \min(f(M_{\text{rounded}}), f(M_{\text{wanda}}))`, row by row for
``row``/``nm`` (``fw/objective_final`` ≤ ``fw/objective_rounded`` and ≤ ``fw/objective_start``). The
relaxed iterate also gives a certificate: :math:`f(M) - g(M) \le f` on every mask of the face (every
mask containing the fixed weights), reported as ``fw/lower_bound``.

**Swap polish** (beyond the paper; ``polish_steps`` for ``row``/``unstructured``, 0 turns it off).
Rounding loses much of what the relaxation gained, so the rounded mask is improved by an exact local
search on the binary objective that never changes a unit's count: one-in-one-out swaps within each
row (:func:`_swap_polish`; keeping every row's count keeps the layer's). Every accepted move's
change of the objective is computed exactly from :math:`C = DG`, so the objective decreases
strictly. The polish starts from the rounded mask even in rows where Wanda's is better before
polishing: measured on MiniLM, the polished rounded mask wins far more often than either unpolished
mask.

**N:M search** (beyond the paper). For ``nm`` a unit is a group of M inputs, and a move gives one
group another of its :math:`\binom{m}{n}` kept sets. Two searches are available, in this order:

- ``polish_sweeps`` (default 0, off): block-coordinate descent, each group taking its best kept set
  given the others (:func:`_group_sweep_polish`), until no single group move improves;
- ``tabu_steps`` (default 150): tabu search (:func:`_group_tabu_search`). Every step each row takes
  its best group move even uphill; a group that just changed stays fixed for ``tabu_tenure`` steps
  unless its move reaches a new best for the row, and each row keeps the best mask it visited, so
  the guarantee above is unchanged. Its first steps descend as the sweep does, one group per row
  and step; later ones leave the local optima where the sweep stops. On MiniLM at 2:4 it reaches a
  lower error than the sweep in less time (``docs/formulations/layerwise.md``).

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

whose inner minimum is a :math:`n \times n` solve per candidate set (:func:`_group_sweep_polish`
with ``values``); for ``row`` and ``unstructured`` a row swaps one kept weight for a pruned one at
its best value (:func:`_joint_swap_polish`). With the damped Gram the objective is the
reconstruction's own (up to a constant for a fixed support), so sweeps and re-solves alternate as
exact block-coordinate descent and the damped objective never increases. A row whose plain error
ends above the least squares on the Frank-Wolfe mask keeps that, so ``reconstruct_sweeps`` never
makes a row worse.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import ClassVar

import numpy as np
import torch

from constrainedsparse.config import Bounds, Hyperparameters, OneOf, hyperparameter, nested
from constrainedsparse.layerwise.base import LayerProblem, LayerResult, LayerwiseSolver, register_solver, wanda_scores
from constrainedsparse.sets import FeasibleSet, NMSparse, RowTopK, TopK

__all__ = ["FWConfig", "FWSolver", "FrankWolfeRun", "frank_wolfe", "reconstruct_rows"]

STEPS = ("line_search", "open_loop")
_DENSE_FRACTION = 0.05
# A group move of the sweeps must lower its row's objective by more than this fraction of it.
_MIN_RELATIVE_GAIN = 1e-6
# Largest binom(m, n) the N:M group search enumerates (4:8 has 70); larger patterns skip it.
MAX_GROUP_CHOICES = 256


@dataclasses.dataclass
class SearchConfig(Hyperparameters):
    """The local searches after rounding (keys ``polish_steps``, ``polish_sweeps``, ``tabu_steps``, ``tabu_tenure``).

    Args:
        polish_steps: Maximum steps of the exact swap local search after rounding for ``row`` and
            ``unstructured`` (0: off).
        polish_sweeps: Maximum sweeps of the exact group-wise local search after rounding for
            ``nm`` (0: off, the default: the tabu search does better in less time). Like the tabu
            search and the joint sweeps, only where a group has at most ``MAX_GROUP_CHOICES`` = 256
            kept sets, e.g. up to 4:8; larger patterns skip the group search
            (``fw/group_search_skipped``).
        tabu_steps: Steps of the tabu search over ``nm`` group moves (:func:`_group_tabu_search`),
            after the group sweep if any (0: off).
        tabu_tenure: Steps during which a group that just changed may not change again (unless
            the move reaches its row's best objective so far), at least 1.
    """

    error_prefix: ClassVar[str] = "fw: "

    polish_steps: int = hyperparameter(
        60, "max steps of the swap search after rounding, row and unstructured (0: off)", Bounds(low=0, integer=True)
    )
    polish_sweeps: int = hyperparameter(
        0, "max sweeps of the N:M group search after rounding (0: off)", Bounds(low=0, integer=True)
    )
    tabu_steps: int = hyperparameter(
        150, "steps of the N:M tabu search, after the group sweeps if any (0: off)", Bounds(low=0, integer=True)
    )
    tabu_tenure: int = hyperparameter(
        20, "steps during which a group that just changed stays tabu", Bounds(low=1, integer=True)
    )


@dataclasses.dataclass
class ReconstructionConfig(Hyperparameters):
    r"""The least-squares reconstruction (keys ``reconstruct``, ``damp``, ``reconstruct_*``).

    Args:
        reconstruct: Re-solve the kept weights by damped least squares after rounding.
        damp: Damping :math:`\lambda` of the reconstruction as a fraction of the mean of diag(G).
        reconstruct_iterations: Conjugate-gradient iterations of the reconstruction, at least 1.
        reconstruct_sweeps: With ``reconstruct``, rounds of reconstruction-aware local search
            (masks and kept weights chosen jointly: a group sweep for ``nm``, up to
            ``polish_steps`` swap steps otherwise), each followed by a least-squares re-solve
            (0: least squares on the Frank-Wolfe mask only).
    """

    error_prefix: ClassVar[str] = "fw: "

    reconstruct: bool = hyperparameter(False, "re-solve the kept weights by damped least squares after rounding")
    damp: float = hyperparameter(
        0.01, "damping of the least squares as a fraction of the mean of diag(G)", Bounds(low=0, finite=True)
    )
    reconstruct_iterations: int = hyperparameter(
        30, "conjugate-gradient iterations of the least squares", Bounds(low=1, integer=True)
    )
    reconstruct_sweeps: int = hyperparameter(
        2, "rounds of joint mask-and-weight search, each re-solved (0: least squares only)", Bounds(low=0, integer=True)
    )


@dataclasses.dataclass
class FWConfig(Hyperparameters):
    """Hyperparameters of :class:`FWSolver` (``--set key=value``; keys are flat whatever the group).

    Args:
        alpha: Fraction of every unit's budget fixed to the highest Wanda scores, in ``[0, 1)``.
        iterations: Frank-Wolfe iterations, at least 1.
        step: ``"line_search"`` (exact, per row where the pattern allows) or ``"open_loop"``
            (:math:`2/(t+2)`, the paper's).
        search: The local searches after rounding (:class:`SearchConfig`).
        reconstruction: The least-squares reconstruction (:class:`ReconstructionConfig`).
        trace_every: Iterations between two sampled trace entries (the last one is always kept).
        refresh_every: Iterations between two dense recomputations of the incremental products.
    """

    error_prefix: ClassVar[str] = "fw: "

    alpha: float = hyperparameter(
        0.5,
        "fraction of every unit's budget fixed to the top Wanda scores",
        Bounds(low=0, high=1, high_inclusive=False),
    )
    iterations: int = hyperparameter(20, "Frank-Wolfe iterations", Bounds(low=1, integer=True))
    step: str = hyperparameter("line_search", "step size rule (open_loop: 2/(t+2), the paper's)", OneOf(STEPS))
    search: SearchConfig = nested(SearchConfig, "local searches after rounding")
    reconstruction: ReconstructionConfig = nested(ReconstructionConfig, "least-squares reconstruction")
    trace_every: int = hyperparameter(1, "iterations between two sampled trace entries", Bounds(low=1, integer=True))
    refresh_every: int = hyperparameter(
        50, "iterations between two dense recomputations of the incremental products", Bounds(low=1, integer=True)
    )


class _Face:
    r"""The face of the mask hull on which the :math:`\lfloor\alpha k\rfloor` top-scored weights are 1.

    Its linear minimisation oracle is the pattern's own oracle with the remaining budget, run on
    the free coordinates only: every unit has the same number of fixed weights, so the free
    coordinates gather into a dense tensor of the same pattern (``row``: rows of
    :math:`d_{in} - \lfloor\alpha k\rfloor`; ``nm``: groups of :math:`m - \lfloor\alpha n\rfloor`
    with budget :math:`n - \lfloor\alpha n\rfloor`; ``unstructured``: one flat vector), in their
    original order, so the sets' lower-index tie-breaking is unchanged. The oracle's cost shrinks
    with the free fraction.

    Raises:
        ValueError: For a pattern other than ``row``, ``unstructured`` and ``nm``.
    """

    def __init__(self, feasible: FeasibleSet, alpha: float, scores: torch.Tensor) -> None:
        if not isinstance(feasible, (RowTopK, TopK, NMSparse)):
            raise ValueError(f"fw supports the row, unstructured and nm patterns, got {feasible!r}")
        face = feasible.face(alpha, scores.shape)
        fixed_set, self.free_set, self.free_shape = face.fixed, face.free, face.free_shape
        self.fixed = fixed_set.mask(scores) if fixed_set is not None else torch.zeros_like(scores, dtype=torch.bool)
        self.free_index = (~self.fixed).reshape(-1).nonzero()[:, 0]

    def lmo(self, grad: torch.Tensor) -> torch.Tensor:
        r"""Free part of the vertex minimising :math:`\langle \nabla, V\rangle` on the face (0/1, flat)."""
        free_grad = grad.reshape(-1).index_select(0, self.free_index).reshape(self.free_shape)
        return self.free_set.lmo(free_grad, only_negative=True).reshape(-1)

    def vertex(self, chosen: torch.Tensor) -> torch.Tensor:
        """The full 0/1 vertex: the fixed weights and the ``chosen`` free coordinates."""
        vertex = self.fixed.to(chosen.dtype)
        vertex.view(-1).index_copy_(0, self.free_index, chosen)
        return vertex


def _flat_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a flat boolean tensor (NumPy's on CPU: several times faster)."""
    if flags.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return flags.nonzero()[:, 0]


class _VertexProduct:
    r"""Maintains :math:`Q = (W \odot V)G` across consecutive vertices by sparse differences.

    Consecutive Frank-Wolfe vertices differ in few coordinates, so
    :math:`Q \mathrel{+}= (W \odot (V_t - V_{t-1}))G` costs :math:`O(\mathrm{nnz}(\Delta V)\, d_{in})`;
    a dense product is used for the first vertex, on request, and when more than ``_DENSE_FRACTION``
    of the entries changed (measured break-even of a sparse against a dense product on CPU). Only
    free coordinates can change, so the change is found on the face's compact free vector.
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, free_index: torch.Tensor) -> None:
        self.weight, self.gram, self.free_index = weight, gram, free_index
        self.chosen: torch.Tensor | None = None
        self.product = torch.empty(0)
        self.sparse_updates = 0
        self.dense_updates = 0

    def update(self, chosen: torch.Tensor, vertex: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """Returns :math:`(W \\odot V)G` for the new vertex (``chosen``: its free part, flat).

        The returned tensor is updated in place by the next sparse update.
        """
        if self.chosen is not None and not dense:
            changed = _flat_nonzero(chosen != self.chosen)
            if changed.numel() <= _DENSE_FRACTION * vertex.numel():
                flat = self.free_index[changed]
                delta = (chosen[changed] - self.chosen[changed]) * self.weight.reshape(-1)[flat]
                d_in = vertex.shape[1]
                index = torch.stack((flat // d_in, flat % d_in))
                # Ascending flat indices without repeats: already coalesced, row-major.
                diff = torch.sparse_coo_tensor(index, delta, vertex.shape, is_coalesced=True, check_invariants=False)
                self.product.addmm_(diff, self.gram)
                self.chosen = chosen
                self.sparse_updates += 1
                return self.product
        self.chosen = chosen
        self.product = (self.weight * vertex) @ self.gram
        self.dense_updates += 1
        return self.product


def _row_errors(weight: torch.Tensor, wg: torch.Tensor, kept_product: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Per-row objective :math:`D_i G D_i^\top = \langle D_i, (WG - (W \odot M)G)_i\rangle`, float64."""
    return ((weight * ~mask) * (wg - kept_product)).sum(dim=1, dtype=torch.float64)


def _residual_row_errors(weight: torch.Tensor, gram: torch.Tensor, weight_hat: torch.Tensor) -> torch.Tensor:
    r"""Per-row error :math:`(w_i - \hat w_i)\, G\, (w_i - \hat w_i)^\top`, float64."""
    residual = weight - weight_hat
    return ((residual @ gram) * residual).sum(dim=1, dtype=torch.float64)


@dataclasses.dataclass
class FrankWolfeRun:
    """Outcome of :func:`frank_wolfe` on one layer.

    Args:
        mask: The relaxed iterate :math:`M \\in [0, 1]` (fixed entries exactly 1).
        kept_product: The incrementally maintained :math:`P = (W \\odot M)G`.
        start_product: :math:`(W \\odot M_0)G` of the start mask.
        fixed: Boolean mask of the fixed weights.
        objectives: :math:`f(M_t)` before every iteration and after the last, float64 (the first
            and the last computed from scratch, the others updated by the exact quadratic change
            of each step).
        gaps: Duality gap :math:`\\langle\\nabla f(M_t), M_t - V_t\\rangle` of every iteration.
        sparse_updates: Vertex products updated by sparse differences.
        dense_updates: Vertex products computed densely.
    """

    mask: torch.Tensor
    kept_product: torch.Tensor
    start_product: torch.Tensor
    fixed: torch.Tensor
    objectives: list[float]
    gaps: list[float]
    sparse_updates: int
    dense_updates: int


def frank_wolfe(
    weight: torch.Tensor,
    gram: torch.Tensor,
    feasible: FeasibleSet,
    start: torch.Tensor,
    scores: torch.Tensor,
    config: FWConfig,
    wg: torch.Tensor | None = None,
) -> FrankWolfeRun:
    r"""Frank-Wolfe on the face of the mask hull where the top ``alpha`` share of ``scores`` is fixed.

    Args:
        weight: :math:`W`, ``(d_out, d_in)``.
        gram: :math:`G`, ``(d_in, d_in)``, same dtype as ``weight``.
        feasible: The layer's pattern (``RowTopK``, ``TopK`` or ``NMSparse``).
        start: Boolean start mask in the pattern containing the fixed weights (the Wanda mask).
        scores: Scores choosing the fixed weights (Wanda's).
        config: ``alpha``, ``iterations``, ``step``, ``refresh_every`` are used.
        wg: :math:`WG` if already computed.

    Returns:
        The relaxed iterate and its history.
    """
    face = _Face(feasible, config.alpha, scores)
    row_separable = not isinstance(feasible, TopK)
    wg = weight @ gram if wg is None else wg
    mask = start.to(weight.dtype)
    kept = (weight * mask) @ gram
    start_product = kept.clone()
    vertices = _VertexProduct(weight, gram, face.free_index)
    objective = float(((weight - weight * mask) * (wg - kept)).sum(dtype=torch.float64))
    objectives: list[float] = []
    gaps: list[float] = []
    for t in range(config.iterations):
        refresh = t > 0 and t % config.refresh_every == 0
        if refresh:
            kept = (weight * mask) @ gram
            objective = float(((weight - weight * mask) * (wg - kept)).sum(dtype=torch.float64))
        # ∇f = -2 W⊙(WG - P); the oracle is invariant to the positive factor 2.
        weighted_residual = weight * (wg - kept)
        chosen = face.lmo(-weighted_residual)
        vertex = face.vertex(chosen)
        direction = vertex - mask
        row_gaps = 2.0 * (weighted_residual * direction).sum(dim=1, dtype=torch.float64)
        objectives.append(objective)
        gaps.append(float(row_gaps.sum()))
        step_product = vertices.update(chosen, vertex, dense=refresh) - kept
        # f(M + γΔ) = f(M) - γ gap + γ² ⟨W⊙Δ, (W⊙Δ)G⟩ with (W⊙Δ)G = Q - P.
        quadratic = ((weight * direction) * step_product).sum(dim=1, dtype=torch.float64)
        if not row_separable:
            row_gaps, quadratic = row_gaps.sum(dim=0, keepdim=True), quadratic.sum(dim=0, keepdim=True)
        if config.step == "open_loop":
            gamma = torch.full_like(row_gaps, 2.0 / (t + 2.0))
        else:
            # The exact minimiser, per row where rows are independent (row, N:M), else for the layer.
            gamma = torch.where(quadratic > 0, row_gaps / (2.0 * quadratic).clamp_min(1e-300), 1.0).clamp(0.0, 1.0)
        objective += float((gamma * (gamma * quadratic - row_gaps)).sum())
        gamma_column = gamma.to(weight.dtype).unsqueeze(1)
        mask.addcmul_(gamma_column, direction)
        kept.addcmul_(gamma_column, step_product)
    objectives.append(float(((weight - weight * mask) * (wg - kept)).sum(dtype=torch.float64)))
    return FrankWolfeRun(
        mask, kept, start_product, face.fixed, objectives, gaps, vertices.sparse_updates, vertices.dense_updates
    )


@register_solver("fw")
class FWSolver(LayerwiseSolver):
    """Frank-Wolfe over the mask hull with an α-fixed Wanda warm start (Roux et al. 2025)."""

    description = (
        "Frank-Wolfe on the convex hull of masks from an alpha-fixed Wanda warm start (+ swap polish, N:M tabu search)"
    )
    Config = FWConfig

    def prune(self, layer: LayerProblem) -> LayerResult:
        """Prunes ``layer`` (``layer.weight`` is not modified)."""
        cfg: FWConfig = self.config
        start_time = time.perf_counter()
        feasible = layer.feasible_set()
        if not isinstance(feasible, (RowTopK, TopK, NMSparse)):
            raise ValueError(f"fw supports the row, unstructured and nm patterns, got {layer.target.pattern!r}")
        # Contiguous float32: the flat views and NumPy fast paths below need it.
        weight = layer.weight.detach().to(torch.float32).contiguous()
        gram = layer.gram.detach().to(torch.float32).contiguous()
        row_separable = not isinstance(feasible, TopK)
        scores = wanda_scores(weight, gram)
        wanda = feasible.mask(scores)
        wg = weight @ gram
        run = frank_wolfe(weight, gram, feasible, wanda, scores, cfg, wg=wg)
        start_rows = _row_errors(weight, wg, run.start_product, wanda)

        # Fixed weights outrank every free value in [0, 1]; the set's own mask rounds (ties by index).
        rounded = feasible.mask(run.mask + 2.0 * run.fixed.to(run.mask.dtype))
        rounded_product = (weight * rounded) @ gram
        rounded_rows = _row_errors(weight, wg, rounded_product, rounded)
        # The polish starts from the rounded mask even where Wanda's is better: the polished rounded
        # mask is the better one far more often than the polished Wanda mask.
        polished, polished_rows, polish_steps, swaps, tabu_improved = rounded, rounded_rows, 0, 0, 0
        nm = isinstance(feasible, NMSparse)
        # The group sweep enumerates every kept set of a group: only for small N:M (4:8 has 70).
        group_search = not nm or math.comb(feasible.m, feasible.n) <= MAX_GROUP_CHOICES
        if nm and group_search:
            if cfg.search.polish_sweeps > 0:
                polished, _, polished_rows, polish_steps, swaps = _group_sweep_polish(
                    weight, gram, rounded, feasible.m, cfg.search.polish_sweeps, residual=wg - rounded_product
                )
            if cfg.search.tabu_steps > 0:
                # The sweep does not return its C; without a sweep the rounded mask's is at hand.
                residual = wg - rounded_product if polished is rounded else None
                polished, polished_rows, tabu_improved = _group_tabu_search(
                    weight, gram, polished, feasible.m, cfg.search.tabu_steps, cfg.search.tabu_tenure, residual=residual
                )
        elif not nm and cfg.search.polish_steps > 0:
            polished, polished_rows, polish_steps, swaps = _swap_polish(
                weight, gram, rounded, cfg.search.polish_steps, residual=wg - rounded_product
            )
        if row_separable:
            better = polished_rows < start_rows
        else:
            better = torch.full_like(
                polished_rows, float(polished_rows.sum()) < float(start_rows.sum()), dtype=torch.bool
            )
        final = torch.where(better.unsqueeze(1), polished, wanda)
        final_rows = torch.where(better, polished_rows, start_rows)
        weight_hat = layer.weight.detach() * final
        joint_changes = 0
        if cfg.reconstruction.reconstruct:
            final, weight_hat, reconstructed_rows, joint_changes = self._reconstruct(
                layer, weight, gram, final, feasible, group_search
            )

        trace = [
            {"iteration": float(t), "objective": run.objectives[t], "gap": run.gaps[t]}
            for t in range(cfg.iterations)
            if t % cfg.trace_every == 0 or t == cfg.iterations - 1
        ]
        metrics = {
            "fw/iterations": float(cfg.iterations),
            "fw/objective_start": float(start_rows.sum()),
            "fw/objective_relaxed": run.objectives[-1],
            "fw/objective_rounded": float(rounded_rows.sum()),
            "fw/objective_final": float(final_rows.sum()),
            "fw/gap_last": run.gaps[-1],
            "fw/lower_bound": run.objectives[-2] - run.gaps[-1],
            "fw/sparse_updates": float(run.sparse_updates),
            "fw/dense_updates": float(run.dense_updates),
            "fw/polish_steps": float(polish_steps),
            "fw/swaps": float(swaps),
            "fw/tabu_improved_rows": float(tabu_improved),
            "fw/joint_changes": float(joint_changes),
            "fw/group_search_skipped": float(not group_search),
            "fw/seconds": time.perf_counter() - start_time,
        }
        if cfg.reconstruction.reconstruct:
            # fw/objective_final is the mask-only polished mask's; this is what the layer returns.
            metrics["fw/objective_reconstructed"] = float(reconstructed_rows.sum())
        return LayerResult(weight=weight_hat, mask=final, metrics=metrics, trace=trace)

    def _reconstruct(
        self,
        layer: LayerProblem,
        weight: torch.Tensor,
        gram: torch.Tensor,
        mask: torch.Tensor,
        feasible: FeasibleSet,
        group_search: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        r"""Kept weights by damped least squares on ``mask``, then joint mask-and-weight local search.

        Each of ``reconstruct_sweeps`` rounds runs one reconstruction-aware sweep of
        :func:`_group_sweep_polish` (``nm``) or :func:`_joint_swap_polish` (``row``,
        ``unstructured``) on :math:`G + \lambda I` (the damped objective whose minimiser
        on a fixed support is the least-squares solution) and re-solves the kept weights from
        there, warm-started, with a third of ``reconstruct_iterations``. Rows whose plain error
        ends above the least squares on ``mask`` keep that.

        Returns:
            The final mask, its kept weights (dtype of ``layer.weight``), their per-row error
            (float64) and the number of group replacements of the joint sweeps.
        """
        cfg: FWConfig = self.config
        original = layer.weight.detach()
        solved = reconstruct_rows(
            original, layer.gram.detach(), mask, cfg.reconstruction.damp, cfg.reconstruction.reconstruct_iterations
        )
        plain_rows = _residual_row_errors(weight, gram, solved.to(weight.dtype))
        if cfg.reconstruction.reconstruct_sweeps == 0 or not group_search:
            return mask, solved, plain_rows, 0
        lam = cfg.reconstruction.damp * float(gram.diagonal().mean())
        damped = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        joint_mask, values, changes = mask, solved.to(weight.dtype), 0
        warm_iterations = max(1, cfg.reconstruction.reconstruct_iterations // 3)
        for _ in range(cfg.reconstruction.reconstruct_sweeps):
            if isinstance(feasible, NMSparse):
                joint_mask, values, _, _, changed = _group_sweep_polish(
                    weight, damped, joint_mask, feasible.m, 1, values=values
                )
            else:
                joint_mask, values, _, _, changed = _joint_swap_polish(
                    weight, damped, joint_mask, values, cfg.search.polish_steps
                )
            # Warm re-solves start next to the solution: a third of the iterations suffices (measured).
            values = reconstruct_rows(weight, gram, joint_mask, cfg.reconstruction.damp, warm_iterations, start=values)
            changes += changed
            if changed == 0:
                break
        joint_rows = _residual_row_errors(weight, gram, values)
        keep = joint_rows <= plain_rows
        return (
            torch.where(keep.unsqueeze(1), joint_mask, mask),
            torch.where(keep.unsqueeze(1), values.to(original.dtype), solved),
            torch.where(keep, joint_rows, plain_rows),
            changes,
        )


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
    product per iteration, every row with its own CG scalars), started from the mask-only weights
    :math:`w_S` or from ``start``. CG decreases the row's damped objective
    :math:`\|(w - u)X\|^2 + \lambda\|u_S - w_S\|^2` at every iteration, which bounds the plain error
    from above and equals the mask-only error at the mask-only start, so any iteration count keeps
    the error at or below the mask-only error; with as many iterations as kept weights the solve is
    exact (up to round-off). A row whose result is nonetheless worse in floating point than its
    start keeps the start.

    Args:
        weight: Dense weight, ``(d_out, d_in)``.
        gram: :math:`G`, ``(d_in, d_in)``.
        mask: Boolean support, ``(d_out, d_in)``.
        damp: :math:`\lambda` as a fraction of the mean of diag(G) (0: no damping).
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
    inverse_diag = 1.0 / (g.diagonal() + lam).clamp_min(torch.finfo(dtype).tiny)
    z = residual * inverse_diag
    direction = z.clone()
    rho = (residual * z).sum(dim=1, keepdim=True)
    zero = torch.zeros_like(rho)
    for _ in range(iterations):
        applied = (direction @ g) * support + lam * direction
        curvature = (direction * applied).sum(dim=1, keepdim=True)
        step = torch.where(curvature > 0, rho / curvature.clamp_min(torch.finfo(dtype).tiny), zero)
        x += step * direction
        residual -= step * applied
        z = residual * inverse_diag
        rho_next = (residual * z).sum(dim=1, keepdim=True)
        beta = torch.where(rho > 0, rho_next / rho.clamp_min(torch.finfo(dtype).tiny), zero)
        direction = z + beta * direction
        rho = rho_next
    x = x * support
    solved_rows, initial_rows = _residual_row_errors(w, g, x), _residual_row_errors(w, g, initial)
    x = torch.where((solved_rows <= initial_rows).unsqueeze(1), x, initial)
    return x.to(weight.dtype)


def _row_argmin(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, argmin)`` of every row; NumPy's on CPU, several times faster than torch's there."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        index = torch.from_numpy(x.numpy().argmin(axis=-1))
    else:
        index = x.argmin(dim=-1)
    return torch.take_along_dim(x, index.unsqueeze(-1), dim=-1).squeeze(-1), index


def _swap_polish(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    max_steps: int,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    r"""Exact one-in-one-out local search on a binary mask, within every row.

    With :math:`D = W \odot (1 - M)` and :math:`C = DG`, pruning a kept weight :math:`j` of row
    :math:`i` and restoring a pruned weight :math:`l` of the same row changes that row's objective
    by exactly

    .. math::

        \Delta_{jl} = \underbrace{2 w_j c_j + w_j^2 G_{jj}}_{a_j}
            + \underbrace{w_l^2 G_{ll} - 2 w_l c_l}_{b_l} - 2 w_j w_l G_{jl} .

    Every step takes, per row, the better of :math:`j^\star = \arg\min a` with its best partner
    :math:`\arg\min_l (b_l - 2 w_{j^\star} w_l G_{j^\star l})` and :math:`l^\star = \arg\min b` with
    its best partner, and applies it when :math:`\Delta < 0`; then
    :math:`C_i \mathrel{+}= w_j G_j - w_l G_l`. The objective decreases strictly and every row keeps
    its count (so ``row`` and ``unstructured`` patterns hold). A row without an improving candidate
    swap keeps its mask for good (rows do not interact), so it leaves the active set: a step costs
    :math:`O(d_{in})` per active row. This is a heuristic local search — other swaps of the row may
    still improve, it is not a certificate of 1-swap optimality.

    Args:
        weight: :math:`W`, ``(d_out, d_in)``.
        gram: :math:`G`, ``(d_in, d_in)``, same dtype.
        mask: Boolean start mask (not modified).
        max_steps: Maximum number of steps.
        residual: :math:`C = (W \odot (1 - M))G` of the start mask if already known.

    Returns:
        The improved mask (a new tensor), its per-row objective (float64), the number of steps
        and the number of swaps applied.
    """
    mask = mask.clone()
    d_out = weight.shape[0]
    inf = float("inf")
    active = torch.arange(d_out, device=weight.device)
    w, m = weight, mask.clone()
    twice_w = 2.0 * w
    w2 = weight * weight * gram.diagonal()
    c_all = (weight * ~mask) @ gram if residual is None else residual.clone()
    c = c_all
    # Additive +inf penalties: far cheaper than torch.where/masked_fill on CPU, updated per swap.
    off_pruned = torch.zeros_like(w).masked_fill_(~m, inf)
    off_kept = torch.zeros_like(w).masked_fill_(m, inf)
    swaps = steps = 0
    for steps in range(1, max_steps + 1):  # noqa: B007 - the count is returned
        rows = torch.arange(len(active), device=weight.device)
        twice_wc = twice_w * c
        a = (w2 + twice_wc).add_(off_pruned)
        b = (w2 - twice_wc).add_(off_kept)
        a_best, j = _row_argmin(a)
        b_best, k = _row_argmin(b)
        b_partner, k2 = _row_argmin(torch.addcmul(b, twice_w * w[rows, j].unsqueeze(1), gram[j], value=-1.0))
        a_partner, j2 = _row_argmin(torch.addcmul(a, twice_w * w[rows, k].unsqueeze(1), gram[k], value=-1.0))
        first = a_best + b_partner <= b_best + a_partner
        moved = torch.where(first, a_best + b_partner, b_best + a_partner) < 0
        if not bool(moved.any()):
            break
        sr = rows[moved]
        sj, sl = torch.where(first, j, j2)[moved], torch.where(first, k2, k)[moved]
        c[sr] += w[sr, sj].unsqueeze(1) * gram[sj] - w[sr, sl].unsqueeze(1) * gram[sl]
        m[sr, sj] = False
        m[sr, sl] = True
        off_pruned[sr, sj], off_kept[sr, sj] = inf, 0.0
        off_pruned[sr, sl], off_kept[sr, sl] = 0.0, inf
        swaps += len(sr)
        if not bool(moved.all()):
            # Rows without an improving swap are final: write them back and drop them.
            mask[active[~moved]] = m[~moved]
            c_all[active[~moved]] = c[~moved]
            active, w, m, c = active[moved], w[moved], m[moved], c[moved]
            twice_w, w2, off_pruned, off_kept = twice_w[moved], w2[moved], off_pruned[moved], off_kept[moved]
    mask[active] = m
    if c is not c_all:
        c_all[active] = c
    rows = ((weight * ~mask) * c_all).sum(dim=1, dtype=torch.float64)
    return mask, rows, steps, swaps


def _joint_swap_polish(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    r"""Reconstruction-aware one-in-one-out swaps within every row (kept values free).

    With kept weights :math:`\hat w` (zero outside the mask), :math:`r = w - \hat w` and
    :math:`c = rG`, pruning a kept weight :math:`j` and restoring a pruned :math:`l` at its best
    value :math:`u = (c_l + \hat w_j G_{jl}) / G_{ll}` changes the row's objective by exactly

    .. math::

        \Delta_{jl} = \underbrace{2 \hat w_j c_j + \hat w_j^2 G_{jj}}_{a_j}
            - \frac{(c_l + \hat w_j G_{jl})^2}{G_{ll}} .

    Every step takes, per row, the better of :math:`j^\star = \arg\min a` with its best partner
    and :math:`l^\star = \arg\max c_l^2 / G_{ll}` with its best partner, applies it when it gains
    more than a relative floor, and updates :math:`c \mathrel{+}= \hat w_j G_j - u\, G_l`. The
    objective decreases strictly and every row keeps its count (the ``row`` and ``unstructured``
    counterpart of :func:`_group_sweep_polish` with ``values``).

    Args:
        weight: :math:`W`, ``(d_out, d_in)``.
        gram: :math:`G` (the damped :math:`G + \lambda I` for a reconstruction), same dtype.
        mask: Boolean start mask (not modified).
        values: Start kept weights (zero outside ``mask``).
        max_steps: Maximum number of steps.

    Returns:
        The improved mask, its kept weights, its per-row objective (float64), the number of
        steps and the number of swaps applied.
    """
    mask, kept = mask.clone(), values.clone()
    inf = float("inf")
    rows = torch.arange(weight.shape[0], device=weight.device)
    diagonal = gram.diagonal()
    inverse_diagonal = torch.where(diagonal > 0, 1.0 / diagonal.clamp_min(torch.finfo(diagonal.dtype).tiny), 0.0)
    c = (weight - kept) @ gram
    floor = _MIN_RELATIVE_GAIN * ((weight - kept) * c).sum(dim=1).clamp_min(0.0)
    # Additive +inf penalties (as in _swap_polish): cheaper than masked_fill on CPU, updated per swap.
    off_pruned = torch.zeros_like(kept).masked_fill_(~mask, inf)
    off_kept = torch.zeros_like(kept).masked_fill_(mask, inf)
    swaps = steps = 0
    for steps in range(1, max_steps + 1):  # noqa: B007 - the count is returned
        prune_cost = (kept * kept * diagonal + 2.0 * kept * c).add_(off_pruned)
        restore_gain = (-c * c * inverse_diagonal).add_(off_kept)
        drop_cost, drop = _row_argmin(prune_cost)
        _, add = _row_argmin(restore_gain)
        after_drop = c + kept[rows, drop].unsqueeze(1) * gram[drop]
        add_gain, add_partner = _row_argmin((-after_drop * after_drop * inverse_diagonal).add_(off_kept))
        drive = c[rows, add].unsqueeze(1) + kept * gram[add]
        pair_change, drop_partner = _row_argmin(prune_cost - drive * drive * inverse_diagonal[add].unsqueeze(1))
        first = drop_cost + add_gain <= pair_change
        change = torch.where(first, drop_cost + add_gain, pair_change)
        moved = change < -floor
        if not bool(moved.any()):
            break
        sr = rows[moved]
        sj, sl = torch.where(first, drop, drop_partner)[moved], torch.where(first, add_partner, add)[moved]
        pruned_value = kept[sr, sj]
        restored = (c[sr, sl] + pruned_value * gram[sj, sl]) * inverse_diagonal[sl]
        c[sr] += pruned_value.unsqueeze(1) * gram[sj] - restored.unsqueeze(1) * gram[sl]
        kept[sr, sj], kept[sr, sl] = 0.0, restored
        mask[sr, sj], mask[sr, sl] = False, True
        off_pruned[sr, sj], off_kept[sr, sj] = inf, 0.0
        off_pruned[sr, sl], off_kept[sr, sl] = 0.0, inf
        swaps += len(sr)
    row_errors = ((weight - kept) * c).sum(dim=1, dtype=torch.float64)
    return mask, kept, row_errors, steps, swaps


@dataclasses.dataclass(frozen=True)
class _KeptSets:
    """All :math:`\\binom{m}{n}` kept sets of one N:M group (6 for 2:4, 70 for 4:8).

    Args:
        choices: ``(count, m)`` 0/1 rows, one per kept set.
        index: ``(count, n)`` the kept positions of every set.
        code: ``(m,)`` powers of two: a group's 0/1 mask times ``code``, summed, is its code.
        of_code: ``(2**m,)`` the set's row in ``choices`` of every code (-1 for other counts).
    """

    choices: torch.Tensor
    index: torch.Tensor
    code: torch.Tensor
    of_code: torch.Tensor

    @classmethod
    def of(cls, n: int, m: int, dtype: torch.dtype, device: torch.device) -> _KeptSets:
        """The kept sets of ``n`` out of ``m``."""
        combinations = list(itertools.combinations(range(m), n))
        choices = torch.tensor(
            [[1.0 if i in chosen else 0.0 for i in range(m)] for chosen in combinations], dtype=dtype, device=device
        )
        index = torch.tensor(combinations, dtype=torch.long, device=device).reshape(len(combinations), n)
        code = 2 ** torch.arange(m, device=device)
        of_code = torch.full((2**m,), -1, dtype=torch.long, device=device)
        of_code[(choices.long() * code).sum(dim=1)] = torch.arange(len(combinations), device=device)
        return cls(choices, index, code, of_code)

    def of_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The row in ``choices`` of every group of a boolean ``(d_out, groups * m)`` mask, ``(d_out, groups)``."""
        return self.of_code[(mask.reshape(mask.shape[0], -1, self.code.shape[0]).long() * self.code).sum(dim=2)]


def _diagonal_blocks(gram: torch.Tensor, group: int) -> torch.Tensor:
    """The ``(d / group, group, group)`` diagonal blocks of a ``(d, d)`` matrix, one per group."""
    index = torch.arange(gram.shape[0], device=gram.device).reshape(-1, group)
    return gram[index.unsqueeze(2), index.unsqueeze(1)]


def _group_sweep_polish(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    max_sweeps: int,
    residual: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    block: int = 128,
    max_rounds: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    r"""Exact group-wise local search on an N:M mask, block by block (SparseGPT-style lazy updates).

    The state is the kept weights :math:`\hat W` (zero outside the mask) with the residual
    :math:`R = W - \hat W` and :math:`C = RG`. A group :math:`g` of a row may replace its kept set by
    any of the :math:`\binom{m}{n}` kept sets :math:`t`, which changes :math:`R` on the group by some
    :math:`\delta` and the row's objective :math:`R G R^\top` by exactly

    .. math::

        \Delta = 2\langle \delta, c_g\rangle + \delta\, G_{gg}\, \delta^\top

    when the other groups stay. The weights outside :math:`t` are pruned, :math:`\delta_{\bar t} =
    \hat w_{\bar t}`. Without ``values`` (masks only) the kept weights are the original ones,
    :math:`\delta_t = \hat w_t - w_t`. With ``values`` (reconstruction-aware, the kept weights are
    free) the kept ones take their best values given everything else,

    .. math::

        \delta_t = -G_{tt}^{+}\big(c_t + G_{t\bar t}\, \hat w_{\bar t}\big),

    an exact block-coordinate step on the joint objective over masks and weights. Columns are
    processed in blocks of ``block``; inside a block, rounds evaluate every group's best
    replacement at once and apply, per row, all improving ones together when the batch's exact
    change :math:`2\langle E, c_b\rangle + E\, G_{bb}\, E^\top` is negative, else only that row's
    single best one, until no group of the block improves (at most ``max_rounds``). So the
    objective never increases and every group keeps its count. :math:`C` stays exact inside the
    block by products with :math:`G_{bb}`, and for the other columns by one product with the
    block's accumulated change (a sweep costs about one :math:`d_{out} d_{in}^2` product). A move
    must gain more than ``_MIN_RELATIVE_GAIN`` (1e-6) of its row's objective; a row that a sweep
    leaves unchanged is final and skipped by later sweeps, which stop when one changes nothing.
    Every group of ``mask`` must keep the same number of weights (true of the N:M set's masks); it
    is read from the first group.

    Args:
        weight: :math:`W`, ``(d_out, d_in)``.
        gram: :math:`G` (the damped :math:`G + \lambda I` for a reconstruction), same dtype.
        mask: Boolean start mask (not modified).
        group: :math:`m`.
        max_sweeps: Maximum number of sweeps over all columns.
        residual: :math:`C = (W - \hat W)G` of the start if already known.
        values: Start kept weights :math:`\hat W` (zero outside ``mask``): turns on the
            reconstruction-aware moves. ``None``: :math:`\hat W = W \odot M` and masks only.
        block: Columns per block (rounded down to a multiple of ``group``).
        max_rounds: Maximum rounds per block.

    Returns:
        The improved mask, its kept weights, its per-row objective (float64), the number of
        sweeps and the number of group replacements applied.
    """
    mask = mask.clone()
    d_out, d_in = weight.shape
    n = int(mask[0, :group].sum())
    dtype, device = weight.dtype, weight.device
    reoptimise = values is not None
    kept = weight * mask if values is None else values.clone()
    kept_sets = _KeptSets.of(n, group, dtype, device)
    block = max(group, block // group * group)
    c = (weight - kept) @ gram if residual is None else residual.clone()
    changes = sweeps = 0
    active = torch.arange(d_out, device=device)
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 - the count is returned
        # Rows do not interact: a row that no sweep changed is final, so later sweeps skip it.
        sub_weight, sub_mask, sub_kept, sub_c = weight[active], mask[active], kept[active], c[active]
        # A move must gain more than a relative floor: continuous values only converge in the limit.
        floor = _MIN_RELATIVE_GAIN * ((sub_weight - sub_kept) * sub_c).sum(dim=1).clamp_min(0.0)
        moved, changed = _group_sweep_blocks(
            sub_weight, gram, sub_mask, sub_kept, sub_c, kept_sets, block, max_rounds, reoptimise, floor
        )
        mask[active], kept[active], c[active] = sub_mask, sub_kept, sub_c
        changes += changed
        active = active[moved]
        if changed == 0:
            break
    row_errors = ((weight - kept) * c).sum(dim=1, dtype=torch.float64)
    return mask, kept, row_errors, sweeps, changes


def _group_sweep_blocks(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    kept: torch.Tensor,
    c: torch.Tensor,
    kept_sets: _KeptSets,
    block: int,
    max_rounds: int,
    reoptimise: bool,
    floor: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """One sweep of :func:`_group_sweep_polish` over all blocks; updates ``mask``, ``kept``, ``c`` in place.

    Returns:
        Which rows changed, and the number of group replacements.
    """
    d_out, d_in = weight.shape
    choices, chosen_index = kept_sets.choices, kept_sets.index
    count, n = chosen_index.shape
    group = choices.shape[1]
    dtype, device = weight.dtype, weight.device
    rows = torch.arange(d_out, device=device)
    moved = torch.zeros(d_out, dtype=torch.bool, device=device)
    changes = 0
    for c1 in range(0, d_in, block):
        c2 = min(c1 + block, d_in)
        groups, width = (c2 - c1) // group, c2 - c1
        w_block = weight[:, c1:c2].reshape(d_out, groups, group)
        g_block = gram[c1:c2, c1:c2]
        g_groups = _diagonal_blocks(g_block, group)
        if reoptimise:
            # (groups, choices, n, n): the kept set's block of G, pseudo-inverted (G may be singular).
            g_kept = g_groups[:, chosen_index.unsqueeze(2), chosen_index.unsqueeze(1)]
            g_kept_inverse = torch.linalg.pinv(g_kept, hermitian=True)
            gather_index = chosen_index.reshape(count, 1, 1, n).expand(-1, d_out, groups, -1)
        current = kept_sets.of_mask(mask[:, c1:c2])
        x_block = kept[:, c1:c2].reshape(d_out, groups, group).clone()
        c_block = c[:, c1:c2].clone()
        change = torch.zeros(d_out, width, dtype=dtype, device=device)
        for _ in range(max_rounds):
            c_groups = c_block.reshape(d_out, groups, group)
            # delta[s, r, g]: change of R on group g of row r when it takes kept set s. The weights
            # outside s are pruned (δ = ŵ); on s, masks only restore w (δ = ŵ - w), while the joint
            # search starts from δ = 0 there and solves for the best values below.
            restored = x_block if reoptimise else w_block
            delta = x_block.unsqueeze(0) - restored.unsqueeze(0) * choices.reshape(-1, 1, 1, group)
            pushed = torch.einsum("srgm,gmk->srgk", delta, g_groups)
            gain = (delta * (2.0 * c_groups + pushed)).sum(3)  # Δ = 2<δ, c_g> + δ G δᵀ
            if reoptimise:
                drive = (c_groups.unsqueeze(0) + pushed).gather(3, gather_index)
                solved = torch.einsum("srgn,gsnk->srgk", drive, g_kept_inverse)
                # Δ at the optimal δ_s = -G_ss⁺ drive: lower by drive G_ss⁺ driveᵀ.
                gain -= (solved * drive).sum(3)
                delta.scatter_(3, gather_index, -solved)
            gain = gain.permute(1, 2, 0)
            best, pick = gain.min(dim=2)
            improving = best < -floor.unsqueeze(1)
            if not bool(improving.any()):
                break
            moves = delta.gather(0, pick.reshape(1, d_out, groups, 1).expand(1, -1, -1, group))[0]
            moves = moves.reshape(d_out, width)
            batch = moves * improving.repeat_interleave(group, dim=1)
            batch_delta = 2.0 * (batch * c_block).sum(dim=1) + ((batch @ g_block) * batch).sum(dim=1)
            take_batch = batch_delta < 0
            best_row, best_group = best.min(dim=1)
            single = ~take_batch & (best_row < -floor)
            chosen = improving & take_batch.unsqueeze(1)
            chosen[rows[single], best_group[single]] = True
            step = moves * chosen.repeat_interleave(group, dim=1)
            current = torch.where(chosen, pick, current)
            x_block -= step.reshape(d_out, groups, group)
            c_block += step @ g_block
            change += step
            changes += int(chosen.sum())
            moved |= chosen.any(dim=1)
        mask[:, c1:c2] = choices[current].bool().reshape(d_out, width)
        # Exact zeros outside the mask (round-off of the residual updates must not leak weight).
        kept[:, c1:c2] = x_block.reshape(d_out, width) * mask[:, c1:c2]
        if bool(change.any()):
            outside = change @ gram[c1:c2]
            outside[:, c1:c2] = 0.0
            c += outside
        c[:, c1:c2] = c_block
    return moved, changes


def _group_tabu_search(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    steps: int,
    tenure: int,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    r"""Tabu search over N:M group moves on a binary mask, every row at once (masks only).

    A descent over single-group moves, such as the sweep of :func:`_group_sweep_polish`, stops in
    a local optimum: no single group can change its kept set for the better. Tabu search descends
    from any start mask and moves on from such optima. At every step each row takes its best move
    even if it raises the objective, except moves of a group that changed in the last ``tenure``
    steps (tabu), which stay allowed when they reach a new best objective for the row (aspiration);
    the row returns the best mask it visited. With :math:`C = (W \odot (1 - M))G`,
    a group :math:`g` taking kept set :math:`s` changes the residual by
    :math:`\delta = w_g \odot (m_g - s)` and the row's objective by exactly

    .. math::

        \Delta = 2\langle \delta, c_g\rangle + \delta\, G_{gg}\, \delta^\top
        = 2\sum_{j} (m_{g,j} - s_j)\, w_j c_j + (m_g - s)^\top Q_g\, (m_g - s),
        \qquad Q_g = \operatorname{diag}(w_g)\, G_{gg} \operatorname{diag}(w_g),

    so one step scores every move of every group with one :math:`(d_{out} \cdot d_{in}/m) \times m
    \times \binom{m}{n}` product; the quadratic term
    :math:`m_g^\top Q_g m_g - 2 s^\top Q_g m_g + s^\top Q_g s` changes only for the moved group,
    and :math:`C` follows by a sparse product with the move's :math:`m` changed weights, so a step
    costs :math:`O(d_{out}\, d_{in} (\binom{m}{n} / m + m))`.

    Args:
        weight: :math:`W`, ``(d_out, d_in)``.
        gram: :math:`G`, ``(d_in, d_in)``, same dtype.
        mask: Boolean N:M start mask (not modified); every group keeps as many as the first.
        group: :math:`m`.
        steps: Number of steps.
        tenure: Steps during which a changed group is tabu.
        residual: :math:`C = (W \odot (1 - M))G` of ``mask`` if already known.

    Returns:
        The best visited mask of every row, its per-row objective computed from scratch (float64;
        a row keeps ``mask`` unless the visited one is better in this exact objective), and the
        number of rows improved.
    """
    d_out, d_in = weight.shape
    groups = d_in // group
    slots = d_out * groups
    n = int(mask[0, :group].sum())
    dtype, device = weight.dtype, weight.device
    inf = float("inf")
    kept_sets = _KeptSets.of(n, group, dtype, device)
    choices, count = kept_sets.choices, kept_sets.choices.shape[0]
    rows = torch.arange(d_out, device=device)
    offsets = torch.arange(group, device=device)
    slot_offsets = torch.arange(slots, device=device)
    w_groups = weight.reshape(d_out, groups, group)
    q_blocks = w_groups.unsqueeze(3) * _diagonal_blocks(gram, group) * w_groups.unsqueeze(2)
    q_flat = q_blocks.reshape(slots, group, group)  # Q_g of every (row, group)
    outer = (choices.unsqueeze(2) * choices.unsqueeze(1)).reshape(count, group * group)
    set_quadratic_flat = q_flat.reshape(slots, group * group) @ outer.T  # sᵀ Q_g s, (slots, count)

    def quadratic_terms(q_sel: torch.Tensor, set_sel: torch.Tensor, current_sel: torch.Tensor) -> torch.Tensor:
        """(m_g - s)ᵀ Q_g (m_g - s) for every set s, set-major; +inf for the current one (no move)."""
        kept_now = choices[current_sel]
        q_kept = (q_sel @ kept_now.unsqueeze(-1)).squeeze(-1)
        terms = set_sel + (q_kept * kept_now).sum(-1, keepdim=True) - 2.0 * q_kept @ choices.T
        return terms.scatter_(-1, current_sel.unsqueeze(-1), inf).reshape(-1, count).T

    # Set-major (count, d_out * groups) so that the best set of every group is an elementwise minimum.
    current = kept_sets.of_mask(mask).reshape(-1)
    quadratic = quadratic_terms(q_flat, set_quadratic_flat, current).contiguous()
    current_entry = current * slots + slot_offsets  # where `gain` holds every group's current set
    minus_twice_choices = -2.0 * choices
    pruned = weight * ~mask
    c = pruned @ gram if residual is None else residual.clone()
    start_rows = (pruned * c).sum(dim=1, dtype=torch.float64)
    objective, best_objective = start_rows.clone(), start_rows.clone()
    best = current.reshape(d_out, groups).clone()
    # A group moved at step s is tabu in steps s + 1 .. s + tenure; moved_at[k] holds the slots moved
    # at the steps s ≡ k (mod tenure + 1), whose tabu ends when the step comes round again.
    tabu_until = torch.zeros(slots, dtype=torch.long, device=device)
    penalty = torch.zeros(d_out, groups, dtype=dtype, device=device)
    moved_at: list[torch.Tensor | None] = [None] * (tenure + 1)
    wc = torch.empty_like(c)
    gain = torch.empty(count, slots, dtype=dtype, device=device)
    for step in range(steps):
        expiring = moved_at[step % (tenure + 1)]
        if expiring is not None:
            penalty.view(-1)[expiring] = torch.where(tabu_until[expiring] > step, inf, 0.0)
        torch.mul(weight, c, out=wc)
        # Δ of every move: the quadratic term - 2 Σ_{j∈s} w_j c_j + 2 Σ_{j∈m_g} w_j c_j.
        torch.mm(minus_twice_choices, wc.reshape(slots, group).T, out=gain)
        twice_current = gain.reshape(-1).take(current_entry).neg_()
        group_gain = gain.add_(quadratic).amin(dim=0).add_(twice_current).reshape(d_out, groups)
        any_gain, any_group = _row_argmin(group_gain)
        free_gain, free_group = _row_argmin(group_gain.add_(penalty))
        aspire = objective + any_gain < best_objective - _MIN_RELATIVE_GAIN * best_objective.abs()
        change = torch.where(aspire, any_gain, free_gain)
        moved_group = torch.where(aspire, any_group, free_group)
        moved_rows = rows
        ok = torch.isfinite(change)
        if not bool(ok.all()):
            if not bool(ok.any()):
                break
            moved_rows, moved_group, change = rows[ok], moved_group[ok], change[ok]
        moved_slots = moved_rows * groups + moved_group
        new_set = _row_argmin(gain.T[moved_slots])[1]
        delta = w_groups.reshape(slots, group)[moved_slots] * (choices[current[moved_slots]] - choices[new_set])
        columns = moved_group.unsqueeze(1) * group + offsets
        coordinates = torch.stack((moved_rows.repeat_interleave(group), columns.reshape(-1)))
        # Row-major and without repeats: already coalesced.
        step_change = torch.sparse_coo_tensor(
            coordinates, delta.reshape(-1), (d_out, d_in), is_coalesced=True, check_invariants=False
        )
        c.addmm_(step_change, gram)
        current[moved_slots] = new_set
        current_entry[moved_slots] = new_set * slots + moved_slots
        quadratic[:, moved_slots] = quadratic_terms(q_flat[moved_slots], set_quadratic_flat[moved_slots], new_set)
        objective[moved_rows] += change.to(torch.float64)
        tabu_until[moved_slots] = step + 1 + tenure
        penalty.view(-1)[moved_slots] = inf
        moved_at[step % (tenure + 1)] = moved_slots
        better = objective < best_objective
        best_objective = torch.where(better, objective, best_objective)
        best[better] = current.reshape(d_out, groups)[better]
    found = choices[best].bool().reshape(d_out, d_in)
    found_rows = _residual_row_errors(weight, gram, weight * found)
    improved = found_rows < start_rows
    final = torch.where(improved.unsqueeze(1), found, mask)
    return final, torch.where(improved, found_rows, start_rows), int(improved.sum())
