"""l0 / l0-penalty: restarting multipliers, config validation, optimizer groups, masks, runs."""

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
        (L0PenaltyConfig(lmbda=-0.5), r"lmbda must be a finite number >= 0, got -0.5"),
        (L0PenaltyConfig(gate_lr=0.0), r"gate_lr must be > 0, got 0.0"),
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


# --- optimizer, masks, finalize -----------------------------------------------------------------


def test_gates_have_their_own_lr_and_no_weight_decay():
    problem, batch = _mlp_problem()
    f = make("l0", problem, L0Config(gate_lr=0.3, weight_decay=0.01), lr=1e-3, dual_lr=1.0)
    f.setup(1, 1)
    weights, gates = f.optimizer.primal_optimizers[0].param_groups
    assert (weights["lr"], weights["weight_decay"], gates["lr"], gates["weight_decay"]) == (1e-3, 0.01, 0.3, 0.0)
    gate_ids = {id(g.log_alpha) for g in f.gates.values()}
    assert {id(p) for p in gates["params"]} == gate_ids
    assert not gate_ids & {id(p) for p in weights["params"]}
    assert len(weights["params"]) + len(gates["params"]) == len(list(problem.model.parameters()))
    assert isinstance(f.optimizer, cooper.optim.SimultaneousOptimizer)
    f.training_step(batch)
    assert all(float(m.weight.detach()) >= 0 for m in f.multipliers().values())


def test_layer_scope_has_one_constraint_per_target_and_logs_the_dynamics():
    problem, batch = _mlp_problem()
    f = make("l0", problem, L0Config(scope="layer", log_interval=1, dual_restarts=False), dual_lr=1.0)
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
        config = L0Config(scope="layer", density_constraint=kind, dual_restarts=dual_restarts, log_interval=1)
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
        assert not any(bool(m.last_restart.any()) for m in f.multipliers().values()) or kind == "inequality"
    assert violations["equality"] < 0 and violations["inequality"] < 0
    assert all(value == 0.0 for value in multipliers["inequality"].values())  # projected (or restarted) to 0
    assert all(value < 0.0 for value in multipliers["equality"].values())  # free in sign: pushes density up


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_two_sided_density_is_a_pair_of_restarting_inequalities(sparsity):
    # Density ~0.998 at the start: above the level 0.5 (upper bound violated), below 1.0 (lower bound violated).
    problem, batch = _mlp_problem(sparsity=sparsity)
    f = make("l0", problem, L0Config(density_constraint="two-sided", log_interval=1), dual_lr=1.0)
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
    assert isinstance(f.optimizer.dual_optimizers[0], cooper.optim.nuPI)
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
    assert type(f.optimizer.dual_optimizers[0]) is torch.optim.SGD


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
    dual = f.optimizer.dual_optimizers[0]
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
    f = make("l0", problem, L0Config(grouping="structured"))
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
    f = make("l0", problem, L0Config(grouping="structured"))
    f.setup(1, 1)
    gate = f.gates["0.weight"]
    gate.log_alpha.data = torch.tensor([5.0, -5.0, 5.0, -5.0, -5.0])
    mask = f.hard_masks()["0.weight"]
    channels = mask.reshape(5, -1)
    assert bool((channels == channels[:, :1]).all())  # whole output channels
    assert channels[:, 0].tolist() == [True, False, True, False, False]  # round(0.4 * 5) = 2 kept
    fc = f.hard_masks()["3.weight"]
    assert bool((fc == fc.all(dim=0, keepdim=True)).all()) and int(fc.all(dim=0).sum()) == 12


def test_penalty_wraps_and_restores_the_loss():
    problem, batch = _mlp_problem()
    task = problem.loss_fn
    f = make("l0-penalty", problem, L0PenaltyConfig(lmbda=2.0))
    f.setup(1, 1)
    assert isinstance(f.optimizer, cooper.optim.UnconstrainedOptimizer)
    problem.model.eval()
    with torch.no_grad():
        out = problem.model(batch[0])
        assert float(problem.loss_fn(out, batch[1])) == pytest.approx(
            float(task(out, batch[1]) + 2.0 * f.expected_density())
        )
    f.finalize()
    assert problem.loss_fn is task


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
            formulation="l0", sparsity=0.8, epochs=1, out=tmp_path, settings={"grouping": "structured"}, **COMMON
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
