r"""Tabu search over N:M group moves on a binary mask, every row at once (masks only).

``tabu_steps`` (default 150) steps, after the group sweep if any
(:mod:`constrainedsparse.layerwise.fw.groups`). A descent over single-group moves, such as that
sweep, stops in a local optimum: no single group can change its kept set for the better. Tabu
search descends from any start mask and moves on from such optima. At every step each row takes
its best move even if it raises the objective, except moves of a group that changed in the last
``tabu_tenure`` steps (tabu), which stay allowed when they reach a new best objective for the row
(aspiration); the row returns the best mask it visited, so fw's guarantee is unchanged. Its first
steps descend as the sweep does, one group per row and step; later ones leave the local optima
where the sweep stops. On MiniLM at 2:4 it reaches a lower error than the sweep in less time
(``docs/formulations/layerwise.md``).

With :math:`C = (W \odot (1 - M))G`, a group :math:`g` taking kept set :math:`s` changes the
residual by :math:`\delta = w_g \odot (m_g - s)` and the row's objective by exactly

.. math::

    \Delta = 2\langle \delta, c_g\rangle + \delta\, G_{gg}\, \delta^\top
    = 2\sum_{j} (m_{g,j} - s_j)\, w_j c_j + (m_g - s)^\top Q_g\, (m_g - s),
    \qquad Q_g = \operatorname{diag}(w_g)\, G_{gg} \operatorname{diag}(w_g),

so one step scores every move of every group with one :math:`(d_{out} \cdot d_{in}/m) \times m
\times \binom{m}{n}` product; the quadratic term
:math:`m_g^\top Q_g m_g - 2 s^\top Q_g m_g + s^\top Q_g s` changes only for the moved group,
and :math:`C` follows by a sparse product with the move's :math:`m` changed weights, so a step
costs :math:`O(d_{out}\, d_{in} (\binom{m}{n} / m + m))`.
"""

from __future__ import annotations

import dataclasses

import torch

from constrainedsparse.layerwise.fw.core import residual_row_errors
from constrainedsparse.layerwise.fw.groups import KeptSets, diagonal_blocks
from constrainedsparse.layerwise.fw.search import MIN_RELATIVE_GAIN, row_argmin

__all__ = ["TabuResult", "group_tabu_search"]

_INF = float("inf")


@dataclasses.dataclass(frozen=True)
class TabuResult:
    """Outcome of :func:`group_tabu_search`.

    Args:
        mask: The best visited mask of every row (a row keeps the start mask unless the visited
            one is better in the exact objective).
        row_errors: Its per-row objective computed from scratch, float64.
        improved_rows: The number of rows that end better than they started.
    """

    mask: torch.Tensor
    row_errors: torch.Tensor
    improved_rows: int


def _quadratic_terms(
    choices: torch.Tensor, q_sel: torch.Tensor, set_sel: torch.Tensor, current_sel: torch.Tensor
) -> torch.Tensor:
    """(m_g - s)ᵀ Q_g (m_g - s) for every set s, set-major; +inf for the current one (no move)."""
    kept_now = choices[current_sel]
    q_kept = (q_sel @ kept_now.unsqueeze(-1)).squeeze(-1)
    terms = set_sel + (q_kept * kept_now).sum(-1, keepdim=True) - 2.0 * q_kept @ choices.T
    return terms.scatter_(-1, current_sel.unsqueeze(-1), _INF).reshape(-1, choices.shape[0]).T


class _TabuSearch:
    """The state of one tabu search: the groups' current and best kept sets, :math:`C`, the tabu list.

    A "slot" is one group of one row, ``row * groups + group``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        gram: torch.Tensor,
        mask: torch.Tensor,
        group: int,
        tenure: int,
        residual: torch.Tensor | None,
    ) -> None:
        d_out, d_in = weight.shape
        self.weight, self.gram, self.mask, self.group, self.tenure = weight, gram, mask, group, tenure
        self.groups = d_in // group
        self.slots = slots = d_out * self.groups
        dtype, device = weight.dtype, weight.device
        kept_sets = KeptSets.of(int(mask[0, :group].sum()), group, dtype, device)
        self.choices = choices = kept_sets.choices
        count = choices.shape[0]
        self.rows = torch.arange(d_out, device=device)
        self.offsets = torch.arange(group, device=device)
        self.w_groups = weight.reshape(d_out, self.groups, group)
        q_blocks = self.w_groups.unsqueeze(3) * diagonal_blocks(gram, group) * self.w_groups.unsqueeze(2)
        self.q_flat = q_blocks.reshape(slots, group, group)  # Q_g of every slot
        outer = (choices.unsqueeze(2) * choices.unsqueeze(1)).reshape(count, group * group)
        self.set_quadratic = self.q_flat.reshape(slots, group * group) @ outer.T  # sᵀ Q_g s, (slots, count)
        # Set-major (count, slots) so that the best set of every group is an elementwise minimum.
        self.current = kept_sets.of_mask(mask).reshape(-1)
        self.quadratic = _quadratic_terms(choices, self.q_flat, self.set_quadratic, self.current).contiguous()
        self.current_entry = self.current * slots + torch.arange(slots, device=device)  # in `gain`
        self.minus_twice_choices = -2.0 * choices
        pruned = weight * ~mask
        self.c = pruned @ gram if residual is None else residual.clone()
        self.start_rows = (pruned * self.c).sum(dim=1, dtype=torch.float64)
        self.objective, self.best_objective = self.start_rows.clone(), self.start_rows.clone()
        self.best = self.current.reshape(d_out, self.groups).clone()
        # A group moved at step s is tabu in steps s + 1 .. s + tenure; moved_at[k] holds the slots moved
        # at the steps s ≡ k (mod tenure + 1), whose tabu ends when the step comes round again.
        self.tabu_until = torch.zeros(slots, dtype=torch.long, device=device)
        self.penalty = torch.zeros(d_out, self.groups, dtype=dtype, device=device)
        self.moved_at: list[torch.Tensor | None] = [None] * (tenure + 1)
        self.wc = torch.empty_like(self.c)
        self.gain = torch.empty(count, slots, dtype=dtype, device=device)

    def expire(self, step: int) -> None:
        """Lifts the tabu of the groups moved ``tenure + 1`` steps ago (unless they moved since)."""
        expiring = self.moved_at[step % (self.tenure + 1)]
        if expiring is not None:
            self.penalty.view(-1)[expiring] = torch.where(self.tabu_until[expiring] > step, _INF, 0.0)

    def group_gains(self) -> torch.Tensor:
        """Δ of every group's best move, ``(d_out, groups)``; leaves every move's Δ in ``gain``."""
        torch.mul(self.weight, self.c, out=self.wc)
        # Δ of every move: the quadratic term - 2 Σ_{j∈s} w_j c_j + 2 Σ_{j∈m_g} w_j c_j.
        torch.mm(self.minus_twice_choices, self.wc.reshape(self.slots, self.group).T, out=self.gain)
        twice_current = self.gain.reshape(-1).take(self.current_entry).neg_()
        return self.gain.add_(self.quadratic).amin(dim=0).add_(twice_current).reshape(-1, self.groups)

    def choose(self, group_gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every row's move: its best one if that reaches a new best, else its best non-tabu one.

        Returns:
            The rows that move, their groups and objective changes; ``None`` if no row can move.
        """
        any_gain, any_group = row_argmin(group_gain)
        free_gain, free_group = row_argmin(group_gain.add_(self.penalty))
        best = self.best_objective
        aspire = self.objective + any_gain < best - MIN_RELATIVE_GAIN * best.abs()
        change = torch.where(aspire, any_gain, free_gain)
        moved_group = torch.where(aspire, any_group, free_group)
        moved_rows = self.rows
        ok = torch.isfinite(change)
        if not bool(ok.all()):
            if not bool(ok.any()):
                return None
            moved_rows, moved_group, change = self.rows[ok], moved_group[ok], change[ok]
        return moved_rows, moved_group, change

    def move(self, step: int, moved_rows: torch.Tensor, moved_group: torch.Tensor, change: torch.Tensor) -> None:
        """Applies the chosen moves: kept sets, :math:`C` (sparse product), quadratic terms, tabu list, bests."""
        group, slots, choices = self.group, self.slots, self.choices
        moved_slots = moved_rows * self.groups + moved_group
        new_set = row_argmin(self.gain.T[moved_slots])[1]
        delta = self.w_groups.reshape(slots, group)[moved_slots] * (
            choices[self.current[moved_slots]] - choices[new_set]
        )
        columns = moved_group.unsqueeze(1) * group + self.offsets
        coordinates = torch.stack((moved_rows.repeat_interleave(group), columns.reshape(-1)))
        # Row-major and without repeats: already coalesced.
        step_change = torch.sparse_coo_tensor(
            coordinates, delta.reshape(-1), tuple(self.weight.shape), is_coalesced=True, check_invariants=False
        )
        self.c.addmm_(step_change, self.gram)
        self.current[moved_slots] = new_set
        self.current_entry[moved_slots] = new_set * slots + moved_slots
        self.quadratic[:, moved_slots] = _quadratic_terms(
            choices, self.q_flat[moved_slots], self.set_quadratic[moved_slots], new_set
        )
        self.objective[moved_rows] += change.to(torch.float64)
        self.tabu_until[moved_slots] = step + 1 + self.tenure
        self.penalty.view(-1)[moved_slots] = _INF
        self.moved_at[step % (self.tenure + 1)] = moved_slots
        better = self.objective < self.best_objective
        self.best_objective = torch.where(better, self.objective, self.best_objective)
        self.best[better] = self.current.reshape(-1, self.groups)[better]

    def result(self) -> TabuResult:
        """Every row's best visited mask where it beats the start in the exact objective."""
        found = self.choices[self.best].bool().reshape(self.weight.shape)
        found_rows = residual_row_errors(self.weight, self.gram, self.weight * found)
        improved = found_rows < self.start_rows
        final = torch.where(improved.unsqueeze(1), found, self.mask)
        return TabuResult(final, torch.where(improved, found_rows, self.start_rows), int(improved.sum()))


def group_tabu_search(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    steps: int,
    tenure: int,
    residual: torch.Tensor | None = None,
) -> TabuResult:
    r"""Tabu search over N:M group moves on a binary mask, every row at once (see the module docstring).

    Args:
        weight: :math:`W`, ``(d_out, d_in)``.
        gram: :math:`G`, ``(d_in, d_in)``, same dtype.
        mask: Boolean N:M start mask (not modified); every group keeps as many as the first.
        group: :math:`m`.
        steps: Number of steps.
        tenure: Steps during which a changed group is tabu.
        residual: :math:`C = (W \odot (1 - M))G` of ``mask`` if already known.

    Returns:
        The best visited mask of every row, its per-row objective computed from scratch (a row
        keeps ``mask`` unless the visited one is better in this exact objective), and the number
        of rows improved.
    """
    search = _TabuSearch(weight, gram, mask, group, tenure, residual)
    for step in range(steps):
        search.expire(step)
        moves = search.choose(search.group_gains())
        if moves is None:
            break
        search.move(step, *moves)
    return search.result()
