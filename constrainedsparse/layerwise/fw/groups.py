r"""The N:M group sweep after rounding: every group takes its best kept set given the others.

**N:M search** (beyond the paper). For ``nm`` a unit is a group of M inputs, and a move gives one
group another of its :math:`\binom{m}{n}` kept sets (:class:`KeptSets`). Two searches are
available, in this order:

- ``polish_sweeps`` (default 0, off): block-coordinate descent, each group taking its best kept set
  given the others (:func:`group_sweep_polish`), until no single group move improves;
- ``tabu_steps`` (default 100): tabu search (:mod:`constrainedsparse.layerwise.fw.tabu`), which
  leaves the local optima where the sweep stops.

Both enumerate every kept set of a group, so they run only up to :data:`MAX_GROUP_CHOICES` kept
sets (4:8 has 70; :func:`group_search_applies`).

**The sweep's move.** The state is the kept weights :math:`\hat W` (zero outside the mask) with the
residual :math:`R = W - \hat W` and :math:`C = RG`. A group :math:`g` of a row may replace its kept
set by any kept set :math:`t`, which changes :math:`R` on the group by some :math:`\delta` and the
row's objective :math:`R G R^\top` by exactly

.. math::

    \Delta = 2\langle \delta, c_g\rangle + \delta\, G_{gg}\, \delta^\top

when the other groups stay. The weights outside :math:`t` are pruned, :math:`\delta_{\bar t} =
\hat w_{\bar t}`. Without ``values`` (masks only) the kept weights are the original ones,
:math:`\delta_t = \hat w_t - w_t`. With ``values`` (reconstruction-aware, the kept weights are
free: the **joint sweeps** of a reconstruction) the kept ones take their best values given
everything else,

.. math::

    \delta_t = -G_{tt}^{+}\big(c_t + G_{t\bar t}\, \hat w_{\bar t}\big),

an exact block-coordinate step on the joint objective over masks and weights.

**Blocks** (SparseGPT-style lazy updates). Columns are processed in blocks; inside a block, rounds
evaluate every group's best replacement at once and apply, per row, all improving ones together
when the batch's exact change :math:`2\langle E, c_b\rangle + E\, G_{bb}\, E^\top` is negative,
else only that row's single best one, until no group of the block improves (at most
``max_rounds``). So the objective never increases and every group keeps its count. :math:`C` stays
exact inside the block by products with :math:`G_{bb}`, and for the other columns by one product
with the block's accumulated change (a sweep costs about one :math:`d_{out} d_{in}^2` product). A
move must gain more than ``MIN_RELATIVE_GAIN`` (1e-6) of its row's objective; a row that a sweep
leaves unchanged is final and skipped by later sweeps, which stop when one changes nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from constrainedsparse.layerwise.fw.search import MIN_RELATIVE_GAIN, SearchResult
from constrainedsparse.sets import FeasibleSet, NMSparse

__all__ = ["MAX_GROUP_CHOICES", "KeptSets", "diagonal_blocks", "group_search_applies", "group_sweep_polish"]

# Largest binom(m, n) the N:M group search enumerates (4:8 has 70); larger patterns skip it.
MAX_GROUP_CHOICES = 256


def group_search_applies(feasible: FeasibleSet) -> bool:
    """Whether the group searches may run: not N:M, or at most :data:`MAX_GROUP_CHOICES` kept sets per group."""
    return not isinstance(feasible, NMSparse) or math.comb(feasible.m, feasible.n) <= MAX_GROUP_CHOICES


@dataclasses.dataclass(frozen=True)
class KeptSets:
    r"""All :math:`\binom{m}{n}` kept sets of one N:M group (6 for 2:4, 70 for 4:8).

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
    def of(cls, n: int, m: int, dtype: torch.dtype, device: torch.device) -> KeptSets:
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


def diagonal_blocks(gram: torch.Tensor, group: int) -> torch.Tensor:
    """The ``(d / group, group, group)`` diagonal blocks of a ``(d, d)`` matrix, one per group."""
    index = torch.arange(gram.shape[0], device=gram.device).reshape(-1, group)
    return gram[index.unsqueeze(2), index.unsqueeze(1)]


@dataclasses.dataclass
class _Sweep:
    """The rows one sweep works on; ``mask``, ``kept`` and ``c`` are updated in place.

    Args:
        weight: :math:`W` of the rows.
        gram: :math:`G` (or :math:`G + \\lambda I`).
        mask: Their boolean mask.
        kept: Their kept weights :math:`\\hat W`.
        c: :math:`C = (W - \\hat W)G`.
        kept_sets: The group's kept sets.
        reoptimise: Whether the kept values are free (joint sweep).
        floor: Per-row gain a move must exceed.
    """

    weight: torch.Tensor
    gram: torch.Tensor
    mask: torch.Tensor
    kept: torch.Tensor
    c: torch.Tensor
    kept_sets: KeptSets
    reoptimise: bool
    floor: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _KeptSolve:
    """The pseudo-inverted blocks :math:`G_{tt}^+` of every group and kept set, and where ``t`` lies."""

    inverse: torch.Tensor  # (groups, choices, n, n): G may be singular
    gather_index: torch.Tensor  # (choices, d_out, groups, n)

    @classmethod
    def of(cls, g_groups: torch.Tensor, kept_sets: KeptSets, d_out: int) -> _KeptSolve:
        """For the diagonal blocks ``g_groups`` of one column block and ``d_out`` rows."""
        chosen_index = kept_sets.index
        count, n = chosen_index.shape
        g_kept = g_groups[:, chosen_index.unsqueeze(2), chosen_index.unsqueeze(1)]
        gather_index = chosen_index.reshape(count, 1, 1, n).expand(-1, d_out, g_groups.shape[0], -1)
        return cls(torch.linalg.pinv(g_kept, hermitian=True), gather_index)


def _best_group_moves(
    x_block: torch.Tensor,
    w_block: torch.Tensor,
    c_block: torch.Tensor,
    g_groups: torch.Tensor,
    choices: torch.Tensor,
    solve: _KeptSolve | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every group's best replacement in one block: its change of the objective, the set, and every set's δ.

    Returns:
        ``best`` and ``pick``, ``(d_out, groups)``, and ``delta[s, r, g]``: the change of R on group
        g of row r when it takes kept set s.
    """
    d_out, groups, group = x_block.shape
    c_groups = c_block.reshape(d_out, groups, group)
    # The weights outside s are pruned (δ = ŵ); on s, masks only restore w (δ = ŵ - w), while the joint
    # search starts from δ = 0 there and solves for the best values below.
    restored = x_block if solve is not None else w_block
    delta = x_block.unsqueeze(0) - restored.unsqueeze(0) * choices.reshape(-1, 1, 1, group)
    pushed = torch.einsum("srgm,gmk->srgk", delta, g_groups)
    gain = (delta * (2.0 * c_groups + pushed)).sum(3)  # Δ = 2<δ, c_g> + δ G δᵀ
    if solve is not None:
        drive = (c_groups.unsqueeze(0) + pushed).gather(3, solve.gather_index)
        solved = torch.einsum("srgn,gsnk->srgk", drive, solve.inverse)
        # Δ at the optimal δ_s = -G_ss⁺ drive: lower by drive G_ss⁺ driveᵀ.
        gain -= (solved * drive).sum(3)
        delta.scatter_(3, solve.gather_index, -solved)
    gain = gain.permute(1, 2, 0)
    best, pick = gain.min(dim=2)
    return best, pick, delta


def _chosen_moves(
    moves: torch.Tensor,
    best: torch.Tensor,
    improving: torch.Tensor,
    c_block: torch.Tensor,
    g_block: torch.Tensor,
    floor: torch.Tensor,
) -> torch.Tensor:
    """Per row, all improving groups when their batch lowers the objective, else its single best one."""
    group = moves.shape[1] // best.shape[1]
    rows = torch.arange(moves.shape[0], device=moves.device)
    batch = moves * improving.repeat_interleave(group, dim=1)
    batch_delta = 2.0 * (batch * c_block).sum(dim=1) + ((batch @ g_block) * batch).sum(dim=1)
    take_batch = batch_delta < 0
    best_row, best_group = best.min(dim=1)
    single = ~take_batch & (best_row < -floor)
    chosen = improving & take_batch.unsqueeze(1)
    chosen[rows[single], best_group[single]] = True
    return chosen


def _sweep_block(sweep: _Sweep, c1: int, c2: int, max_rounds: int, moved: torch.Tensor) -> int:
    """Rounds of group moves on columns ``c1:c2``; flags the rows that changed in ``moved``.

    Returns:
        The number of group replacements.
    """
    weight, gram, kept_sets = sweep.weight, sweep.gram, sweep.kept_sets
    choices = kept_sets.choices
    group = choices.shape[1]
    d_out = weight.shape[0]
    groups, width = (c2 - c1) // group, c2 - c1
    w_block = weight[:, c1:c2].reshape(d_out, groups, group)
    g_block = gram[c1:c2, c1:c2]
    g_groups = diagonal_blocks(g_block, group)
    solve = _KeptSolve.of(g_groups, kept_sets, d_out) if sweep.reoptimise else None
    current = kept_sets.of_mask(sweep.mask[:, c1:c2])
    x_block = sweep.kept[:, c1:c2].reshape(d_out, groups, group).clone()
    c_block = sweep.c[:, c1:c2].clone()
    change = torch.zeros(d_out, width, dtype=weight.dtype, device=weight.device)
    changes = 0
    for _ in range(max_rounds):
        best, pick, delta = _best_group_moves(x_block, w_block, c_block, g_groups, choices, solve)
        improving = best < -sweep.floor.unsqueeze(1)
        if not bool(improving.any()):
            break
        moves = delta.gather(0, pick.reshape(1, d_out, groups, 1).expand(1, -1, -1, group))[0]
        moves = moves.reshape(d_out, width)
        chosen = _chosen_moves(moves, best, improving, c_block, g_block, sweep.floor)
        step = moves * chosen.repeat_interleave(group, dim=1)
        current = torch.where(chosen, pick, current)
        x_block -= step.reshape(d_out, groups, group)
        c_block += step @ g_block
        change += step
        changes += int(chosen.sum())
        moved |= chosen.any(dim=1)
    sweep.mask[:, c1:c2] = choices[current].bool().reshape(d_out, width)
    # Exact zeros outside the mask (round-off of the residual updates must not leak weight).
    sweep.kept[:, c1:c2] = x_block.reshape(d_out, width) * sweep.mask[:, c1:c2]
    if bool(change.any()):
        outside = change @ gram[c1:c2]
        outside[:, c1:c2] = 0.0
        sweep.c += outside
    sweep.c[:, c1:c2] = c_block
    return changes


def group_sweep_polish(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    max_sweeps: int,
    residual: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    block: int = 128,
    max_rounds: int = 1,
) -> SearchResult:
    r"""Exact group-wise local search on an N:M mask, block by block (see the module docstring).

    Every group of ``mask`` must keep the same number of weights (true of the N:M set's masks); it
    is read from the first group. The objective never increases and every group keeps its count.

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
        The improved mask, its kept weights, its per-row objective, the number of sweeps (``steps``)
        and of group replacements (``moves``).
    """
    mask = mask.clone()
    d_out, d_in = weight.shape
    n = int(mask[0, :group].sum())
    kept = weight * mask if values is None else values.clone()
    kept_sets = KeptSets.of(n, group, weight.dtype, weight.device)
    block = max(group, block // group * group)
    c = (weight - kept) @ gram if residual is None else residual.clone()
    changes = sweeps = 0
    active = torch.arange(d_out, device=weight.device)
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 - the count is returned
        # Rows do not interact: a row that no sweep changed is final, so later sweeps skip it.
        sub_weight, sub_kept, sub_c = weight[active], kept[active], c[active]
        # A move must gain more than a relative floor: continuous values only converge in the limit.
        floor = MIN_RELATIVE_GAIN * ((sub_weight - sub_kept) * sub_c).sum(dim=1).clamp_min(0.0)
        sweep = _Sweep(sub_weight, gram, mask[active], sub_kept, sub_c, kept_sets, values is not None, floor)
        moved = torch.zeros(len(active), dtype=torch.bool, device=weight.device)
        changed = 0
        for c1 in range(0, d_in, block):
            changed += _sweep_block(sweep, c1, min(c1 + block, d_in), max_rounds, moved)
        mask[active], kept[active], c[active] = sweep.mask, sweep.kept, sweep.c
        changes += changed
        active = active[moved]
        if changed == 0:
            break
    row_errors = ((weight - kept) * c).sum(dim=1, dtype=torch.float64)
    return SearchResult(mask, row_errors, sweeps, changes, kept=kept)
