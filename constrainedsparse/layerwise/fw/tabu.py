r"""Tabu search over N:M group moves on a binary mask, every row at once (masks only).

``tabu_steps`` (default 100) steps, after the group sweep if any
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
import warnings

import torch

from constrainedsparse.layerwise.fw.core import as_float, residual_row_errors
from constrainedsparse.layerwise.fw.groups import KeptSets, diagonal_blocks
from constrainedsparse.layerwise.fw.search import MIN_RELATIVE_GAIN, row_argmin

__all__ = ["TabuResult", "group_tabu_search"]

_INF = float("inf")
# Up to this many kept sets per group (6 for 2:4) the quadratic terms of every slot and current set
# are tabulated once (count² per slot); above, a move recomputes them for the moved slots.
MAX_TABLE_CHOICES = 8


@dataclasses.dataclass(frozen=True)
class TabuResult:
    """Outcome of :func:`group_tabu_search`.

    Args:
        mask: The best visited mask of every row (a row keeps the start mask unless the visited
            one is better in the exact objective).
        row_errors: Its per-row objective computed from scratch, float64.
        improved_rows: The number of rows that end better than they started.
        steps: Steps run.
        moves: Moves applied (a row's group change or swap per step).
    """

    mask: torch.Tensor
    row_errors: torch.Tensor
    improved_rows: int
    steps: int = 0
    moves: int = 0


def _quadratic_terms(
    choices: torch.Tensor, q_sel: torch.Tensor, set_sel: torch.Tensor, current_sel: torch.Tensor
) -> torch.Tensor:
    """(m_g - s)ᵀ Q_g (m_g - s) for every set s, set-major; +inf for the current one (no move)."""
    kept_now = choices[current_sel]
    q_kept = (q_sel @ kept_now.unsqueeze(-1)).squeeze(-1)
    terms = set_sel + (q_kept * kept_now).sum(-1, keepdim=True) - 2.0 * q_kept @ choices.T
    return terms.scatter_(-1, current_sel.unsqueeze(-1), _INF).reshape(-1, choices.shape[0]).T


class _TabuSearch:
    """The state of one tabu search: the groups' current kept sets, :math:`C`, the tabu list, each row's best step.

    A "slot" is one group of one row, ``row * groups + group``. Every step's moves are recorded, and
    each row's best visited mask is rebuilt once at the end by replaying its moves up to its best
    step (no copy of the state per step). Updates go through ``index_select``/``index_copy_`` on
    contiguous slot-major arrays: far cheaper on CPU than advanced indexing.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        gram: torch.Tensor,
        mask: torch.Tensor,
        group: int,
        tenure: int,
        residual: torch.Tensor | None,
        start_rows: torch.Tensor | None = None,
    ) -> None:
        d_out, d_in = weight.shape
        self.weight, self.gram, self.mask, self.group, self.tenure = weight, gram, mask, group, tenure
        self.d_out, self.groups = d_out, d_in // group
        self.slots = slots = d_out * self.groups
        dtype, device = weight.dtype, weight.device
        kept_sets = KeptSets.of(int(mask[0, :group].sum()), group, dtype, device)
        self.choices = choices = kept_sets.choices
        count = choices.shape[0]
        self.rows = torch.arange(d_out, device=device)
        self.slot_base = self.rows * self.groups
        self.offsets = torch.arange(group, device=device)
        self.w_slots = weight.reshape(slots, group)
        w_groups = weight.reshape(d_out, self.groups, group)
        q_blocks = w_groups.unsqueeze(3) * diagonal_blocks(gram, group) * w_groups.unsqueeze(2)
        self.q_flat = q_blocks.reshape(slots, group, group)  # Q_g of every slot
        outer = (choices.unsqueeze(2) * choices.unsqueeze(1)).reshape(count, group * group)
        self.set_quadratic = self.q_flat.reshape(slots, group * group) @ outer.T  # sᵀ Q_g s, (slots, count)
        # Set-major (count, slots) so that the best set of every group is an elementwise minimum.
        self.current = kept_sets.of_mask(mask).reshape(-1)
        self.start_sets = self.current.clone()
        change = choices.unsqueeze(1) - choices.unsqueeze(0)  # m_c - s, (current, set, m)
        self.set_change = change.reshape(count * count, group)
        self.quadratic_table = None
        if count <= MAX_TABLE_CHOICES:
            # Every slot's terms for every current set, looked up on a move: (m_c - s)ᵀ Q_g (m_c - s).
            outer_change = (change.unsqueeze(3) * change.unsqueeze(2)).reshape(count * count, group * group)
            table = self.q_flat.reshape(slots, group * group) @ outer_change.T
            no_move = torch.eye(count, dtype=torch.bool, device=device).reshape(-1)
            table[:, no_move] = _INF
            self.quadratic_table = table.view(slots * count, count)
        self.quadratic = self._quadratic(torch.arange(slots, device=device), self.current).contiguous()
        self.current_entry = self.current * slots + torch.arange(slots, device=device)  # in `gain`
        self.minus_twice_choices = -2.0 * choices
        pruned = weight * as_float(~mask, dtype)
        self.c = pruned @ gram if residual is None else residual.clone()
        if start_rows is None:
            start_rows = pruned.mul_(self.c).sum(dim=1).to(torch.float64)
        self.start_rows = start_rows
        self.objective, self.best_objective = start_rows.clone(), start_rows.clone()
        self.best_step = torch.full((d_out,), -1, dtype=torch.long, device=device)
        self.records: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        # A group moved at step s is tabu in steps s + 1 .. s + tenure; moved_at[k] holds the slots moved
        # at the steps s ≡ k (mod tenure + 1), whose tabu ends when the step comes round again.
        self.tabu_until = torch.zeros(slots, dtype=torch.long, device=device)
        self.penalty = torch.zeros(slots, dtype=dtype, device=device)
        self.moved_at: list[torch.Tensor | None] = [None] * (tenure + 1)
        self.wc = torch.empty_like(self.c)
        self.gain = torch.empty(count, slots, dtype=dtype, device=device)
        self.all_crow = torch.arange(0, d_out * group + 1, group, device=device)

    def _quadratic(self, slots: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The quadratic terms of ``slots`` with current sets ``current``, set-major like ``quadratic``: looked up
        in the table when there is one, else recomputed (:func:`_quadratic_terms`)."""
        if self.quadratic_table is not None:
            count = self.quadratic_table.shape[1]
            return self.quadratic_table.index_select(0, slots * count + current).T
        q_sel, set_sel = self.q_flat.index_select(0, slots), self.set_quadratic.index_select(0, slots)
        return _quadratic_terms(self.choices, q_sel, set_sel, current)

    def expire(self, step: int) -> None:
        """Lifts the tabu of the groups moved ``tenure + 1`` steps ago (unless they moved since)."""
        expiring = self.moved_at[step % (self.tenure + 1)]
        if expiring is not None:
            still = self.tabu_until.index_select(0, expiring) > step
            self.penalty.index_copy_(0, expiring, torch.where(still, _INF, 0.0).to(self.penalty.dtype))

    def group_gains(self) -> torch.Tensor:
        """Δ of every group's best move, ``(d_out, groups)``; leaves every move's Δ in ``gain``."""
        torch.mul(self.weight, self.c, out=self.wc)
        # Δ of every move: the quadratic term - 2 Σ_{j∈s} w_j c_j + 2 Σ_{j∈m_g} w_j c_j.
        torch.mm(self.minus_twice_choices, self.wc.view(self.slots, self.group).T, out=self.gain)
        twice_current = self.gain.view(-1).take(self.current_entry).neg_()
        return self.gain.add_(self.quadratic).amin(dim=0).add_(twice_current).view(-1, self.groups)

    def choose(self, group_gain: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        """Every row's move: its best one if that reaches a new best, else its best non-tabu one.

        Returns:
            The rows that move (``None``: all), their groups and objective changes; ``None`` if no
            row can move.
        """
        any_gain, any_group = row_argmin(group_gain)
        free_gain, free_group = row_argmin(group_gain.add_(self.penalty.view(-1, self.groups)))
        best = self.best_objective
        aspire = self.objective + any_gain < best - MIN_RELATIVE_GAIN * best.abs()
        change = torch.where(aspire, any_gain, free_gain)
        moved_group = torch.where(aspire, any_group, free_group)
        ok = torch.isfinite(change)
        if bool(ok.all()):
            return None, moved_group, change
        if not bool(ok.any()):
            return None
        moved_rows = self.rows[ok]
        return moved_rows, moved_group[ok], change[ok]

    def move(self, step: int, moved_rows: torch.Tensor | None, moved_group: torch.Tensor, change: torch.Tensor) -> None:
        """Applies the chosen moves: kept sets, :math:`C` (sparse product), quadratic terms, tabu list, bests."""
        group, slots, choices = self.group, self.slots, self.choices
        rows = self.rows if moved_rows is None else moved_rows
        moved_slots = rows * self.groups + moved_group
        new_set = row_argmin(self.gain.index_select(1, moved_slots).T.contiguous())[1]  # torch's argmin(0) is slow
        old_set = self.current.index_select(0, moved_slots)
        moved_entry = old_set * choices.shape[0] + new_set
        delta = self.w_slots.index_select(0, moved_slots) * self.set_change.index_select(0, moved_entry)
        columns = (moved_group.unsqueeze(1) * group + self.offsets).view(-1)
        if moved_rows is None:
            crow = self.all_crow
        else:
            counts = torch.zeros(self.d_out, dtype=torch.long, device=rows.device).index_fill_(0, rows, group)
            crow = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is not
            warnings.simplefilter("ignore", UserWarning)
            step_change = torch.sparse_csr_tensor(
                crow, columns, delta.view(-1), tuple(self.weight.shape), check_invariants=False
            )
        self.c.addmm_(step_change, self.gram)
        self.current.index_copy_(0, moved_slots, new_set)
        self.current_entry.index_copy_(0, moved_slots, new_set * slots + moved_slots)
        self.quadratic.index_copy_(1, moved_slots, self._quadratic(moved_slots, new_set))
        if moved_rows is None:
            self.objective += change
        else:
            self.objective.index_add_(0, moved_rows, change.to(torch.float64))
        self.tabu_until.index_fill_(0, moved_slots, step + 1 + self.tenure)
        self.penalty.index_fill_(0, moved_slots, _INF)
        self.moved_at[step % (self.tenure + 1)] = moved_slots
        better = self.objective < self.best_objective
        torch.minimum(self.objective, self.best_objective, out=self.best_objective)
        self.best_step.masked_fill_(better, step)
        self.records.append((moved_rows, moved_slots, new_set))

    def best_sets(self) -> torch.Tensor:
        """Every slot's kept set at its row's best step: the recorded moves replayed up to it."""
        sets = self.start_sets.clone()
        for step, (moved_rows, moved_slots, new_set) in enumerate(self.records):
            reached = self.best_step >= step
            if moved_rows is not None:
                reached = reached.index_select(0, moved_rows)
            sets.index_copy_(0, moved_slots[reached], new_set[reached])
        return sets

    def result(self) -> TabuResult:
        """Every row's best visited mask where it beats the start in the exact objective."""
        found = self.choices.index_select(0, self.best_sets()).bool().view(self.weight.shape)
        found_rows = residual_row_errors(self.weight, self.gram, self.weight * as_float(found, self.weight.dtype))
        # A row improves when it ends on another mask that is better (not by round-off on the same mask).
        improved = (found_rows < self.start_rows) & (found != self.mask).any(dim=1)
        final = self.mask ^ ((found ^ self.mask) & improved.unsqueeze(1))  # found where improved
        moves = sum(self.d_out if rows is None else rows.numel() for rows, _, _ in self.records)
        rows = torch.where(improved, found_rows, self.start_rows)
        return TabuResult(final, rows, int(improved.sum()), len(self.records), moves)


def group_tabu_search(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    steps: int,
    tenure: int,
    residual: torch.Tensor | None = None,
    start_rows: torch.Tensor | None = None,
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
        start_rows: The per-row objective of ``mask`` if already known (float64).

    Returns:
        The best visited mask of every row, its per-row objective computed from scratch (a row
        keeps ``mask`` unless the visited one is better in this exact objective), the number
        of rows improved, the steps run and the moves applied.
    """
    search = _TabuSearch(weight, gram, mask, group, tenure, residual, start_rows)
    for step in range(steps):
        search.expire(step)
        moves = search.choose(search.group_gains())
        if moves is None:
            break
        search.move(step, *moves)
    return search.result()
