"""l0's test-gap proxy constraint: the test-time threshold, the smooth test density, Cooper's strict violations."""

import math

import cooper
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from constrainedsparse import make
from constrainedsparse.formulations.l0 import L0Config
from constrainedsparse.gates import LOG_ALPHA_RANGE, HardConcreteGate
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.targets import SparsityConfig, Targets


def _gate(log_alpha, test_rule="median"):
    module = nn.Linear(len(log_alpha), 1)
    gate = HardConcreteGate(module, module.weight.shape, test_rule=test_rule)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(log_alpha))
    gate.log_alpha.requires_grad_(False)  # values only: these tests read densities, not gradients
    return gate


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(*LOG_ALPHA_RANGE, width=32), min_size=1, max_size=20), st.sampled_from(["median", "louizos"]))
def test_the_test_gate_is_on_exactly_above_the_threshold(log_alpha, rule):
    gate = _gate(log_alpha, rule)
    t = gate.test_threshold()
    on = gate.test_gate() > 0
    a = gate.log_alpha.detach()
    # Away from the threshold (float round-off at it) the rule and the threshold agree.
    away = (a - t).abs() > 1e-4
    assert torch.equal(on[away], (a > t)[away])


def test_median_threshold_is_where_half_the_draws_are_zero():
    gate = _gate([0.0])
    with torch.no_grad():
        gate.log_alpha.fill_(gate.test_threshold())
    assert float(gate.prob_nonzero().detach()) == pytest.approx(0.5, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-8.0, 8.0, width=32), min_size=1, max_size=20))
def test_soft_test_density_is_the_expected_density_at_temperature_one_and_the_test_density_as_it_sharpens(log_alpha):
    gate = _gate(log_alpha)
    assert float(gate.soft_test_density(1.0)) == pytest.approx(float(gate.expected_density()), abs=1e-6)
    away = (gate.log_alpha.detach() - gate.test_threshold()).abs().min() > 0.05
    if away:
        assert float(gate.soft_test_density(1e-3)) == pytest.approx(float(gate.test_density()), abs=1e-6)


def test_a_strict_violation_drives_the_dual_step_and_the_surrogate_the_primal():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    problem = SparsityProblem(
        model, lambda out, y: (out - y).pow(2).mean(), Targets().resolve(model, SparsityConfig(0))
    )
    multiplier = cooper.multipliers.DenseMultiplier(num_constraints=1)
    constraint = cooper.Constraint(
        constraint_type=cooper.ConstraintType.INEQUALITY,
        formulation_type=cooper.formulations.Lagrangian,
        multiplier=multiplier,
    )
    problem.add_constraint(
        "c",
        constraint,
        lambda m, b: (m.weight.sum() - 100.0).reshape(1),  # surrogate: satisfied
        strict_violation=lambda m, b: torch.tensor([0.25]),  # measurement: violated
    )
    dual = torch.optim.SGD(multiplier.parameters(), lr=2.0, maximize=True)
    optimizer = cooper.optim.SimultaneousOptimizer(problem, torch.optim.SGD(model.parameters(), lr=0.1), dual)
    optimizer.roll(compute_cmp_state_kwargs={"batch": (torch.ones(3, 2), torch.zeros(3, 1))})
    assert float(multiplier.weight.detach()) == pytest.approx(0.5)  # 2.0 x the strict 0.25, not the surrogate's -100


def _gap_problem(scope, sparsity=0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    targets = Targets().resolve(model, SparsityConfig(sparsity))
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    config = L0Config(scope=scope, density_constraint="two-sided", test_gap_max=0.05, log_interval=1)
    f = make("l0", problem, config, dual_lr=1.0)
    f.setup(1, 3)
    return f, (torch.randn(16, 6), torch.randint(0, 3, (16,)))


@pytest.mark.parametrize(
    ("scope", "names"), [("model", ["l0_test_gap"]), ("layer", ["l0_test_gap:0.weight", "l0_test_gap:2.weight"])]
)
def test_test_gap_constraints_follow_the_scope(scope, names):
    f, _ = _gap_problem(scope)
    assert [n for n in f.constraint_names if "test_gap" in n] == names
    assert all(f.multipliers()[n].weight.numel() == 2 for n in names)  # the pair: T - E and E - T
    f.finalize()
    assert not list(f.problem.named_constraints())


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_a_measured_gap_above_the_bound_raises_its_side_and_restarts_the_other(scope):
    f, batch = _gap_problem(scope)
    # Every gate at P(z != 0) = 0.6: all on at test time, so T - E = 0.4 > 0.05.
    with torch.no_grad():
        for gate in f.gates.values():
            gate.log_alpha.fill_(math.log(0.6 / 0.4) + gate.test_threshold())
    _, metrics = f.training_step(batch)
    gap = {k: v for k, v in metrics.items() if k.startswith("violation/l0_test_gap")}
    upper = {k: v for k, v in gap.items() if "_min" not in k}
    lower = {k: v for k, v in gap.items() if "_min" in k}
    assert upper and len(lower) == len(upper)
    assert all(v == pytest.approx(0.4 - 0.05, abs=0.02) for v in upper.values())  # the measured gap, not T~
    assert all(v == pytest.approx(-0.4 - 0.05, abs=0.02) for v in lower.values())
    for name, multiplier in f.multipliers().items():
        if name.startswith("l0_test_gap"):
            up, down = multiplier.weight.tolist()
            assert up > 0.0 and down == 0.0  # the violated side rises, the satisfied one is restarted
            assert metrics[f"multiplier/{name}"] == up
            assert metrics[f"multiplier/{name.replace('l0_test_gap', 'l0_test_gap_min')}"] == down


def test_the_primal_step_under_a_positive_gap_multiplier_pushes_marginal_gates_off():
    f, batch = _gap_problem("model")
    with torch.no_grad():
        for gate in f.gates.values():
            gate.log_alpha.fill_(gate.test_threshold() + 0.1)  # just on at test time
    f.multipliers()["l0_test_gap"].weight.data.copy_(torch.tensor([50.0, 0.0]))
    f.optimizer.zero_grad()
    f.backward(batch)
    for name, gate in f.gates.items():
        # gradient of lambda * soft T: positive near the threshold, so descent lowers log alpha
        assert bool((gate.log_alpha.grad > 0).all()), name


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_test_gap_max_is_validated(value):
    with pytest.raises(ValueError, match=rf"^test_gap_max must be in \(0, 1\], got {value}$"):
        L0Config(test_gap_max=value).validate()


def test_measured_expected_density_is_reused_only_for_the_same_log_alpha():
    gate = _gate([0.5, -3.0, 2.0])
    first = gate.measured_expected_density()
    assert float(first) == pytest.approx(float(gate.prob_nonzero().mean()))
    with torch.no_grad():
        gate.log_alpha.add_(-4.0)  # an optimizer step: in place, a new version
    assert float(gate.measured_expected_density()) == pytest.approx(float(gate.prob_nonzero().mean()))
    assert float(gate.measured_expected_density()) < float(first)


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_a_restart_of_the_pairs_second_entry_is_logged_under_its_own_name(scope):
    # the pair is one Cooper constraint of two entries, logged as l0_test_gap and l0_test_gap_min: so are its restarts
    f, batch = _gap_problem(scope)
    with torch.no_grad():
        for gate in f.gates.values():
            gate.log_alpha.fill_(math.log(0.6 / 0.4) + gate.test_threshold())  # T - E = 0.4: the second side holds
        for name, multiplier in f.multipliers().items():
            if name.startswith("l0_test_gap"):
                multiplier.weight.data.copy_(torch.tensor([0.0, 1.0]))  # the held side positive: it restarts
    _, metrics = f.training_step(batch)
    restarts = sorted(key for key in metrics if key.startswith("restart/l0_test_gap"))
    names = [n.replace("l0_test_gap", "l0_test_gap_min") for n in f.constraint_names if "test_gap" in n]
    assert restarts == sorted(f"restart/{name}" for name in names)
