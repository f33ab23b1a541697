r"""Baseline layer-wise solvers: ``magnitude``, ``wanda`` and ``sparsegpt``.

All three prune one layer :math:`W \in \mathbb{R}^{d_{out} \times d_{in}}` to the target pattern
from its calibration Gram matrix :math:`G = X X^\top` (see :mod:`constrainedsparse.layerwise.base`),
choosing masks only through the layer's feasible set (:mod:`constrainedsparse.sets`):

* ``magnitude`` keeps the largest :math:`|W_{ij}|`: :math:`M = \operatorname{mask}_C(|W|)`,
  :math:`\hat W = W \odot M`.
* ``wanda`` (Sun et al. 2024) keeps the largest :math:`S_{ij} = |W_{ij}|\,\|X_j\|_2` with
  :math:`\|X_j\|_2^2 = G_{jj}`; :math:`\hat W = W \odot M`. With the ``row`` pattern this is
  Wanda's per-output comparison group, with ``nm`` its N:M variant, with ``unstructured`` one
  comparison over the whole layer.
* ``sparsegpt`` (Frantar & Alistarh 2023) sweeps the columns in order and, after pruning each
  column, updates the later columns by optimal brain surgeon (OBS) so that the error
  :math:`\operatorname{tr}((W - \hat W) H (W - \hat W)^\top)` stays small, with
  :math:`H = G + \lambda I`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import torch

from constrainedsparse.config import Bounds, Hyperparameters, hyperparameter
from constrainedsparse.errors import user_stacklevel
from constrainedsparse.layerwise.base import LayerProblem, LayerResult, LayerwiseSolver, register_solver, wanda_scores
from constrainedsparse.sets import FeasibleSet, NMSparse, RowTopK, TopK, keep_count

__all__ = ["Magnitude", "SparseGPT", "SparseGPTConfig", "Wanda"]

_SUB_BLOCK = 16


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with exact zeros outside ``mask`` (a new tensor)."""
    return weight.masked_fill(~mask, 0)


@register_solver("magnitude")
class Magnitude(LayerwiseSolver):
    r"""Keeps the largest-magnitude weights: :math:`M = \operatorname{mask}_C(|W|)`, :math:`\hat W = W \odot M`."""

    description: ClassVar[str] = "keep the largest |W_ij| in the target pattern; kept weights unchanged"

    def keeps_dense_weights(self) -> bool:
        return True

    def prune(self, layer: LayerProblem) -> LayerResult:
        """Prunes ``layer`` by weight magnitude (the Gram matrix is not used)."""
        mask = layer.feasible_set().mask(layer.weight)
        return LayerResult(weight=_masked(layer.weight, mask), mask=mask)


@register_solver("wanda")
class Wanda(LayerwiseSolver):
    r"""Wanda: keeps the largest :math:`S_{ij} = |W_{ij}| \sqrt{G_{jj}}`; :math:`\hat W = W \odot M`."""

    description: ClassVar[str] = "Wanda: keep the largest |W_ij|*||X_j|| in the target pattern; kept weights unchanged"

    def keeps_dense_weights(self) -> bool:
        return True

    def prune(self, layer: LayerProblem) -> LayerResult:
        """Prunes ``layer`` by Wanda scores (per output row for ``row``, N:M groups for ``nm``)."""
        layer.checked_shape()
        mask = layer.feasible_set().mask(wanda_scores(layer.weight, layer.gram))
        return LayerResult(weight=_masked(layer.weight, mask), mask=mask)


@dataclasses.dataclass
class SparseGPTConfig(Hyperparameters):
    r"""Hyperparameters of ``sparsegpt``.

    Attributes:
        blocksize: Columns per lazy-update block :math:`B`; the mask of a block is chosen when the
            sweep reaches it (for ``nm`` it is rounded down to a multiple of M, at least M).
        damp: Relative damping :math:`\delta`: :math:`H = G + \delta\,\overline{\operatorname{diag} G}\, I`.
        damp_retries: How many times the damping is multiplied by 10 when :math:`H` is still not
            positive definite, before falling back to the Wanda mask without weight update.
    """

    error_prefix: ClassVar[str] = "sparsegpt: "
    blocksize: int = hyperparameter(128, "columns per lazy-update block", Bounds(low=1, integer=True))
    damp: float = hyperparameter(
        0.01, "relative damping of H = G + damp * mean(diag G) * I", Bounds(low=0, low_inclusive=False, finite=True)
    )
    damp_retries: int = hyperparameter(
        3, "times the damping is multiplied by 10 before falling back to Wanda", Bounds(low=0, integer=True)
    )


def _inverse_upper_cholesky(hessian: torch.Tensor, shift: float) -> torch.Tensor | None:
    r"""Upper Cholesky factor :math:`U` of :math:`(H + \text{shift}\, I)^{-1} = U^\top U`, or ``None``.

    With the order-reversing permutation :math:`P` and the Cholesky factor :math:`P H P = L L^\top`,
    :math:`H^{-1} = (P L^{-\top} P)(P L^{-1} P)` and :math:`U = P L^{-1} P` is upper triangular with a
    positive diagonal, i.e. the factor the reference gets from ``cholesky(cholesky_inverse(cholesky(H)),
    upper=True)``, for one factorisation and one triangular solve. ``None`` when the factorisation
    fails (``cholesky_ex``'s ``info`` is nonzero) or its diagonal is not finite: no exception is raised
    for a matrix that is not positive definite.
    """
    damped = hessian.flip(0, 1)
    damped.diagonal().add_(shift)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0 or not bool(torch.isfinite(lower.diagonal()).all()):
        return None
    identity = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)


def _warn_dead_inputs(name: str, dead: torch.Tensor, mask: torch.Tensor) -> None:
    """Warns when inputs that are zero on every calibration token took weights the mask keeps: SparseGPT (as its
    authors' code) sets those weights to 0, so the layer ends sparser than its target."""
    zeroed = int(mask[:, dead].sum()) if bool(dead.any()) else 0
    if zeroed:
        warnings.warn(
            f"{name}: {int(dead.sum())} of its {dead.numel()} inputs are zero on every calibration token; "
            f"sparsegpt (as its authors' code) sets their weights to 0, {zeroed} of them kept by the mask, so the "
            "layer ends sparser than its target (its error on the calibration data is unchanged): calibrate on "
            "more data, or prune with wanda or fw, which keep them",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


@register_solver("sparsegpt")
class SparseGPT(LayerwiseSolver):
    r"""SparseGPT (Frantar & Alistarh 2023): OBS column sweep with adaptive masks per block.

    **Hessian.** :math:`H = G` in float64; a dead input (:math:`G_{jj} = 0`, so its whole row and
    column are zero) gets :math:`H_{jj} = 1` and :math:`W_{:,j} = 0` (its weights do not act on
    the calibration outputs), as in the authors' code: the layer then ends sparser than its target
    if the mask keeps any of them, which a ``UserWarning`` names. Then :math:`H \leftarrow H + \lambda I` with
    :math:`\lambda = \delta \cdot \operatorname{mean}(\operatorname{diag} H)`, and
    :math:`U` is the upper Cholesky factor of :math:`H^{-1} = U^\top U` (from one Cholesky
    factorisation of the reversed :math:`H`, see :func:`_inverse_upper_cholesky`). If the
    factorisation fails, :math:`\delta` is multiplied by 10 up to ``damp_retries`` times; if it
    still fails the layer gets the Wanda mask without weight update and
    ``metrics["sparsegpt/fallback"] = 1``.

    **Sweep.** Columns are processed in blocks of :math:`B`. For column :math:`j` with current
    (already updated) weights :math:`w = W_{:,j}` and kept part :math:`q = w \odot M_{:,j}`, the
    OBS update of the later columns is

    .. math::

        e = (w - q) / U_{jj}, \qquad W_{:,k} \leftarrow W_{:,k} - e\, U_{jk} \quad (k > j),

    applied at once inside the block and lazily (:math:`W_{:,>b} \mathrel{-}= E_b U_{b,>b}`) after
    it. The pruning saliency of weight :math:`(i, j)` is :math:`W_{ij}^2 / U_{jj}^2`, the OBS error
    of pruning it alone given the columns before :math:`j` are fixed (:math:`U_{jj}^2` is the
    first diagonal entry of :math:`(H_{\ge j, \ge j})^{-1}`), evaluated on the weights as they are
    when the sweep reaches the block (for ``nm``: the group); the mask keeps the largest ones:

    * ``row``: per output row within each block, with the block's keep count
      :math:`k(c_2) - k(c_1)` for block columns :math:`[c_1, c_2)` and
      :math:`k(c) = \mathrm{keep\_count}(c, s)`, so the per-row total is exactly the
      layer's :math:`k(d_{in})`;
    * ``unstructured``: over the flattened block with :math:`k(d_{out} c_2) - k(d_{out} c_1)`, so
      the layer total is exact;
    * ``nm``: per group of M columns, chosen when the sweep reaches the group's first column (the
      block size is rounded to a multiple of M so that no group straddles two blocks);
    * ``structured`` (whole output rows): rows are independent and a pruned row cannot be
      compensated, so the rows with the largest :math:`w_i G w_i^\top` are kept, unchanged.

    ``metrics``: ``sparsegpt/fallback`` (0 or 1), ``sparsegpt/damp`` (the relative damping
    :math:`\delta` actually used) and, without fallback, ``sparsegpt/damped_error`` =
    :math:`\|E\|_F^2`, which equals :math:`\operatorname{tr}((W' - \hat W) H (W' - \hat W)^\top)`
    for the damped :math:`H` and :math:`W'` = :math:`W` with dead inputs zeroed.
    """

    description: ClassVar[str] = (
        "SparseGPT: OBS column sweep (blocks, damped Cholesky of H^-1) with adaptive masks and weight updates"
    )
    Config: ClassVar[type] = SparseGPTConfig
    supported_patterns: ClassVar[tuple[str, ...]] = ("unstructured", "row", "N:M", "structured:rows")

    def prune(self, layer: LayerProblem) -> LayerResult:
        """Prunes ``layer`` and updates its kept weights (``layer.weight`` is not modified)."""
        d_out, d_in = layer.checked_shape()
        feasible = layer.feasible_set()
        config: SparseGPTConfig = self.config
        if layer.target.pattern == "structured":
            return self._structured(layer, feasible)

        hessian = layer.gram.to(torch.float64, copy=True)
        weight = layer.weight.to(torch.float64, copy=True)
        dead = hessian.diagonal() == 0
        hessian.diagonal()[dead] = 1.0
        weight[:, dead] = 0.0
        mean_diag = float(hessian.diagonal().mean())

        damp = float(config.damp)
        upper = _inverse_upper_cholesky(hessian, damp * mean_diag)
        for _ in range(config.damp_retries):
            if upper is not None:
                break
            damp *= 10.0
            upper = _inverse_upper_cholesky(hessian, damp * mean_diag)
        if upper is None:
            mask = feasible.mask(wanda_scores(layer.weight, layer.gram))
            metrics = {"sparsegpt/fallback": 1.0, "sparsegpt/damp": damp}
            return LayerResult(weight=_masked(layer.weight, mask), mask=mask, metrics=metrics)

        mask, pruned, damped_error = self._sweep(layer, weight, upper, d_out, d_in)
        assert feasible.contains(mask), f"{layer.name}: sparsegpt produced a mask outside {feasible!r}"
        metrics = {"sparsegpt/fallback": 0.0, "sparsegpt/damp": damp, "sparsegpt/damped_error": damped_error}
        _warn_dead_inputs(layer.name, dead, mask)
        return LayerResult(weight=pruned.to(layer.weight.dtype), mask=mask, metrics=metrics)

    def _sweep(
        self, layer: LayerProblem, weight: torch.Tensor, upper: torch.Tensor, d_out: int, d_in: int
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The blocked OBS sweep over ``weight`` (modified in place); returns (mask, Ŵ, ‖E‖²).

        Inside a block, rank-1 updates only touch the current sub-block of ``_SUB_BLOCK`` columns;
        the rest of the block gets the sub-block's errors in one matrix product. In exact
        arithmetic this is the reference's column-by-column update (updates are linear and the mask
        of a column is only read once all earlier columns' updates have reached it).
        """
        target = layer.target
        blocksize, sub = self.config.blocksize, _SUB_BLOCK
        nm: NMSparse | None = None
        if target.pattern == "nm":
            nm = NMSparse(*target.nm)
            blocksize = max(nm.m, blocksize // nm.m * nm.m)
            sub = max(nm.m, sub // nm.m * nm.m)
        mask = torch.zeros(d_out, d_in, dtype=torch.bool, device=weight.device)
        damped_error = 0.0
        for c1 in range(0, d_in, blocksize):
            c2 = min(c1 + blocksize, d_in)
            width = c2 - c1
            block = weight[:, c1:c2].clone()
            block_upper = upper[c1:c2, c1:c2]
            diag = block_upper.diagonal()
            errors = torch.zeros_like(block)
            if nm is None:
                block_mask = self._block_set(layer, c1, c2, d_out).mask(block.square() / diag.square())
            else:
                block_mask = torch.zeros_like(block, dtype=torch.bool)
            for s1 in range(0, width, sub):
                s2 = min(s1 + sub, width)
                for j in range(s1, s2):
                    if nm is not None and j % nm.m == 0:
                        group = slice(j, j + nm.m)
                        block_mask[:, group] = nm.mask(block[:, group].square() / diag[group].square())
                    err = block[:, j].masked_fill(block_mask[:, j], 0.0).div_(diag[j])
                    block[:, j:s2].addr_(err, block_upper[j, j:s2], alpha=-1.0)
                    errors[:, j] = err
                if s2 < width:
                    block[:, s2:].addmm_(errors[:, s1:s2], block_upper[s1:s2, s2:], alpha=-1.0)
            weight[:, c1:c2] = block.masked_fill_(~block_mask, 0.0)
            mask[:, c1:c2] = block_mask
            damped_error += float(errors.square().sum())
            if c2 < d_in:
                weight[:, c2:].addmm_(errors, upper[c1:c2, c2:], alpha=-1.0)
        return mask, weight, damped_error

    @staticmethod
    def _block_set(layer: LayerProblem, c1: int, c2: int, d_out: int) -> FeasibleSet:
        """The feasible set of block columns ``[c1, c2)`` whose keep counts sum to the layer's exactly."""
        sparsity = layer.target.sparsity
        if layer.target.pattern == "row":
            return RowTopK(keep_count(c2, sparsity) - keep_count(c1, sparsity))
        return TopK(keep_count(d_out * c2, sparsity) - keep_count(d_out * c1, sparsity))

    @staticmethod
    def _structured(layer: LayerProblem, feasible: FeasibleSet) -> LayerResult:
        r"""Whole output rows: keep the rows of largest output energy :math:`w_i G w_i^\top`, unchanged."""
        weight = layer.weight.to(torch.float64)
        energy = ((weight @ layer.gram.to(torch.float64)) * weight).sum(dim=1).clamp_min(0)
        scores = energy.sqrt().unsqueeze(1).expand_as(weight)
        mask = feasible.mask(scores)
        return LayerResult(weight=_masked(layer.weight, mask), mask=mask, metrics={"sparsegpt/fallback": 0.0})
