"""Assertions that catch hand-made mutants the rest of the suite let through (a third mutation-testing review, of the
sparsity geometry, the multipliers, the accumulated dual step and the rho rule): a projection that aliases its input,
row and group widths, non-contiguous inputs, Adam's dual state at a restart, the dual step's micro-batch scales and
their warning, the balance rule's dual residual, the rho cap and the SGD bound."""

import types
import warnings

import cooper
import pytest
import torch
from torch import nn

from constrainedsparse import SparsityConfig, SparsityProblem, Targets, UserConstraint, make
from constrainedsparse.formulations.rho import PenaltyRule
from constrainedsparse.multipliers import RestartingMultiplier, reset_dual_state_
from constrainedsparse.sets import RowTopK, StructuredGroups, TopK


def test_a_projection_that_keeps_everything_is_a_copy_not_the_input():
    x = torch.tensor([1.0, -2.0, 3.0])
    projected = TopK(3).project(x)
    projected.mul_(0)  # a caller editing its projection (slr's Z)
    assert x.tolist() == [1.0, -2.0, 3.0]


def test_row_and_group_levels_count_the_whole_row_and_the_grouped_dimension():
    assert RowTopK.at_level((8, 4, 3, 3), 0.5).k == 18  # a conv row is 4 * 3 * 3 weights
    assert StructuredGroups.at_level((8, 4), 0.5, dim=1).k == 2  # 2 of 4 input columns


def test_a_non_contiguous_input_projects_as_its_contiguous_copy():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).t()
    assert not x.is_contiguous()
    assert torch.equal(TopK(5).project(x), TopK(5).project(x.contiguous()))


def test_a_restart_resets_adams_state_of_the_satisfied_entries_only():
    multiplier = RestartingMultiplier(2)
    cooper.Constraint(cooper.ConstraintType.INEQUALITY, cooper.formulations.Lagrangian, multiplier=multiplier)
    dual = torch.optim.Adam(multiplier.parameters(), lr=0.1, maximize=True)
    for grad in ([1.0, 1.0], [-1.0, 1.0]):  # entry 0 turns satisfied at the second step
        multiplier.weight.grad = torch.tensor(grad)
        dual.step()
        multiplier.post_step_()
        reset_dual_state_(dual, multiplier)
    state = dual.state[multiplier.weight]
    assert float(state["step"]) == 2.0  # Adam's shared 0-d step count is left alone
    assert float(state["exp_avg"][0]) == 0.0 and float(state["exp_avg"][1]) != 0.0


def _admm_with_budget(steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    budget = {"budget": UserConstraint(lambda m: m[0].weight.norm() + 1.0)}  # always violated: a positive multiplier
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)), budget)
    f = make("admm", problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), dual_lr=0.5)
    f.setup(1, steps)
    return f, problem, x, y


def test_an_accumulated_dual_step_ascends_along_the_scaled_sum_of_the_micro_batches_violations():
    f, problem, x, y = _admm_with_budget(4)
    steps = [f.backward((x[i : i + 16], y[i : i + 16]), scale=0.25) for i in range(0, 64, 16)]
    violations = [float(step.cmp_state.observed_constraints[problem.budget].violation) for step in steps]
    f.optimizer.step()
    f.post_step(steps)
    assert float(problem.budget.multiplier.weight) == pytest.approx(0.5 * sum(violations) / 4, rel=1e-6)


def test_the_scales_warning_counts_each_dual_step_afresh_and_warns_once():
    f, _, x, y = _admm_with_budget(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f.post_step(f.backward((x, y)))  # a full step
        f.post_step(f.backward((x, y), scale=0.5))  # a micro-batch given alone, as evaluated: its share is its own
        assert not [w for w in caught if "do not sum" in str(w.message)]
        for _ in range(3):  # two evaluated, one given: the scales given do not sum to 1
            f.backward((x, y), scale=0.5)
            f.post_step(f.backward((x, y), scale=0.5))
    assert len([w for w in caught if "do not sum" in str(w.message)]) == 1


def _rule(rho_rule: str, optimizer: torch.optim.Optimizer, targets: list, rho_max: float = 100.0, growth: float = 2.0):
    config = types.SimpleNamespace(rho_growth=growth, rho_max=rho_max, rho_rule=rho_rule)
    return PenaltyRule("admm", config, optimizer, targets)


def test_residual_balancing_reads_the_dual_residual_as_rho_times_z_change():
    rule = _rule("balance", torch.optim.Adam([nn.Parameter(torch.zeros(1))]), [])
    assert rule.next(4.0, {"dual/residual": 1.0, "dual/z_change": 1.0}) == 4.0  # 4 is within 10 x the residual
    assert rule.next(20.0, {"dual/residual": 1.0, "dual/z_change": 1.0}) == 10.0  # 20 > 10 x 1: rho / 2


def test_rho_growth_stops_at_rho_max_below_the_sgd_bound():
    weight = nn.Parameter(torch.zeros(1))
    target = types.SimpleNamespace(stored=weight)
    rule = _rule("growth", torch.optim.SGD([weight], lr=0.5), [target], rho_max=1.0, growth=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rho_max binds before the bound 1 / lr = 2: nothing to warn of
        assert rule.next(0.5, {}) == 1.0


def test_the_sgd_bound_holds_for_a_subclass_and_takes_the_largest_learning_rate_of_the_targets():
    class MySGD(torch.optim.SGD):
        pass

    weight, other = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    targets = [types.SimpleNamespace(stored=weight), types.SimpleNamespace(stored=other)]
    assert _rule("growth", MySGD([weight], lr=0.5), targets[:1]).stable() == 2.0
    groups = [{"params": [weight], "lr": 0.5}, {"params": [other], "lr": 0.01}]
    assert _rule("growth", torch.optim.SGD(groups), targets).stable() == 2.0
