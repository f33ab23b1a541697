r"""The Frank-Wolfe core of ``fw``: the relaxation, its oracle on a face, the step size, the incremental products.

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
coordinates, starting from the Wanda mask. The oracle over that face (:class:`FaceCoordinates`,
on the pattern's :class:`~constrainedsparse.sets.Face`) is the pattern's own oracle
(:mod:`constrainedsparse.sets`) with the reduced budget, run on the free coordinates gathered in
order (``only_negative=True``: the hull of masks with *at most* the free budget, as in the paper).
The loop takes the same vertex on whole units, the fixed weights blocked by a ``-inf`` score
(:meth:`FaceCoordinates.chosen_full`): no gather and scatter of the free coordinates per iteration.

**Step size.** ``step="open_loop"`` is the paper's :math:`\gamma_t = 2/(t + 2)`. ``step="line_search"``
(default) minimises the quadratic exactly along :math:`V - M`: for a row-separable pattern (``row``,
``nm``) the objective is a sum of independent row objectives over a product of row hulls, so each
row gets its own step (:func:`step_sizes`)

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
instead of :math:`O(d_{out} d_{in}^2)` (:class:`VertexProduct`), and :math:`P \leftarrow P + \gamma
(Q - P)` follows the iterate exactly (recomputed densely every ``refresh_every`` iterations to bound
round-off drift). On real layers 18-34 % of the entries change per iteration, so after a dense
update that changed more than twice :data:`DENSE_FRACTION` the next one is taken dense without
counting the changes.

**Cost.** An iteration is one :math:`d_{out} d_{in}^2` product and about twenty passes over the
layer's :math:`d_{out} \times d_{in}` entries, written into preallocated buffers (fresh large
tensors cost page faults on CPU); row sums are taken in float32 and returned as float64, and boolean
masks become floats through a ``uint8`` view (:func:`as_float`, ~8x faster than ``.to`` on CPU).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from constrainedsparse.selection import topk_mask
from constrainedsparse.sets import Face, FeasibleSet, NMSparse, RowTopK, TopK

if TYPE_CHECKING:
    from constrainedsparse.layerwise.fw.config import FWConfig

__all__ = [
    "DENSE_FRACTION",
    "SUPPORTED_SETS",
    "FaceCoordinates",
    "FrankWolfeRun",
    "VertexProduct",
    "as_float",
    "frank_wolfe",
    "masked_row_errors",
    "require_supported",
    "residual_row_errors",
    "step_sizes",
]

# The patterns fw works on: row, unstructured and N:M (each has a face with fixed coordinates).
SUPPORTED_SETS: tuple[type[FeasibleSet], ...] = (RowTopK, TopK, NMSparse)
# Above this fraction of changed entries a dense vertex product is cheaper than a sparse update
# (measured break-even on CPU).
DENSE_FRACTION = 0.05


def require_supported(feasible: FeasibleSet, shown: object = None) -> None:
    """Checks that ``fw`` supports the pattern of ``feasible``.

    Args:
        feasible: The layer's feasible set.
        shown: What the message names as the pattern (``None``: ``feasible`` itself).

    Raises:
        ValueError: For a pattern other than ``row``, ``unstructured`` and ``nm``.
    """
    if not isinstance(feasible, SUPPORTED_SETS):
        raise ValueError(
            f"fw supports the row, unstructured and nm patterns, got {feasible if shown is None else shown!r}"
        )


@dataclasses.dataclass(frozen=True)
class FaceCoordinates:
    r"""Where the coordinates of a pattern's :class:`~constrainedsparse.sets.Face` lie in one layer.

    Every unit has the same number of fixed weights, so the free coordinates gather, in their
    original order, into a dense tensor of ``face.free_shape`` with the same pattern (``row``: rows
    of :math:`d_{in} - \lfloor\alpha k\rfloor`; ``nm``: groups of :math:`m - \lfloor\alpha n\rfloor`
    with budget :math:`n - \lfloor\alpha n\rfloor`; ``unstructured``: one flat vector), so the
    sets' lower-index tie-breaking is unchanged and the oracle's cost shrinks with the free fraction.

    :meth:`chosen_full` gives the same vertex without gathering: the top remaining budget of every
    whole unit (:attr:`units` of the layer's shape, :attr:`budget`), the fixed coordinates blocked by
    a ``-inf`` score; the lower-index tie-breaking is the same, since the free coordinates keep their
    order (:func:`~constrainedsparse.selection.topk_mask`).

    Args:
        face: The pattern's face (fixed picker, free pattern, free shape).
        fixed: Boolean mask of the fixed weights.
        free_index: Flat indices of the free coordinates, ascending.
        units: The shape in which every row is one unit (``row``: the layer's rows, ``nm``: groups
            of :math:`m`, ``unstructured``: the flattened layer).
        budget: Each unit's free budget.
        blocked: ``-inf`` on the fixed weights, 0 elsewhere (the score's dtype).
    """

    face: Face
    fixed: torch.Tensor
    free_index: torch.Tensor
    units: tuple[int, int] = (0, 0)
    budget: int = 0
    blocked: torch.Tensor | None = None

    @classmethod
    def of(cls, feasible: FeasibleSet, alpha: float, scores: torch.Tensor) -> FaceCoordinates:
        r"""The face fixing the :math:`\lfloor\alpha k\rfloor` top-``scores`` weights of every unit.

        Raises:
            ValueError: For a pattern other than ``row``, ``unstructured`` and ``nm``.
        """
        require_supported(feasible)
        face = feasible.face(alpha, scores.shape)
        fixed = face.fixed.mask(scores) if face.fixed is not None else torch.zeros_like(scores, dtype=torch.bool)
        free = face.free
        if isinstance(feasible, NMSparse):
            assert isinstance(free, NMSparse)
            units, budget = (scores.numel() // feasible.m, feasible.m), free.n
        elif isinstance(feasible, RowTopK):
            assert isinstance(free, RowTopK)
            units, budget = (scores.shape[0], scores.numel() // scores.shape[0]), free.k
        else:
            assert isinstance(free, TopK)
            units, budget = (1, scores.numel()), free.k
        # -inf on the fixed weights: 1/1 - 1 = 0 and -(1/0 - 1) = -inf, without a (slow) masked fill on CPU.
        blocked = torch.reciprocal(as_float(~fixed, scores.dtype)).sub_(1.0).neg_()
        return cls(face, fixed, flat_nonzero((~fixed).reshape(-1)), units, budget, blocked)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The free coordinates of ``x``, in order, shaped ``face.free_shape``."""
        return x.reshape(-1).index_select(0, self.free_index).reshape(self.face.free_shape)

    def lmo(self, grad: torch.Tensor) -> torch.Tensor:
        r"""Free part of the vertex minimising :math:`\langle \nabla, V\rangle` on the face (0/1, flat)."""
        return self.face.free.lmo(self.gather(grad), only_negative=True).reshape(-1)

    def chosen_full(self, neg_grad: torch.Tensor) -> torch.Tensor:
        r"""The free part of :meth:`lmo`'s vertex given :math:`-\nabla`, boolean in the layer's shape.

        The top ``budget`` of every unit among its positive free entries (``only_negative``).
        """
        assert self.blocked is not None
        score = (neg_grad + self.blocked).view(self.units)
        if self.budget == 0:
            return torch.zeros_like(neg_grad, dtype=torch.bool)
        return (topk_mask(score, self.budget) & (score > 0)).view(neg_grad.shape)

    def vertex(self, chosen: torch.Tensor) -> torch.Tensor:
        """The full 0/1 vertex: the fixed weights and the ``chosen`` free coordinates (scattered)."""
        vertex = self.fixed.to(chosen.dtype)
        vertex.view(-1).index_copy_(0, self.free_index, chosen)
        return vertex


def as_float(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean tensor as 0/1 of ``dtype``, through a ``uint8`` view: ~8x faster than ``.to(dtype)`` on CPU."""
    return mask.view(torch.uint8).to(dtype)


def flat_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a flat boolean tensor (NumPy's on CPU: several times faster)."""
    if flags.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return flags.nonzero()[:, 0]


class VertexProduct:
    r"""Maintains :math:`Q = (W \odot V)G` across consecutive vertices by sparse differences.

    Consecutive Frank-Wolfe vertices differ in few coordinates, so
    :math:`Q \mathrel{+}= (W \odot (V_t - V_{t-1}))G` costs :math:`O(\mathrm{nnz}(\Delta V)\, d_{in})`;
    a dense product (in ``dtype`` when given: bfloat16 inputs, the result stored in the weight's
    dtype) is used for the first vertex, on request, and when more than
    :data:`DENSE_FRACTION` of the entries changed. After a dense update that changed more than
    twice that fraction the next vertex is taken dense without counting its changes (measured on
    real layers: 18-34 % of the entries change per iteration, so the count is a wasted pass).

    Attributes:
        sparse_updates: Products updated by sparse differences so far.
        dense_updates: Products computed densely so far.
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        self.weight, self.gram = weight, gram
        # Dense products in a lower precision (``dtype``): G rounded once, W ⊙ V at every product.
        self.low_gram = gram.to(dtype) if dtype is not None and dtype != gram.dtype else None
        self.vertex: torch.Tensor | None = None
        self.product = torch.empty(0)
        self.sparse_updates = 0
        self.dense_updates = 0
        self._count_changes = True

    def update(self, vertex: torch.Tensor, dense: bool = False) -> torch.Tensor:
        r"""Returns :math:`(W \odot V)G` for the new 0/1 ``vertex`` (the layer's shape, not modified).

        The returned tensor is updated in place by the next update.
        """
        if self.vertex is not None and not dense and self._count_changes:
            changed = flat_nonzero((vertex != self.vertex).reshape(-1))
            if changed.numel() <= DENSE_FRACTION * vertex.numel():
                delta = (vertex.reshape(-1)[changed] - self.vertex.reshape(-1)[changed]) * self.weight.reshape(-1)[
                    changed
                ]
                d_in = vertex.shape[1]
                index = torch.stack((changed // d_in, changed % d_in))
                # Ascending flat indices without repeats: already coalesced, row-major.
                diff = torch.sparse_coo_tensor(index, delta, vertex.shape, is_coalesced=True, check_invariants=False)
                self.product.addmm_(diff, self.gram)
                self.vertex.copy_(vertex)
                self.sparse_updates += 1
                return self.product
            self._count_changes = changed.numel() <= 2 * DENSE_FRACTION * vertex.numel()
        else:
            self._count_changes = True
        if self.vertex is None:
            self.vertex, self.product = vertex.clone(), torch.empty_like(self.weight)
        else:
            self.vertex.copy_(vertex)
        if self.low_gram is not None:
            self.product.copy_(torch.mm((self.weight * vertex).to(self.low_gram.dtype), self.low_gram))
        else:
            torch.mm(self.weight * vertex, self.gram, out=self.product)
        self.dense_updates += 1
        return self.product


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Row sums of ``x`` as float64: summed in ``x``'s dtype (pairwise, without a float64 copy of ``x``)."""
    return x.sum(dim=1).to(torch.float64)


def masked_row_errors(
    weight: torch.Tensor, wg: torch.Tensor, kept_product: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    r"""Per-row objective :math:`D_i G D_i^\top = \langle D_i, (WG - (W \odot M)G)_i\rangle`, float64."""
    return _row_sums((wg - kept_product).mul_(weight).mul_(as_float(~mask, weight.dtype)))


def residual_row_errors(weight: torch.Tensor, gram: torch.Tensor, weight_hat: torch.Tensor) -> torch.Tensor:
    r"""Per-row error :math:`(w_i - \hat w_i)\, G\, (w_i - \hat w_i)^\top`, float64."""
    residual = weight - weight_hat
    return _row_sums((residual @ gram).mul_(residual))


def _objective(weight: torch.Tensor, mask: torch.Tensor, wg: torch.Tensor, kept: torch.Tensor) -> float:
    r""":math:`f(M) = \langle W - W \odot M, WG - P\rangle` of a relaxed mask, in float64."""
    return float(_row_sums(torch.addcmul(weight, weight, mask, value=-1.0).mul_(wg - kept)).sum())


@dataclasses.dataclass
class FrankWolfeRun:
    r"""Outcome of :func:`frank_wolfe` on one layer.

    Args:
        mask: The relaxed iterate :math:`M \in [0, 1]` (fixed entries exactly 1).
        kept_product: The incrementally maintained :math:`P = (W \odot M)G`.
        start_product: :math:`(W \odot M_0)G` of the start mask.
        fixed: Boolean mask of the fixed weights.
        objectives: :math:`f(M_t)` before every iteration and after the last, float64 (the first
            and the last computed from scratch, the others updated by the exact quadratic change
            of each step).
        gaps: Duality gap :math:`\langle\nabla f(M_t), M_t - V_t\rangle` of every iteration.
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


def step_sizes(row_gaps: torch.Tensor, quadratic: torch.Tensor, iteration: int, rule: str) -> torch.Tensor:
    r"""Step sizes :math:`\gamma` of one iteration, one per entry of ``row_gaps``.

    Along :math:`\Delta = V - M` the objective is :math:`f(M + \gamma\Delta) = f(M) - \gamma g +
    \gamma^2 q` with the gap :math:`g` and :math:`q = \langle W \odot \Delta, (W \odot \Delta) G\rangle`.

    Args:
        row_gaps: Gaps :math:`g` (per row, or one for the layer), float64.
        quadratic: Curvatures :math:`q`, same shape.
        iteration: :math:`t`, from 0.
        rule: ``"open_loop"`` (:math:`2/(t + 2)`) or ``"line_search"`` (the exact minimiser
            :math:`\operatorname{clip}(g / 2q, 0, 1)`, 1 where :math:`q \le 0`).
    """
    if rule == "open_loop":
        return torch.full_like(row_gaps, 2.0 / (iteration + 2.0))
    return torch.where(quadratic > 0, row_gaps / (2.0 * quadratic).clamp_min(1e-300), 1.0).clamp(0.0, 1.0)


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
        config: ``alpha``, ``iterations``, ``step``, ``refresh_every``, ``product_dtype`` are used.
        wg: :math:`WG` if already computed.

    Returns:
        The relaxed iterate and its history.

    Raises:
        ValueError: For a pattern other than ``row``, ``unstructured`` and ``nm``.
    """
    face = FaceCoordinates.of(feasible, config.alpha, scores)
    # The exact line search is per row where rows are independent (row, N:M), else for the layer.
    row_separable = feasible.rows_independent
    wg = weight @ gram if wg is None else wg
    mask = as_float(start, weight.dtype)
    kept = torch.mm(torch.mul(weight, mask), gram)
    start_product = kept.clone()
    vertices = VertexProduct(weight, gram, getattr(torch, config.product_dtype))
    # Work buffers, written in place every iteration (fresh large tensors cost page faults on CPU).
    residual, direction, scratch = torch.empty_like(kept), torch.empty_like(kept), torch.empty_like(kept)
    step_product = torch.empty_like(kept)
    objective = _objective(weight, mask, wg, kept)
    objectives: list[float] = []
    gaps: list[float] = []
    for t in range(config.iterations):
        refresh = t > 0 and t % config.refresh_every == 0
        if refresh:
            torch.mm(torch.mul(weight, mask, out=scratch), gram, out=kept)
            objective = _objective(weight, mask, wg, kept)
        # ∇f = -2 W⊙(WG - P); the oracle is invariant to the positive factor 2.
        weighted_residual = torch.sub(wg, kept, out=residual).mul_(weight)
        vertex = as_float(face.chosen_full(weighted_residual) | face.fixed, weight.dtype)  # the oracle on -∇/2
        torch.sub(vertex, mask, out=direction)
        row_gaps = 2.0 * _row_sums(torch.mul(weighted_residual, direction, out=scratch))
        objectives.append(objective)
        gaps.append(float(row_gaps.sum()))
        torch.sub(vertices.update(vertex, dense=refresh), kept, out=step_product)
        # f(M + γΔ) = f(M) - γ gap + γ² ⟨W⊙Δ, (W⊙Δ)G⟩ with (W⊙Δ)G = Q - P.
        quadratic = _row_sums(torch.mul(weight, direction, out=scratch).mul_(step_product))
        if not row_separable:
            row_gaps, quadratic = row_gaps.sum(dim=0, keepdim=True), quadratic.sum(dim=0, keepdim=True)
        gamma = step_sizes(row_gaps, quadratic, t, config.step)
        objective += float((gamma * (gamma * quadratic - row_gaps)).sum())
        gamma_column = gamma.to(weight.dtype).unsqueeze(1)
        mask.addcmul_(gamma_column, direction)
        kept.addcmul_(gamma_column, step_product)
    objectives.append(_objective(weight, mask, wg, kept))
    return FrankWolfeRun(
        mask, kept, start_product, face.fixed, objectives, gaps, vertices.sparse_updates, vertices.dense_updates
    )
