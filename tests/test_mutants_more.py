"""Assertions that catch hand-made mutants the rest of the suite let through (a second mutation-testing review):
set projections into buffers, the sampled bfloat16 top-k path, dual restarts, the epoch count, magnitude's resume,
masks, and the tabu tenure, aspiration and swap choice of the layer-wise searches."""

import itertools
import warnings

import pytest
import torch
from cooper.utils import ConstraintType
from torch import nn

from constrainedsparse import SparsityConfig, SparsityProblem, Targets, UserConstraint, make, selection
from constrainedsparse.formulations.epochs import EpochCount
from constrainedsparse.formulations.l0 import L0Config
from constrainedsparse.layerwise.fw import group_tabu_search, swap_polish, swap_tabu_search
from constrainedsparse.masks import apply_masks, canonical_parameters, current_masks, temporarily_pruned
from constrainedsparse.multipliers import RestartingMultiplier, reset_dual_state_, restarted_multipliers
from constrainedsparse.sets import TopK


def _mlp_problem() -> SparsityProblem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _objective(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor) -> float:
    pruned = weight * ~mask
    return float((pruned @ gram * pruned).sum())


def _row_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    return weight, x @ x.T


# --- sets ----------------------------------------------------------------------------------------------------------


def test_mutant_B5_adjacent_buffer_is_not_an_overlap():
    """Kills B5 (sets/base.py _overlap: `a0 < b1 and b0 < a1` -> `<=`, adjacent spans refused)."""
    buf = torch.tensor([3.0, -1.0, 2.0, 0.5, 9.0, 9.0, 9.0, 9.0])
    out = buf[4:]
    assert TopK(2).project(buf[:4], out=out) is out and out.tolist() == [3.0, 0.0, 2.0, 0.0]


def test_mutant_B6_buffer_sharing_the_last_entry_is_refused():
    """Kills B6 (sets/base.py _overlap's span: `(extent + 1) * element_size` -> `extent * element_size`)."""
    buf = torch.tensor([3.0, -1.0, 2.0, 0.5, 9.0, 9.0, 9.0])
    with pytest.raises(ValueError, match="shares memory"):
        TopK(2).project(buf[:4], out=buf[3:])  # both hold buf[3]


def test_mutant_T1_T2_T3_sampled_bfloat16_selection_cuts_ties_exactly():
    """Kills T1/T2/T3 (selection.py sampled torch path: tie cut +1, kthvalue rank -1, count_gt counting ties)."""
    n = selection.SAMPLED_SELECT_MIN_NUMEL
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).bfloat16()  # bfloat16: many ties, torch path
    a = x.abs().float()
    for k in (100_000, int((a >= 1.0).sum())):  # a cut inside the ties at t; every tie at t = 1 kept
        found = selection.kth_largest_sampled(x, k, magnitude=True)
        t = a.kthvalue(n - k + 1).values
        ties = a == t
        above = int((a > t).sum())
        assert found is not None and (found.count_gt, found.count_ge) == (above, above + int(ties.sum()))
        keep = (a > t) | (ties & (ties.cumsum(0) <= k - above))  # ties to the lower index
        assert torch.equal(TopK(k).project(x), x * keep)


# --- multipliers: dual restarts ------------------------------------------------------------------------------------


def test_mutant_M4_equality_multiplier_never_restarts():
    """Kills M4 (multipliers.py post_step_: the `constraint_type != INEQUALITY` guard dropped)."""
    multiplier = RestartingMultiplier(2, restarts=True, init=torch.tensor([0.5, -0.5]))
    multiplier.set_constraint_type(ConstraintType.EQUALITY)
    multiplier.weight.grad = torch.tensor([-1.0, 0.0])
    multiplier.post_step_()
    assert multiplier.weight.tolist() == [0.5, -0.5] and not multiplier.last_restart.any()


def test_mutant_M6_state_is_cleared_for_every_satisfied_entry():
    """Kills M6 (multipliers.py reset_dual_state_: `last_satisfied` -> `last_restart`)."""
    multiplier = RestartingMultiplier(1)
    multiplier.set_constraint_type(ConstraintType.INEQUALITY)
    dual = torch.optim.SGD(multiplier.parameters(), lr=1.0, momentum=0.9, maximize=True)
    multiplier.weight.grad = torch.tensor([-1.0])
    dual.step()  # lambda = -1, momentum buffer -1
    multiplier.post_step_()  # projected to 0 and satisfied: no restart, yet its stale momentum goes
    assert not multiplier.last_restart.any() and multiplier.last_satisfied.all()
    reset_dual_state_(dual, multiplier)
    assert dual.state[multiplier.weight]["momentum_buffer"].tolist() == [0.0]


def test_mutant_M7_restart_metric_only_for_a_positive_multiplier_reset():
    """Kills M7 (multipliers.py restarted_multipliers: `last_restart.any()` -> `last_satisfied.any()`)."""
    model = nn.Linear(2, 1)
    constraint = UserConstraint(lambda m: m.weight.sum(), "<=", restarts=True)
    targets = Targets().resolve(model, SparsityConfig(0.5))
    problem = SparsityProblem(model, nn.functional.mse_loss, targets, {"c": constraint})
    multiplier = dict(problem.named_multipliers())["c"]
    optimizer = torch.optim.SGD(multiplier.parameters(), lr=1.0)
    multiplier.weight.grad = torch.tensor([-1.0])
    multiplier.post_step_()  # satisfied at 0: nothing restarted
    assert restarted_multipliers(problem, optimizer) == {}
    multiplier.weight.data.fill_(0.5)
    multiplier.post_step_()
    assert restarted_multipliers(problem, optimizer) == {"restart/c": 1.0}


def test_mutant_L1_l0_logs_dual_state_on_a_restart_not_on_a_held_constraint():
    """Kills L1 (l0/constrained.py after_gated_step: `last_restart.any()` -> `last_satisfied.any()`)."""
    f = make("l0", _mlp_problem(), L0Config(log_interval=1000))
    f.setup(1, 4)
    f.start_epoch(0)
    _, metrics = f.training_step(_batch())
    assert any(bool(m.last_satisfied.any()) for m in f.multipliers().values())  # the lower bound holds at 0
    assert not any(bool(m.last_restart.any()) for m in f.multipliers().values())
    assert not any(key.startswith("multiplier/") for key in metrics), metrics


# --- epochs --------------------------------------------------------------------------------------------------------


def test_mutant_E6_resumed_state_restarts_the_count_in_another_epoch():
    """Kills E6 (epochs.py start: the `epoch == self.epoch` half of the resume test dropped)."""
    count = EpochCount()
    count.declare(3, 4, 12)
    count.load([1, 2])  # saved mid-epoch 1
    count.start(2)
    assert count.state() == [2, 0, 0]


def test_mutant_E7_an_epoch_without_steps_does_not_warn():
    """Kills E7 (epochs.py end: `done not in (declared, 0)` -> `done != declared`)."""
    count = EpochCount()
    count.declare(2, 3, 6)
    count.start(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count.end(0)


def test_mutant_E8_end_epoch_resets_the_step_count():
    """Kills E8 (epochs.py end: `self.steps = 0` dropped, a state saved after end_epoch() reads as mid-epoch)."""
    count = EpochCount()
    count.declare(2, 3, 6)
    count.start(0)
    count.steps = 3  # what three post_step() calls count
    count.end(0)
    assert count.state() == [0, 0, 0]


def test_mutant_E10_a_new_setup_warns_again_past_its_epochs():
    """Kills E10 (epochs.py declare: `self._warned.discard("epochs")` dropped)."""
    count = EpochCount()
    count.declare(1, 1, 1)
    with pytest.warns(UserWarning, match="past setup"):
        count.start(1)
    count.end(1)
    count.declare(2, 1, 2)
    with pytest.warns(UserWarning, match="past setup"):
        count.start(2)


# --- magnitude, masks ----------------------------------------------------------------------------------------------


def test_mutant_MA5_magnitude_resumes_mid_epoch_on_the_loaded_masks():
    """Kills MA5 (magnitude.py load_state_dict: `self._masked = True` -> `False`)."""
    f = make("magnitude", _mlp_problem())
    f.setup(2, 2)
    f.start_epoch(0)
    f.training_step(_batch())
    resumed = make("magnitude", _mlp_problem())
    resumed.setup(2, 2)
    resumed.load_state_dict(f.state_dict())
    resumed.training_step(_batch())  # no start_epoch() needed: the state carries the masks
    for ours, theirs in zip(resumed.problem.targets, f.problem.targets):  # the same entries pruned
        assert torch.equal(ours.module.weight == 0, theirs.module.weight == 0)
        assert 0 < int((ours.module.weight == 0).sum()) < ours.module.weight.numel()


def test_mutant_MK2_parameter_order_survives_a_mask():
    """Kills MK2 (masks.py canonical_parameters: `sorted(own)` -> `own`)."""
    lin = nn.Linear(3, 2)
    before = [id(p) for p in canonical_parameters(lin)]
    targets = Targets().resolve(lin, SparsityConfig(0.5))
    apply_masks(targets, {targets[0].name: torch.ones(2, 3, dtype=torch.bool)})
    assert [id(p) for p in canonical_parameters(lin)] == before


def test_mutant_MK4_temporarily_pruned_restores_the_weights():
    """Kills MK4 (masks.py temporarily_pruned: the restore `stored.copy_(value)` skipped)."""
    lin = nn.Linear(3, 2)
    before = lin.weight.detach().clone()
    targets = Targets().resolve(lin, SparsityConfig(0.5))
    with temporarily_pruned(targets, {targets[0].name: torch.zeros(2, 3, dtype=torch.bool)}):
        assert not lin.weight.any()
    assert torch.equal(lin.weight, before)


def test_mutant_MK6_current_masks_are_copies():
    """Kills MK6 (masks.py current_masks: `existing.mask.clone()` -> `existing.mask`)."""
    lin = nn.Linear(3, 2)
    targets = Targets().resolve(lin, SparsityConfig(0.5))
    name = targets[0].name
    apply_masks(targets, {name: torch.ones(2, 3, dtype=torch.bool)})
    saved = current_masks(targets)
    apply_masks(targets, {name: torch.zeros(2, 3, dtype=torch.bool)}, allow_empty=True)  # updates in place
    assert saved[name].all() and not current_masks(targets)[name].any()


# --- layer-wise searches -------------------------------------------------------------------------------------------


def test_mutant_FW2_swap_tabu_tenure_is_used():
    """Kills FW2 (fw/swap_tabu.py swap_tabu_search: the tenure passed on as 1)."""
    weight, gram = _row_problem(0)
    weight, gram = weight[:, :4].contiguous(), gram[:4, :4].contiguous()
    mask = torch.tensor([[True, True, False, False]])
    # Steps 0 and 1 swap all four weights: with tenure 2 all are tabu at step 2 and the search stops.
    assert swap_tabu_search(weight, gram, mask, 10, 2).steps == 2
    assert swap_tabu_search(weight, gram, mask, 10, 1).steps == 10


def test_mutant_FW4_FW10_group_tabu_lifts_a_tenure_on_time():
    """Kills FW4 (fw/tabu.py expire: `tabu_until > step` -> `>=`) and FW10 (moved_at slot `step % tenure`)."""
    weight, gram = _row_problem(0)
    sets = [torch.tensor([i in c for i in range(4)]) for c in itertools.combinations(range(4), 2)]
    best = min((torch.cat((a, b)).unsqueeze(0) for a in sets for b in sets), key=lambda m: _objective(weight, gram, m))
    # From the optimum no move aspires: both groups move once, then wait out their tenure.
    assert group_tabu_search(weight, gram, best, 4, 6, 2).steps == 2
    assert group_tabu_search(weight, gram, best, 4, 6, 1).steps == 6


def test_mutant_FW5_group_tabu_aspiration_takes_a_tabu_move_to_a_new_best():
    """Kills FW5 (fw/tabu.py choose: aspiration removed, a tabu move reaching a new best refused)."""
    weight, gram = _row_problem(2)
    mask = torch.tensor([[True, False, True, False, True, True, False, False]])
    sets = [torch.tensor([i in c for i in range(4)]) for c in itertools.combinations(range(4), 2)]
    optimum = min(_objective(weight, gram, torch.cat((a, b)).unsqueeze(0)) for a in sets for b in sets)
    result = group_tabu_search(weight, gram, mask, 4, 8, 2)  # the third move is tabu, and reaches the optimum
    assert float(result.row_errors[0]) == pytest.approx(optimum)


def test_mutant_FW6_swap_polish_takes_the_better_of_its_two_candidates():
    """Kills FW6 (fw/search.py best_swaps: `a_best + b_partner <= b_best + a_partner` -> `>=`)."""
    weight, gram = _row_problem(0)
    mask = torch.tensor([[False, False, True, False, True, False, True, True]])
    swaps = []
    for pruned, restored in itertools.product(range(8), range(8)):
        if mask[0, pruned] and not mask[0, restored]:
            swapped = mask.clone()
            swapped[0, pruned], swapped[0, restored] = False, True
            swaps.append(_objective(weight, gram, swapped))
    assert float(swap_polish(weight, gram, mask, 1).row_errors[0]) == pytest.approx(min(swaps))
