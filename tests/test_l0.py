"""l0 / l0-penalty: restarting multipliers, config validation, optimizer groups, masks, runs."""

import copy
import math

import cooper
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse import RunConfig, make, run
from constrainedsparse.formulations.l0 import L0Config, L0PenaltyConfig
from constrainedsparse.gates import HardConcreteGate
from constrainedsparse.logger import read_metrics
from constrainedsparse.masks import hard_prune
from constrainedsparse.multipliers import RestartingMultiplier, reset_dual_state_
from constrainedsparse.problem import SparsityProblem, UserConstraint
from constrainedsparse.purge import purge
from constrainedsparse.targets import SparsityConfig, Targets

COMMON = dict(problem="digits-mlp", pretrain_epochs=2, wandb="disabled", progress=False)


# --- restarting multipliers on a real Cooper CMP ----------------------------------------------


def _toy(violations, *, restarts=True, momentum=0.0, dual_lr=0.5):
    """A one-parameter CMP whose single inequality constraint reports ``violations`` in turn."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    targets = Targets().resolve(model, SparsityConfig(0.0))
    problem = SparsityProblem(model, lambda out, y: (out - y).pow(2).mean(), targets)
    values = iter(violations)
    multiplier = RestartingMultiplier(1, restarts=restarts)
    constraint = cooper.Constraint(
        constraint_type=cooper.ConstraintType.INEQUALITY,
        formulation_type=cooper.formulations.Lagrangian,
        multiplier=multiplier,
    )
    # Violation = value + 0 * (something primal) so the primal Lagrangian has a graph.
    problem.add_constraint("c", constraint, lambda m, b: next(values) + 0.0 * m.weight.sum().reshape(1))
    dual = torch.optim.SGD(multiplier.parameters(), lr=dual_lr, maximize=True, momentum=momentum)
    optimizer = cooper.optim.SimultaneousOptimizer(problem, torch.optim.SGD(model.parameters(), lr=0.1), dual)
    batch = (torch.ones(4, 1), torch.zeros(4, 1))
    return multiplier, optimizer, dual, batch


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-2.0, 2.0), min_size=1, max_size=12), st.booleans())
def test_inequality_multipliers_never_negative(violations, restarts):
    multiplier, optimizer, _, batch = _toy(violations, restarts=restarts)
    for _ in violations:
        optimizer.roll(compute_cmp_state_kwargs={"batch": batch})
        assert float(multiplier.weight.detach().min()) >= 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-2.0, 2.0, width=32), min_size=1, max_size=12))
def test_a_restart_is_counted_only_where_a_positive_multiplier_is_reset(violations):
    """``last_satisfied`` marks every held constraint (its multiplier is then 0); ``last_restart``
    only those whose multiplier was positive before the step (what ``restart/<name>`` logs)."""
    multiplier, optimizer, _, batch = _toy(violations)
    for violation in violations:
        before = float(multiplier.weight.detach())
        optimizer.roll(compute_cmp_state_kwargs={"batch": batch})
        held = violation <= 0
        assert bool(multiplier.last_satisfied.all()) == held
        assert bool(multiplier.last_restart.all()) == (held and max(0.0, before + 0.5 * violation) > 0)
        assert float(multiplier.weight.detach()) >= 0.0 and (not held or float(multiplier.weight.detach()) == 0.0)


def test_restart_zeroes_a_satisfied_constraint_after_the_dual_step():
    multiplier, optimizer, _, batch = _toy([1.0, 0.6, -0.1, 0.4])
    optimizer.roll(compute_cmp_state_kwargs={"batch": batch})
    optimizer.roll(compute_cmp_state_kwargs={"batch": batch})
    assert float(multiplier.weight.detach()) == pytest.approx(0.5 * 1.6)
    assert not bool(multiplier.last_restart.any())
    optimizer.roll(compute_cmp_state_kwargs={"batch": batch})  # satisfied: reset, not 0.8 - 0.05
    assert float(multiplier.weight.detach()) == 0.0 and bool(multiplier.last_restart.all())
    optimizer.roll(compute_cmp_state_kwargs={"batch": batch})  # violated again: ascent from 0
    assert float(multiplier.weight.detach()) == pytest.approx(0.2)


def test_without_restarts_lambda_decays_by_the_dual_step():
    multiplier, optimizer, _, batch = _toy([1.0, -0.3, -0.3, -0.3], restarts=False)
    expected = 0.0
    for violation in (1.0, -0.3, -0.3, -0.3):
        optimizer.roll(compute_cmp_state_kwargs={"batch": batch})
        expected = max(0.0, expected + 0.5 * violation)
        assert float(multiplier.weight.detach()) == pytest.approx(expected)
        assert not bool(multiplier.last_restart.any())


def test_restart_clears_the_dual_optimizers_momentum():
    multiplier, optimizer, dual, batch = _toy([1.0, 1.0, -0.5], momentum=0.9)
    for _ in range(3):
        optimizer.roll(compute_cmp_state_kwargs={"batch": batch})
        reset_dual_state_(dual, multiplier)
    assert float(multiplier.weight.detach()) == 0.0
    assert float(dual.state[multiplier.weight]["momentum_buffer"].abs().max()) == 0.0
    # Plain SGD keeps no state: nothing to clear, nothing fails.
    multiplier, optimizer, dual, batch = _toy([1.0, -0.5])
    for _ in range(2):
        optimizer.roll(compute_cmp_state_kwargs={"batch": batch})
        reset_dual_state_(dual, multiplier)
    assert float(multiplier.weight.detach()) == 0.0 and not dual.state[multiplier.weight]


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (L0Config(scope="net"), r"scope must be one of model, layer, got 'net'"),
        (L0Config(grouping="rows"), r"grouping must be one of unstructured, structured, got 'rows'"),
        (L0Config(droprate_init=0.0), r"droprate_init must be in \(0, 1\), got 0.0"),
        (L0Config(droprate_init=1.0), r"droprate_init must be in \(0, 1\), got 1.0"),
        (L0Config(gate_lr=0.0), r"gate_lr must be > 0, got 0.0"),
        (L0Config(gate_lr=-1.0), r"gate_lr must be > 0, got -1.0"),
        (L0Config(gate_momentum=1.0), r"gate_momentum must be in \[0, 1\), got 1.0"),
        (L0Config(weight_decay=-1.0), r"weight_decay must be >= 0, got -1.0"),
        (L0Config(log_interval=0), r"log_interval must be >= 1, got 0"),
        (
            L0Config(density_constraint="exact"),
            r"density_constraint must be one of inequality, equality, two-sided, got 'exact'",
        ),
        (L0Config(density_dual_kp=-1.0), r"density_dual_kp must be a finite number >= 0, got -1.0"),
        (L0Config(density_dual_kp=float("inf")), r"density_dual_kp must be a finite number >= 0, got inf"),
        (L0Config(density_of="outputs"), r"^density_of must be one of weights, purged, got 'outputs'$"),
        (
            L0Config(density_of="purged"),
            r"^density_of=purged needs grouping=structured \(unstructured gates leave nothing to purge\), "
            r"got grouping='unstructured'$",
        ),
        (
            L0Config(density_of="purged", grouping="structured", scope="layer"),
            r"^density_of=purged needs scope=model \(a layer's purged size depends on the next layer's kept "
            r"inputs\), got scope='layer'$",
        ),
        (L0PenaltyConfig(lmbda=-0.5), r"lmbda must be a finite number >= 0, got -0.5"),
        (L0PenaltyConfig(gate_lr=0.0), r"gate_lr must be > 0, got 0.0"),
        (L0Config(test_rule="mean"), r"^test_rule must be one of median, louizos, got 'mean'$"),
    ],
)
def test_config_validation(config, message):
    with pytest.raises(ValueError, match=message):
        config.validate()


def _mlp_problem(sparsity=0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    targets = Targets().resolve(model, SparsityConfig(sparsity))
    return SparsityProblem(model, nn.functional.cross_entropy, targets), (
        torch.randn(16, 6),
        torch.randint(0, 3, (16,)),
    )


def test_target_density_outside_unit_interval():
    problem, _ = _mlp_problem()
    problem.targets[1].sparsity = 1.0
    with pytest.raises(ValueError, match=r"target density 1 - sparsity of 2.weight must be in \(0, 1\], got 0.0"):
        make("l0", problem)


@pytest.mark.parametrize("name", ["l0", "l0-penalty"])
def test_test_rule_reaches_every_gate(name):
    """``test_rule`` picks the eval-mode gate of every target: the median by default, or Louizos' estimator."""
    for rule in ("median", "louizos"):
        problem, _ = _mlp_problem()
        config = (L0Config if name == "l0" else L0PenaltyConfig)(test_rule=rule)
        f = make(name, problem, config)
        f.setup(1, 1)
        for gate in f.gates.values():
            gate.log_alpha.data.fill_(-2.0)  # P(z != 0) = 0.41: off by the median, on by Louizos' estimate
            assert gate.test_rule == rule
        assert f.test_density() == (0.0 if rule == "median" else 1.0)


# --- optimizer, masks, finalize -----------------------------------------------------------------


def test_gates_have_their_own_lr_and_no_weight_decay():
    problem, batch = _mlp_problem()
    f = make("l0", problem, L0Config(gate_lr=0.3, weight_decay=0.01), lr=1e-3, dual_lr=1.0)
    f.setup(1, 1)
    weights, gates = f.optimizer.param_groups
    assert (weights["lr"], weights["weight_decay"], gates["lr"], gates["weight_decay"]) == (1e-3, 0.01, 0.3, 0.0)
    gate_ids = {id(g.log_alpha) for g in f.gates.values()}
    assert {id(p) for p in gates["params"]} == gate_ids
    assert not gate_ids & {id(p) for p in weights["params"]}
    assert len(weights["params"]) + len(gates["params"]) == len(list(problem.model.parameters()))
    assert isinstance(f.cooper_optimizer, cooper.optim.SimultaneousOptimizer)
    f.training_step(batch)
    assert all(bool((m.weight.detach() >= 0).all()) for m in f.multipliers().values())


def test_model_scope_warns_that_different_target_levels_only_set_the_total(recwarn):
    # Overrides of 0.9 / 0.3 came out at 0.79 / 0.725 without a word: model scope shares one budget.
    def problem(targets=None, rows=False):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        config = SparsityConfig(0.9)
        resolved = (targets or Targets(overrides={"4.weight": 0.3})).resolve(model, config)
        if rows:  # the last layer at another pattern
            resolved = Targets(exclude=["4.*"]).resolve(model, config) + Targets(include=["4.*"]).resolve(
                model, SparsityConfig(0.5, "row")
            )
        return SparsityProblem(model, nn.functional.cross_entropy, resolved)

    uneven = r"^l0 scope=model holds one density budget over targets given different levels \(0\.9 \(0\.weight, \+1\), "
    with pytest.warns(
        UserWarning, match=uneven + r"0\.3 \(4\.weight\)\): the hard prune keeps one budget, their total"
    ):
        make("l0", problem(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"the hard prune keeps each target's own level \(a target has a pattern\)"):
        make("l0", problem(rows=True), lr=1e-3)
    recwarn.clear()
    make("l0", problem(Targets()), lr=1e-3)
    make("l0", problem(), L0Config(scope="layer"), lr=1e-3)
    assert not [w for w in recwarn if "scope=model" in str(w.message)]


def test_layer_scope_has_one_constraint_per_target_and_logs_the_dynamics():
    problem, batch = _mlp_problem()
    f = make(
        "l0",
        problem,
        L0Config(scope="layer", log_interval=1, dual_restarts=False, density_constraint="inequality", test_gap_max=1.0),
        dual_lr=1.0,
    )
    f.setup(1, 1)
    assert f.constraint_names == ["l0_density:0.weight", "l0_density:2.weight"]
    _, metrics = f.training_step(batch)
    for key in ("multiplier/l0_density:0.weight", "violation/l0_density:2.weight", "l0/expected_density",
                "l0_density/0.weight", "l0_test_density/2.weight"):  # fmt: skip
        assert key in metrics, key
    # Violated (density ~1 > 0.5): lambda = dual_lr * violation after the first step.
    assert metrics["multiplier/l0_density:0.weight"] == pytest.approx(metrics["violation/l0_density:0.weight"])


@pytest.mark.parametrize("dual_restarts", [True, False])
def test_equality_multiplier_goes_negative_and_never_restarts(dual_restarts):
    # Target density 1.0: the gates start at P(z != 0) ~ 0.998, so the violation is negative at every step.
    violations, multipliers = {}, {}
    for kind in ("inequality", "equality"):
        problem, batch = _mlp_problem(sparsity=0.0)
        config = L0Config(
            scope="layer", density_constraint=kind, dual_restarts=dual_restarts, log_interval=1, test_gap_max=1.0
        )
        f = make("l0", problem, config, dual_lr=1.0)
        f.setup(1, 3)
        for _ in range(3):
            _, metrics = f.training_step(batch)
        violations[kind] = metrics["violation/l0_density:0.weight"]
        multipliers[kind] = {name: float(m.weight.detach()) for name, m in f.multipliers().items()}
        expected_type = cooper.ConstraintType.EQUALITY if kind == "equality" else cooper.ConstraintType.INEQUALITY
        assert all(m.constraint_type == expected_type for m in f.multipliers().values())
        # Restarts act on inequalities only (dual_restarts is ignored for an equality).
        assert all(m.restarts == (dual_restarts and kind == "inequality") for m in f.multipliers().values())
        if kind != "inequality":  # an equality's or two-sided multiplier is never restarted
            assert not any(bool(m.last_restart.any()) for m in f.multipliers().values())
    assert violations["equality"] < 0 and violations["inequality"] < 0
    assert all(value == 0.0 for value in multipliers["inequality"].values())  # projected (or restarted) to 0
    assert all(value < 0.0 for value in multipliers["equality"].values())  # free in sign: pushes density up


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_two_sided_density_is_a_pair_of_restarting_inequalities(sparsity):
    # Density ~0.998 at the start: above the level 0.5 (upper bound violated), below 1.0 (lower bound violated).
    problem, batch = _mlp_problem(sparsity=sparsity)
    f = make("l0", problem, L0Config(density_constraint="two-sided", log_interval=1, test_gap_max=1.0), dual_lr=1.0)
    f.setup(1, 3)
    assert f.constraint_names == ["l0_density", "l0_density_min"]
    upper, lower = (f.multipliers()[name] for name in f.constraint_names)
    assert all(m.constraint_type == cooper.ConstraintType.INEQUALITY and m.restarts for m in (upper, lower))
    for _ in range(3):
        _, metrics = f.training_step(batch)
        g = metrics["violation/l0_density"]
        assert metrics["violation/l0_density_min"] == pytest.approx(-g)
        # The satisfied side is restarted: at most one multiplier is nonzero, and it is the violated side's.
        lam_upper, lam_lower = metrics["multiplier/l0_density"], metrics["multiplier/l0_density_min"]
        assert min(lam_upper, lam_lower) == 0.0
        assert (lam_upper > 0) == (g > 0) and (lam_lower > 0) == (g < 0)
    f.finalize()
    assert not list(problem.named_constraints())


def test_density_dual_kp_is_a_nupi_step_on_the_density_multipliers():
    problem, batch = _mlp_problem(sparsity=0.5)
    config = L0Config(density_constraint="equality", density_dual_lr=0.5, density_dual_kp=3.0, log_interval=1)
    f = make("l0", problem, config, dual_lr=1.0)
    f.setup(1, 4)
    assert isinstance(f.dual_optimizer, cooper.optim.nuPI)
    lam, total, previous = 0.0, 0.0, None
    for step in range(4):
        _, metrics = f.training_step(batch)
        g = metrics["violation/l0_density"]
        # nuPI(Kp, Ki=1, nu=0): the first step is SGD and Cooper then starts the error memory at 0, so
        # lambda += lr * (g_t + Kp * (g_t - g_{t-1})) with g_0 read as 0, i.e. lambda_t = lr * (sum g + Kp g_t).
        lam += 0.5 * (g + (0.0 if previous is None else 3.0 * (g - previous)))
        previous = 0.0 if previous is None else g
        total += g
        assert metrics["multiplier/l0_density"] == pytest.approx(lam, rel=1e-5, abs=1e-7)
        if step > 0:
            assert lam == pytest.approx(0.5 * (total + 3.0 * g), rel=1e-5)
    # Kp = 0 (the default) keeps plain gradient ascent.
    problem, _ = _mlp_problem(sparsity=0.5)
    f = make("l0", problem, L0Config(), dual_lr=1.0)
    f.setup(1, 1)
    assert type(f.dual_optimizer) is torch.optim.SGD


def test_density_dual_kp_leaves_the_users_multipliers_on_plain_gradient_ascent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    targets = Targets().resolve(model, SparsityConfig(0.5))
    # A user constraint that stays violated by 1.0: its multiplier must grow by dual_lr * 1.0 per step.
    user = UserConstraint(lambda m: 1.0 + 0.0 * m[0].bias.sum().reshape(1), "==")
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets, constraints={"budget": user})
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    f = make("l0", problem, L0Config(density_dual_kp=5.0), dual_lr=0.25)
    f.setup(1, 3)
    dual = f.dual_optimizer
    assert isinstance(dual, cooper.optim.nuPI)
    assert [float(g["Kp"]) for g in dual.param_groups] == [5.0, 0.0]
    assert [g["lr"] for g in dual.param_groups] == [1.0, 0.25]
    for step in range(1, 4):
        f.training_step(batch)
        assert float(problem.named_multiplier_values()["budget"][0]) == pytest.approx(0.25 * step)


@pytest.mark.parametrize("keep_more", [True, False])
def test_hard_masks_hit_the_target_and_follow_the_median_rule(keep_more):
    problem, _ = _mlp_problem(sparsity=0.5)
    f = make("l0", problem, L0Config())
    f.setup(1, 1)
    torch.manual_seed(1)
    for gate in f.gates.values():  # a median-rule density of about 0.75 or 0.25
        gate.log_alpha.data = torch.where(torch.rand_like(gate.log_alpha) < (0.75 if keep_more else 0.25), 5.0, -5.0)
    masks = f.hard_masks()
    test_on = {t.name: f.gates[t.name].test_gate() > 0 for t in problem.targets}
    # Model scope: one budget over all targets (the same total as per-layer top-k at the target).
    assert sum(int(masks[t.name].sum()) for t in problem.targets) == sum(t.feasible_set.k for t in problem.targets)
    for t in problem.targets:
        if keep_more:
            assert bool((masks[t.name] <= test_on[t.name]).all())  # a subset of the gated-on weights
        else:
            assert bool((masks[t.name] >= test_on[t.name]).all())  # all gated-on weights + re-admitted
    problem.model.eval()
    gated = {t.name: t.tensor.detach().clone() for t in problem.targets}
    stored = {t.name: t.module.parametrizations[t.param_name].original.detach().clone() for t in problem.targets}
    f.finalize()
    assert not any(parametrize.is_parametrized(m) for m in problem.model.modules())
    assert not any(isinstance(m, HardConcreteGate) for m in problem.model.modules())
    assert not list(problem.named_constraints())
    for t in problem.targets:
        weight = getattr(t.module, t.param_name)
        assert type(weight) is nn.Parameter
        readmitted = masks[t.name] & ~test_on[t.name]
        assert bool(readmitted.any()) != keep_more
        torch.testing.assert_close(weight[~readmitted], gated[t.name][~readmitted])
        torch.testing.assert_close(weight[readmitted], stored[t.name][readmitted])


def test_layer_scope_hard_masks_rank_gated_on_weights_by_their_exact_gated_magnitude():
    model = nn.Sequential(nn.Linear(8, 8))
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    f = make("l0", problem, L0Config(scope="layer"))
    f.setup(1, 1)
    (target,) = problem.targets
    # Every gate on (median 1); weights 1e-3 (1 + 1e-6 j), the larger ones at the higher indices: steps of 1e-9,
    # which float32 holds at 1e-3 but not next to an offset of ~1 (a ranking there ties, and the lower index wins).
    values = 1e-3 * (1.0 + 1e-6 * torch.arange(64, dtype=torch.float64))
    with torch.no_grad():
        target.stored.copy_(values.reshape(8, 8).to(torch.float32))
        f.gates[target.name].log_alpha.fill_(10.0)
    mask = f.hard_masks()[target.name]
    assert mask.reshape(-1).tolist() == [False] * 32 + [True] * 32


def test_gate_noise_is_drawn_for_training_lagrangians_only_and_freed_after_the_backward():
    problem, batch = _mlp_problem()
    f = make("l0", problem, L0Config(scope="layer"), optimizer=torch.optim.Adam(problem.model.parameters()))
    f.setup(1, 2)
    gates = list(f.gates.values())
    f.backward(batch)
    assert all(gate._noise is None for gate in gates)  # a weight-sized tensor each: not kept between steps
    state = f.generator.get_state()
    problem.model.eval()
    f.compute_lagrangian(batch)  # an evaluation between steps: no draw, the training stream unchanged
    assert torch.equal(f.generator.get_state(), state)


def test_finalize_right_after_hard_masks_selects_once_and_a_step_between_selects_again():
    problem, batch = _mlp_problem()
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=0.1)
    f = make("l0", problem, L0Config(scope="layer"), optimizer=optimizer)
    f.setup(1, 2)
    calls = []
    select = f.compute_hard_masks
    f.compute_hard_masks = lambda: calls.append(1) or select()
    f.training_step(batch)
    f.hard_masks()
    f.optimizer.step()  # a step alone (no Lagrangian) forgets them too: a fused one keeps the in-place versions
    assert f._last_masks is None
    f.training_step(batch)  # the gates and weights moved: the masks of finalize() are today's
    masks = f.hard_masks()
    assert len(calls) == 2
    problem.model.eval()
    gated = {t.name: t.tensor.detach().clone() for t in problem.targets}  # stored weights under test-time gates
    stored = {t.name: t.stored.detach().clone() for t in problem.targets}
    readmitted = {t.name: masks[t.name] & (f.gates[t.name].test_gate() == 0) for t in problem.targets}
    f.finalize()
    assert len(calls) == 2
    hard_prune(problem.targets, masks)
    for t in problem.targets:
        expected = torch.where(readmitted[t.name], stored[t.name], gated[t.name]) * masks[t.name]
        assert torch.equal(getattr(t.module, t.param_name), expected)


def test_structured_l0_gates_columns():
    problem, batch = _mlp_problem()
    f = make("l0", problem, L0Config(grouping="structured"))
    f.setup(1, 1)
    assert [g.num_gates for g in f.gates.values()] == [6, 8]
    f.training_step(batch)
    assert float(f.expected_density().detach()) <= 1.0


@pytest.mark.parametrize("keep_more", [True, False])
def test_structured_hard_masks_are_whole_columns(keep_more):
    problem, _ = _mlp_problem(sparsity=0.5)
    f = make("l0", problem, L0Config(grouping="structured", scope="layer"))
    f.setup(1, 1)
    torch.manual_seed(2)
    for gate in f.gates.values():
        gate.log_alpha.data = torch.where(torch.rand_like(gate.log_alpha) < (0.75 if keep_more else 0.25), 5.0, -5.0)
    masks = f.hard_masks()
    for t in problem.targets:
        mask, on = masks[t.name], f.gates[t.name].test_gate() > 0
        cols = mask.all(dim=0)
        assert bool((mask == cols.unsqueeze(0)).all())  # whole input columns
        assert int(cols.sum()) == round(0.5 * t.tensor.shape[1])
        assert bool((cols <= on).all()) if keep_more else bool((cols >= on).all())
    problem.model.eval()
    f.finalize()
    hard_prune(problem.targets, masks)
    for t in problem.targets:
        weight = getattr(t.module, t.param_name)
        assert bool((weight[:, ~masks[t.name].all(dim=0)] == 0).all())


def test_structured_hard_masks_are_whole_conv_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6, 3))
    targets = Targets().resolve(model, SparsityConfig(0.6))
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    f = make("l0", problem, L0Config(grouping="structured", scope="layer"))
    f.setup(1, 1)
    gate = f.gates["0.weight"]
    gate.log_alpha.data = torch.tensor([5.0, -5.0, 5.0, -5.0, -5.0])
    mask = f.hard_masks()["0.weight"]
    channels = mask.reshape(5, -1)
    assert bool((channels == channels[:, :1]).all())  # whole output channels
    assert channels[:, 0].tolist() == [True, False, True, False, False]  # round(0.4 * 5) = 2 kept
    fc = f.hard_masks()["3.weight"]
    assert bool((fc == fc.all(dim=0, keepdim=True)).all()) and int(fc.all(dim=0).sum()) == 12


def test_penalty_is_added_to_the_loss_and_removed_at_finalize():
    problem, batch = _mlp_problem()
    task = problem.loss_fn
    f = make("l0-penalty", problem, L0PenaltyConfig(lmbda=2.0))
    f.setup(1, 1)
    assert isinstance(f.cooper_optimizer, cooper.optim.UnconstrainedOptimizer)
    problem.model.eval()
    with torch.no_grad():
        out = problem.model(batch[0])
        assert float(problem.compute_cmp_state(batch).loss) == pytest.approx(
            float(task(out, batch[1]) + 2.0 * f.expected_density())
        )
    f.finalize()
    assert problem.loss_fn is task
    with torch.no_grad():
        assert float(problem.compute_cmp_state(batch).loss) == pytest.approx(
            float(task(problem.model(batch[0]), batch[1]))
        )


# --- runs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_l0_run_reaches_its_expected_density(tmp_path, scope):
    summary = run(
        RunConfig(
            formulation="l0",
            sparsity=0.8,
            epochs=5,
            out=tmp_path,
            settings={"density_dual_lr": "1.0", "scope": scope},
            **COMMON,
        )  # fmt: skip
    )
    assert summary["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["target_density"] == pytest.approx(0.2)
    layer = summary["layer_density"]
    assert set(layer) == {"0.weight", "2.weight", "4.weight"}
    if scope == "model":
        assert abs(summary["expected_density"] - 0.2) <= 0.02, summary["expected_density"]
    else:
        assert all(abs(d - 0.2) <= 0.02 for d in layer.values()), layer
    rows = read_metrics(tmp_path / "metrics.jsonl")
    keys = set().union(*rows)
    constraint = "l0_density" if scope == "model" else "l0_density:2.weight"
    for key in (f"multiplier/{constraint}", f"violation/{constraint}", "l0/expected_density",
                "l0_density/2.weight", "l0_test_density/2.weight", "gates/p_mean/2.weight",
                "gates/p_above_half/0.weight"):  # fmt: skip
        assert key in keys, key


def test_penalty_density_falls_with_lambda():
    densities = []
    for lmbda in (0.0, 5.0):
        problem, batch = _mlp_problem()
        f = make("l0-penalty", problem, L0PenaltyConfig(lmbda=lmbda, droprate_init=0.3))
        f.setup(1, 30)
        for _ in range(30):
            f.training_step(batch)
        densities.append(float(f.expected_density().detach()))
    assert densities[1] < densities[0] - 0.1, densities


def test_structured_l0_run_hits_the_target_after_hard_pruning(tmp_path):
    summary = run(
        RunConfig(
            formulation="l0",
            sparsity=0.8,
            epochs=1,
            retrain_epochs=1,
            out=tmp_path,
            settings={"grouping": "structured", "scope": "layer"},
            **COMMON,
        )  # fmt: skip
    )
    # Group-granular: digits-mlp keeps round(0.2 * n) of 64, 256 and 128 input columns.
    assert summary["achieved_sparsity"] == pytest.approx(0.8, abs=5e-3)
    assert 0.0 < summary["expected_density"] <= 1.0 and 0.0 <= summary["test_density"] <= 1.0
    # after_hard_prune: the purged model is saved with its new shapes and counted.
    assert summary["dense_params"] == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert summary["dense_macs"] == 64 * 256 + 256 * 128 + 128 * 10
    assert summary["purged_params"] < 0.3 * summary["dense_params"]
    assert summary["purged_macs"] < 0.3 * summary["dense_macs"]
    purged = load_file(tmp_path / "purged.safetensors")
    assert sum(t.numel() for k, t in purged.items() if k != "select.index") == summary["purged_params"]
    assert purged["select.index"].numel() == round(0.2 * 64)  # the kept input features
    assert purged["0.weight"].shape == (round(0.2 * 256), round(0.2 * 64))
    # The purged model's measured density: its targeted weights over the dense targeted weights.
    weights = ("0.weight", "2.weight", "4.weight")
    assert summary["dense_target_params"] == 64 * 256 + 256 * 128 + 128 * 10
    assert summary["purged_target_params"] == sum(purged[k].numel() for k in weights)
    assert summary["purged_density"] == summary["purged_target_params"] / summary["dense_target_params"]
    nonzero = sum(int(purged[k].count_nonzero()) for k in weights)
    assert summary["purged_nonzero_density"] == nonzero / summary["dense_target_params"]
    # A removed input column of a layer also removes the previous layer's output row: below the target.
    assert summary["purged_density"] < 0.2
    # purged.safetensors holds the final (retrained) weights: loaded as a user does, it computes what
    # model.safetensors computes.
    from constrainedsparse.purge import load_purged
    from constrainedsparse.spec import load_problem

    problem = load_problem("digits-mlp")
    final = problem.model(dict(problem.options))
    final.load_state_dict(load_file(tmp_path / "model.safetensors"))
    small = load_purged(problem.model(dict(problem.options)), tmp_path / "purged.safetensors")
    x = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), final.eval()(x), rtol=1e-5, atol=1e-5)


def test_unstructured_l0_run_reports_no_purge(tmp_path):
    summary = run(RunConfig(formulation="l0", sparsity=0.5, epochs=1, out=tmp_path, **COMMON))
    assert "purged_params" not in summary and not (tmp_path / "purged.safetensors").exists()


def test_model_scope_hard_masks_follow_the_gates_across_layers_and_layer_scope_stays_per_layer():
    for scope in ("model", "layer"):
        problem, _ = _mlp_problem(sparsity=0.5)
        f = make("l0", problem, L0Config(scope=scope))
        f.setup(1, 1)
        first, *rest = problem.targets
        with torch.no_grad():  # gates open on the whole first layer only
            for t in problem.targets:
                f.gates[t.name].log_alpha.fill_(5.0 if t is first else -5.0)
        masks = f.hard_masks()
        kept_first = int(masks[first.name].sum())
        if scope == "model":
            assert kept_first == min(first.tensor.numel(), sum(t.feasible_set.k for t in problem.targets))
        else:
            assert all(int(masks[t.name].sum()) == t.feasible_set.k for t in problem.targets)


def test_gate_probabilities_reach_wandb_as_histograms_at_epoch_ends(tmp_path):
    from wandb_records import history_rows, wait_for_complete_run

    settings = {**COMMON, "wandb": "offline"}
    run(RunConfig(formulation="l0", sparsity=0.8, epochs=2, out=tmp_path, **settings))
    # wandb stores a histogram as nested items: <key>/_type, <key>/values (counts), <key>/bins (edges).
    key = "gates/p/0.weight"
    rows = [r for r in history_rows(wait_for_complete_run(tmp_path)) if f"{key}/_type" in r]
    assert len(rows) == 2  # one per pruning epoch
    assert rows[-1][f"{key}/_type"] == "histogram"
    assert sum(rows[-1][f"{key}/values"]) == 64 * 256  # one count per gate of the first Linear
    assert all(0.0 <= edge <= 1.0 for edge in rows[-1][f"{key}/bins"])
    jsonl_keys = set().union(*read_metrics(tmp_path / "metrics.jsonl"))
    assert "gates/p/0.weight" not in jsonl_keys and "gates/p_mean/0.weight" in jsonl_keys


# --- structured gates in model scope: one global budget over groups ---------------------------


def _chain_problem(sparsity, first_rms, second_rms, first_gates, second_gates, config):
    """Linear(4, 6) -> ReLU -> Linear(6, 2) with hand-set column RMS and log alpha (structured gates)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():  # every column constant, so its RMS is the value
        model[0].weight.copy_(torch.tensor(first_rms).expand(6, 4))
        model[2].weight.copy_(torch.tensor(second_rms).expand(2, 6))
    targets = Targets().resolve(model, SparsityConfig(sparsity))
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    f = make("l0", problem, config)
    f.setup(1, 1)
    f.gates["0.weight"].log_alpha.data = torch.tensor(first_gates)
    f.gates["2.weight"].log_alpha.data = torch.tensor(second_gates)
    return problem, f


def _kept_columns(masks):
    return [masks[name].all(dim=0).nonzero().reshape(-1).tolist() for name in ("0.weight", "2.weight")]


def test_structured_model_scope_masks_take_one_global_budget_over_groups():
    # Golden: sparsity 0.5 keeps 12 of 24 and 6 of 12 weights, a budget of 18. Gated on: columns 0-2 of the
    # first layer (6 weights each, RMS 1, 2, 3; column 3 is off, RMS 10) and columns 0, 5 of the second
    # (2 weights each, RMS 2.5, 0.5). Global ranking: L1c2 (6), L2c0 (8), L1c1 (14), L1c0 (20), L2c5 (22):
    # 20 is nearest to 18, so the first layer keeps columns 0-2 and the second only column 0.
    args = (0.5, [1.0, 2.0, 3.0, 10.0], [2.5, 4.0, 4.0, 4.0, 4.0, 0.5], [5.0, 5.0, 5.0, -5.0],
            [5.0, -5.0, -5.0, -5.0, -5.0, 5.0])  # fmt: skip
    problem, f = _chain_problem(*args, L0Config(grouping="structured"))
    masks = f.hard_masks()
    assert _kept_columns(masks) == [[0, 1, 2], [0]]
    assert sum(int(m.sum()) for m in masks.values()) == 20  # |20 - 18| <= max group size / 2 = 3
    # Per-layer masks (layer scope) cut each layer to half: they differ from the global budget.
    _, per_layer = _chain_problem(*args, L0Config(grouping="structured", scope="layer"))
    assert _kept_columns(per_layer.hard_masks()) == [[1, 2], [0, 1, 5]]  # + a re-admitted gated-off column


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.05, 0.95), st.floats(0.1, 0.9))
def test_structured_model_scope_masks_meet_the_weight_budget_within_half_a_group(seed, sparsity, on_share):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    targets = Targets().resolve(model, SparsityConfig(sparsity))
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    f = make("l0", problem, L0Config(grouping="structured"))
    f.setup(1, 1)
    for gate in f.gates.values():
        gate.log_alpha.data = torch.where(torch.rand_like(gate.log_alpha) < on_share, 3.0, -3.0)
    masks = f.hard_masks()
    budget = sum(t.feasible_set.k for t in targets)
    assert abs(sum(int(m.sum()) for m in masks.values()) - budget) <= max(7, 6, 3) / 2
    for mask in masks.values():
        assert bool((mask == mask.all(dim=0, keepdim=True)).all())  # whole input columns
    kept_on = sum(int((masks[t.name].all(dim=0) & (f.gates[t.name].test_gate() > 0)).sum()) for t in targets)
    total_on = sum(int((f.gates[t.name].test_gate() > 0).sum()) for t in targets)
    kept = sum(int(masks[t.name].all(dim=0).sum()) for t in targets)
    assert kept_on == min(total_on, kept)  # gated-on groups first, across all layers


def test_structured_model_scope_run_hits_the_target_within_half_a_group(tmp_path):
    summary = run(
        RunConfig(
            formulation="l0", sparsity=0.8, epochs=1, out=tmp_path, settings={"grouping": "structured"}, **COMMON
        )  # fmt: skip
    )
    # digits-mlp: 50,432 targeted weights, columns of 256, 128 and 10 weights: within 128 / 50,432.
    assert abs(summary["achieved_sparsity"] - 0.8) <= 128 / 50_432
    assert "expected_purged_density" not in summary


# --- density_of=purged -------------------------------------------------------------------------


PURGED = L0Config(grouping="structured", density_of="purged")


def test_expected_purged_density_is_the_closed_form_and_matches_sampled_gates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    f = make("l0", problem, PURGED)
    f.setup(1, 1)
    for gate in f.gates.values():
        gate.log_alpha.data = torch.randn_like(gate.log_alpha) * 2
    p = [float(f.gates[n].expected_density().detach()) for n in ("0.weight", "2.weight", "4.weight")]
    dense = 5 * 7 + 7 * 6 + 6 * 3
    closed = (5 * p[0] * 7 * p[1] + 7 * p[1] * 6 * p[2] + 6 * p[2] * 3) / dense
    assert float(f.expected_purged_density().detach()) == pytest.approx(closed, rel=1e-6)
    draws = []
    with torch.no_grad():
        for _ in range(4000):
            k = [int((f.gates[n].sample() > 0).sum()) for n in ("0.weight", "2.weight", "4.weight")]
            draws.append((k[0] * k[1] + k[1] * k[2] + k[2] * 3) / dense)
    assert sum(draws) / len(draws) == pytest.approx(closed, abs=0.01)
    # The model-wise constraint bounds it (at the level 1 - s), and it has a gradient.
    assert f.constrained_density() is not None
    f.expected_purged_density().backward()
    assert all(f.gates[n].log_alpha.grad is not None for n in ("0.weight", "2.weight", "4.weight"))


def test_density_of_purged_constrains_the_expected_purged_density():
    problem, batch = _mlp_problem(sparsity=0.5)
    f = make("l0", problem, L0Config(grouping="structured", density_of="purged", log_interval=1))
    f.setup(1, 1)
    with torch.no_grad():
        before = float(f.expected_purged_density())
    _, metrics = f.training_step(batch)
    assert metrics["violation/l0_density"] == pytest.approx(before - 0.5, abs=1e-6)
    assert "l0/expected_purged_density" in metrics
    assert "expected_purged_density" in f.summary_extra()


def test_density_of_purged_hard_masks_meet_the_purged_budget():
    # Golden, level 0.3: budget 0.3 * 36 = 10.8 purged entries. All four first-layer columns and the second
    # layer's columns 0-2 are gated on; ranked by RMS: L1c3, L1c2, L2c2, L1c1, L2c1, L1c0, L2c0, ... The
    # purged sizes k1 k2 + 2 k2 of the prefixes are 0, 0, 4, 5, 10, 12, 18, ...: 10 is nearest to 10.8.
    problem, f = _chain_problem(0.7, [1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 4.0, 4.0, 4.0], [5.0] * 4,
                                [5.0, 5.0, 5.0, -5.0, -5.0, -5.0], PURGED)  # fmt: skip
    masks = f.hard_masks()
    assert _kept_columns(masks) == [[1, 2, 3], [1, 2]]
    problem.model.eval()
    f.finalize()
    hard_prune(problem.targets, masks)
    small = purge(problem.model)
    assert small.get_parameter("0.weight").numel() + small.get_parameter("2.weight").numel() == 3 * 2 + 2 * 2


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.05, 0.95), st.floats(0.1, 0.9))
def test_density_of_purged_masks_are_within_half_a_step_of_the_budget(seed, sparsity, on_share):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(sparsity)))
    f = make("l0", problem, PURGED)
    f.setup(1, 1)
    for gate in f.gates.values():
        gate.log_alpha.data = torch.where(torch.rand_like(gate.log_alpha) < on_share, 3.0, -3.0)
    masks = f.hard_masks()
    k = [int(masks[n].all(dim=0).sum()) for n in ("0.weight", "2.weight", "4.weight")]
    dense = 5 * 7 + 7 * 6 + 6 * 3
    step = max(7 + 0, 6 + 5, 3 + 7)  # max over layers of out_l + in_{l-1}
    assert abs(k[0] * k[1] + k[1] * k[2] + k[2] * 3 - f.target_density() * dense) <= step / 2


def test_density_of_purged_rejects_models_it_cannot_size():
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    problem = SparsityProblem(conv, nn.functional.cross_entropy, Targets().resolve(conv, SparsityConfig(0.5)))
    with pytest.raises(
        ValueError, match=r"^density_of=purged: layer 0 is a Conv1d; the purged size is modelled for a chain of Linear"
    ):
        make("l0", problem, PURGED)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    partial = Targets(exclude=["2.weight"]).resolve(model, SparsityConfig(0.5))
    with pytest.raises(
        ValueError, match=r"^density_of=purged needs exactly the Linear weights as targets \(0.weight, 2.weight\), "
        r"got 0.weight$"
    ):  # fmt: skip
        make("l0", SparsityProblem(model, nn.functional.cross_entropy, partial), PURGED)
    nm = Targets().resolve(model, SparsityConfig.from_pattern("1:2"))
    with pytest.raises(
        ValueError,
        match=r"^density_of=purged needs a sparsity level without a pattern, a top-k budget \(--sparsity without "
        r"--pattern; SparsityConfig\(sparsity=\.\.\.\)\); 0\.weight has the pattern 1:2$",
    ):
        make("l0", SparsityProblem(model, nn.functional.cross_entropy, nm), PURGED)


def test_density_of_purged_run_purges_to_the_target(tmp_path):
    settings = {"grouping": "structured", "density_of": "purged"}
    summary = run(RunConfig(formulation="l0", sparsity=0.8, epochs=1, out=tmp_path, settings=settings, **COMMON))
    # digits-mlp 64-256-128-10: max_l (out_l + in_{l-1}) = 10 + 256, so within 133 of 50,432 entries.
    assert abs(summary["purged_density"] - 0.2) <= 133 / 50_432
    assert 0.0 < summary["expected_purged_density"] <= 1.0
    assert summary["achieved_sparsity"] < 0.8  # --sparsity's zeros of the unpurged weights: fewer than 0.8


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hard_prune_preview_equals_the_hard_pruned_model_also_when_the_mask_readmits_gated_off_weights(training):
    # In train mode too: the preview's unit gate must not be multiplied by a training sample.
    from constrainedsparse.masks import hard_prune

    problem, batch = _mlp_problem()
    f = make("l0", problem, L0Config(scope="layer"))
    f.setup(1, 1)
    with torch.no_grad():  # gate off most weights: the masks at 50 % must re-admit some of them
        for gate in f.gates.values():
            gate.log_alpha.fill_(-10.0)
            gate.log_alpha.view(-1)[::7] = 5.0
    model = problem.model
    model.train(training)
    masks = f.hard_masks()
    gates = f.gates.values()
    readmitted = sum(int((m & (g.test_gate().expand_as(m) == 0)).sum()) for m, g in zip(masks.values(), gates))
    assert readmitted > 0
    with f.hard_prune_preview(masks):
        preview = model(batch[0]).detach().clone()
    f.finalize()
    hard_prune(problem.targets, masks)
    assert torch.equal(model(batch[0]).detach(), preview)


@pytest.mark.parametrize("grouping", ["unstructured", "structured"])
@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_min_layer_density_keeps_a_layer_the_global_budget_would_empty(grouping, floor):
    """Model scope, the second layer's gates all off and its weights tiny: one global budget empties it;
    with min_layer_density it keeps ceil(floor * n) of its weights (groups), and the total stays the budget's."""
    problem, _ = _mlp_problem(sparsity=0.5)
    f = make("l0", problem, L0Config(grouping=grouping, min_layer_density=floor))
    f.setup(1, 1)
    first, second = problem.targets
    with torch.no_grad():
        f.gates[first.name].log_alpha.fill_(5.0)
        f.gates[second.name].log_alpha.fill_(-9.0)
        second.module.parametrizations[second.param_name].original.mul_(1e-3)
    masks = f.hard_masks()
    groups = f.gates[second.name].log_alpha.numel()
    kept_groups = int(masks[second.name].reshape(-1, *f.gates[second.name].log_alpha.shape).any(0).sum())
    if grouping == "unstructured":
        kept_groups = int(masks[second.name].sum())
    assert kept_groups == math.ceil(floor * groups)
    if grouping == "unstructured":
        assert sum(int(m.sum()) for m in masks.values()) == sum(t.feasible_set.k for t in problem.targets)
    f.finalize()
    assert bool(getattr(second.module, second.param_name).detach().ne(0).any()) == (floor > 0)


def test_model_scope_masks_of_gates_not_yet_apart_keep_every_layer_in_proportion():
    """Stopped before the gates moved: every log alpha equal, the second layer's weights 100x smaller. The
    global budget ranks by log alpha (the same scale in every layer), ties by |w| over its layer's RMS, so
    each layer keeps about its share (raw |w| ranked every weight of the second layer below the first's)."""
    problem, _ = _mlp_problem(sparsity=0.5)
    f = make("l0", problem, L0Config(scope="model"))
    f.setup(1, 1)
    first, second = problem.targets
    with torch.no_grad():
        second.module.parametrizations[second.param_name].original.mul_(1e-2)
    masks = f.hard_masks()
    assert sum(int(m.sum()) for m in masks.values()) == sum(t.feasible_set.k for t in problem.targets)
    for target in (first, second):
        assert abs(masks[target.name].float().mean().item() - 0.5) <= 0.2
        magnitude = target.module.parametrizations[target.param_name].original.detach().abs()
        kept, dropped = magnitude[masks[target.name]], magnitude[~masks[target.name]]
        assert kept.min() >= dropped.max()  # within a layer: still its largest weights


def test_min_layer_density_above_a_target_density():
    problem, _ = _mlp_problem(sparsity=0.9)
    with pytest.raises(ValueError, match=r"min_layer_density must be at most every target's density 1 - sparsity: "
                       r"got 0.2 for 0.weight at density 0.1"):  # fmt: skip
        make("l0", problem, L0Config(min_layer_density=0.2))
    with pytest.raises(ValueError, match=r"min_layer_density"):
        make("l0", _mlp_problem()[0], min_layer_density=1.0)


def _trained_l0(batch, **settings):
    problem, _ = _mlp_problem()
    f = make("l0", problem, L0Config(**settings), optimizer=torch.optim.SGD(problem.model.parameters(), lr=0.1))
    f.setup(1, 2)
    f.start_epoch(0)
    for _ in range(2):
        f.training_step(batch)
    return f


def test_a_state_with_nupi_dual_optimizer_saves_weights_only_and_resumes(tmp_path):
    """density_dual_kp > 0 makes the dual optimizer Cooper's nuPI, whose param groups hold an enum: the state
    stores its value (torch.load(weights_only=True) refused the file) and load_state_dict makes it the enum."""
    _, batch = _mlp_problem()
    f = _trained_l0(batch, density_dual_kp=2.0)
    torch.save(f.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    again = _trained_l0(batch, density_dual_kp=2.0)
    again.load_state_dict(state)
    kinds = [type(g["init_type"]) for g in again.dual_optimizer.param_groups]
    assert kinds == [type(g["init_type"]) for g in f.dual_optimizer.param_groups] and kinds[0] is not int
    assert torch.equal(again.problem.l0_density.multiplier.weight, f.problem.l0_density.multiplier.weight)
    again.training_step(batch)  # nuPI steps with the restored groups


@pytest.mark.parametrize(
    ("name", "settings", "extra"),
    [
        ("l0", {"test_gap_max": 1.0}, "l0_test_gap"),
        ("l0", {"density_constraint": "inequality"}, "l0_density_min"),
    ],
)
def test_load_state_dict_refuses_a_state_of_other_constraints_before_restoring_anything(name, settings, extra):
    _, batch = _mlp_problem()
    state = _trained_l0(batch, test_gap_max=0.01 if extra == "l0_test_gap" else 1.0).state_dict()
    problem, _ = _mlp_problem()
    config = L0PenaltyConfig(**settings) if name == "l0-penalty" else L0Config(**settings)
    other = make(name, problem, config)
    other.setup(1, 2)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=rf"^load_state_dict\(\): the state has cmp/multipliers/{extra}, which this "):
        other.load_state_dict(state)
    assert other.state_dict()["epoch_steps"] == before["epoch_steps"]
    penalty = make("l0-penalty", _mlp_problem()[0])
    penalty.setup(1, 2)
    with pytest.raises(
        ValueError, match=r"^load_state_dict\(\): the state is a 'l0' formulation's, this one is 'l0-pe"
    ):
        penalty.load_state_dict(state)


def test_hard_prune_preview_after_finalize_is_refused():
    problem, batch = _mlp_problem()
    f = make("l0", problem)
    f.setup(1, 1)
    masks = f.hard_masks()
    f.finalize()
    with pytest.raises(ValueError, match=r"^hard_prune_preview\(\) after finalize\(\): the formulation has already"):
        f.hard_prune_preview(masks)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.1, 2.0), st.floats(-2.0, 2.0)), min_size=1, max_size=6))
def test_restarts_zero_exactly_the_satisfied_entries_and_their_dual_state(entries):
    """A vector multiplier with SGD momentum: after a dual step on mixed violations, exactly the entries whose
    constraint held are 0 and lose their momentum; the others keep their projected value and momentum."""
    start, first, second = (torch.tensor(v, dtype=torch.float32) for v in zip(*entries))
    multiplier = RestartingMultiplier(len(entries))
    cooper.Constraint(cooper.ConstraintType.INEQUALITY, cooper.formulations.Lagrangian, multiplier=multiplier)
    dual = torch.optim.SGD(multiplier.parameters(), lr=0.5, maximize=True, momentum=0.9)
    with torch.no_grad():
        multiplier.weight.copy_(start)
    for violation in (first, second):  # the first builds momentum (every constraint violated: no restart)
        multiplier.weight.grad = violation.clone()
        dual.step()
        stepped = multiplier.weight.detach().clone()
        buffer = dual.state[multiplier.weight]["momentum_buffer"].clone()
        multiplier.post_step_()
        reset_dual_state_(dual, multiplier)
    satisfied = second <= 0
    value, kept_buffer = multiplier.weight.detach(), dual.state[multiplier.weight]["momentum_buffer"]
    assert bool((value >= 0).all())
    assert torch.equal(multiplier.last_satisfied, satisfied)
    assert torch.equal(multiplier.last_restart, satisfied & (stepped.clamp_min(0) > 0))
    assert torch.equal(value[satisfied], torch.zeros(int(satisfied.sum())))
    assert torch.equal(value[~satisfied], stepped.clamp_min(0)[~satisfied])
    assert torch.equal(kept_buffer[satisfied], torch.zeros(int(satisfied.sum())))
    assert torch.equal(kept_buffer[~satisfied], buffer[~satisfied])


@pytest.mark.parametrize("name", ["l0", "l0-penalty"])
def test_gates_in_a_users_sgd_warn_that_their_steps_scale_with_one_over_the_gate_count(name, recwarn):
    problem, _ = _mlp_problem()
    gates = sum(t.tensor.numel() for t in problem.targets)  # one gate per target weight
    make(name, problem, optimizer=torch.optim.SGD(problem.model.parameters(), lr=0.1, momentum=0.9))
    messages = [w for w in recwarn if "gates (log alpha) learn in a group of your SGD" in str(w.message)]
    assert len(messages) == 1 and messages[0].filename == __file__  # points at the make() call
    assert f"{name}'s {gates} gates" in str(messages[0].message)
    assert f"order 1/{gates}" in str(messages[0].message)
    problem, _ = _mlp_problem()
    make(name, problem, optimizer=torch.optim.AdamW(problem.model.parameters(), lr=1e-3))
    problem, _ = _mlp_problem()
    make(name, problem, optimizer=torch.optim.SGD(problem.model.parameters(), lr=0.1), gate_lr=1000.0)
    assert len([w for w in recwarn if "learn in a group of your SGD" in str(w.message)]) == 1  # none for AdamW
    # nor for a gate_lr of the user's (chosen for their optimizer)


class _Checkpointed(nn.Module):
    """Two checkpointed segments (or none) that share a gated layer: the same weights either way."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.block = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.shared = nn.Linear(32, 32)  # read by both segments: one gate sample per step for both reads
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        first = lambda v: torch.tanh(self.shared(self.block(v)))  # noqa: E731
        second = lambda v: torch.tanh(self.shared(v))  # noqa: E731
        if self.mode == "plain":
            return self.head(second(first(x)))
        reentrant = self.mode == "reentrant"
        hidden = checkpoint(first, x, use_reentrant=reentrant)
        return self.head(checkpoint(second, hidden, use_reentrant=reentrant))


@pytest.mark.parametrize("name", ["l0", "l0-penalty"])
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_activation_checkpointing_backpropagates_the_gates_the_forward_drew(name, mode):
    # One gate draw per Lagrangian: the forwards recomputed inside the backward (in reverse segment order) see
    # the forward's gates, though torch.utils.checkpoint restores only the global RNG, and the shared layer has
    # one mask per step: the gradients and the next steps are those of the same model without checkpointing.
    # Inputs that require grad: reentrant checkpointing backpropagates into the block's weights only then.
    x, y = torch.randn(16, 12, requires_grad=True), torch.randint(0, 3, (16,))

    def steps(model_mode: str) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(3)
        model = _Checkpointed(model_mode)
        problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        f = make(name, problem, optimizer=optimizer)
        f.setup(num_epochs=1, steps_per_epoch=3)
        f.start_epoch(0)
        grads = []
        for _ in range(3):
            optimizer.zero_grad()
            step = f.backward((x, y))
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
            f.post_step(step)
        return grads

    plain, checkpointed = steps("plain"), steps(mode)
    for expected, got in zip(plain, checkpointed, strict=True):
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[n], got[n]) for n in expected)
