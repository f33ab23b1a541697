"""SLR and ADMM on the shared W = Z core: step-size rule, surrogate conditions, Z feasibility, ADMM's
dual step, the W-step's gradient, and what the two formulations share."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from constrainedsparse import make
from constrainedsparse.formulations import formulation_class, iterate
from constrainedsparse.formulations import slr as slr_module
from constrainedsparse.formulations.duplicate import CONSTRAINT_PREFIX
from constrainedsparse.formulations.rho import PenaltyRule
from constrainedsparse.formulations.slr import slr_alpha
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.targets import SparsityConfig, Targets

PATTERNS = [
    SparsityConfig(sparsity=0.5),
    SparsityConfig(sparsity=0.8, pattern="row"),
    SparsityConfig.from_pattern("2:4"),
    SparsityConfig(sparsity=0.5, pattern="structured"),
]


def _tiny(name: str, seed: int = 0, target: SparsityConfig = PATTERNS[0], lr: float = 1e-2, **config):
    """A tiny model and problem; coordination only when a test asks for it (epoch interval, no growth)."""
    config = {"interval_unit": "epoch", "interval": 1, "rho_growth": 1.0, **config}
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    problem = SparsityProblem(model, F.cross_entropy, Targets().resolve(model, target))
    cls = formulation_class(name)
    formulation = cls(problem, cls.Config(**config), lr=lr, dual_lr=1e-2)
    formulation.setup(num_epochs=1, steps_per_epoch=6, reference_batch=(x, y))
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
    return formulation, batches


def _lambdas(formulation) -> dict[str, torch.Tensor]:
    return {name: lam.clone() for name, lam in formulation.multipliers().items()}


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 10**6),
    M=st.floats(1.001, 1e4),
    r=st.floats(0.001, 0.999),
)
def test_alpha_is_in_unit_interval_and_increasing(k, M, r):
    alpha = slr_alpha(k, M, r)
    assert 0.0 < alpha < 1.0
    assert slr_alpha(k + 1, M, r) >= alpha


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=12), limit=st.integers(1, 80))
def test_chunks_cut_the_names_in_order_into_greedy_runs_within_the_limit(sizes, limit):
    names = [f"t{i}" for i in range(len(sizes))]
    size = dict(zip(names, sizes))
    runs = iterate.chunks(names, sizes, limit)
    assert [n for run in runs for n in run] == names and all(runs)
    for run in runs:
        assert len(run) == 1 or sum(size[n] for n in run) <= limit  # a larger tensor alone
    for run, following in zip(runs, runs[1:]):
        assert sum(size[n] for n in run) + size[following[0]] > limit  # a run ends only where the next would not fit


def test_alpha_defaults_golden():
    # k = 1: k**anything = 1, so alpha = 1 - 1/M.
    assert slr_alpha(1, 300.0, 0.1) == pytest.approx(1 - 1 / 300)
    assert slr_alpha(2, 300.0, 0.1) == pytest.approx(1 - 1 / (300 * 2 ** (1 - 1 / 2**0.1)))


@pytest.mark.parametrize("name", ["slr", "admm"])
@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_every_z_step_is_feasible_and_step_sizes_stay_positive(seed, pattern, name):
    formulation, batches = _tiny(name, seed=seed, target=pattern, rho=0.5)
    for _ in range(3):
        for batch in batches[:3]:
            formulation.training_step(batch)
        formulation.coordinate()
        for target in formulation.problem.targets:
            assert target.feasible_set.contains(formulation.z[target.name])
        if name == "slr":
            assert formulation.step_size > 0 and formulation.s_prime > 0


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_slr_multipliers_move_exactly_by_the_steps_whose_condition_held(seed):
    formulation, batches = _tiny("slr", seed=seed, rho=0.3)
    for _ in range(3):
        for batch in batches[:3]:
            formulation.training_step(batch)
        before = _lambdas(formulation)
        w = {n: t.clone() for n, t in formulation.weights().items()}
        z_prev = {n: t.clone() for n, t in formulation.z.items()}
        metrics = formulation.coordinate()
        expected = {}
        for name in before:
            lam = before[name]
            if metrics["condition/6_holds"]:
                lam = lam + metrics["stepsize/s_prime"] * (w[name] - z_prev[name])
            if metrics["condition/11_holds"]:
                lam = lam + metrics["stepsize/s"] * (w[name] - formulation.z[name])
            expected[name] = lam
        for name, lam in formulation.multipliers().items():
            torch.testing.assert_close(lam, expected[name], rtol=1e-5, atol=1e-7)


def test_slr_condition_6_fails_without_a_w_step_and_leaves_lambda_prime_unchanged():
    formulation, batches = _tiny("slr", rho=0.3)
    for batch in batches:
        formulation.training_step(batch)
    formulation.coordinate()
    step_before = formulation.step_size
    metrics = formulation.coordinate()  # W^k == W^{k-1}: L_rho cannot strictly decrease
    assert metrics["condition/6_holds"] == 0.0
    assert metrics["stepsize/s_prime"] == step_before  # carried over


def test_slr_both_conditions_fail_on_an_already_sparse_model_and_nothing_moves():
    formulation, _ = _tiny("slr", s0=0.02)
    with torch.no_grad():
        for target in formulation.problem.targets:
            target.tensor.copy_(target.feasible_set.project(target.tensor))
    formulation.z = {t.name: t.tensor.detach().clone() for t in formulation.problem.targets}
    formulation.previous = formulation.f_prev = None
    formulation.on_setup()  # measures f and the terms of W - Z again, at the sparse point
    metrics = formulation.coordinate()
    assert metrics["condition/6_holds"] == 0.0 and metrics["condition/11_holds"] == 0.0
    assert formulation.step_size == 0.02
    for lam in formulation.multipliers().values():
        assert torch.count_nonzero(lam) == 0


@pytest.mark.parametrize("growth", [1.0, 1.5])
def test_admm_dual_step_is_exactly_rho_times_residual(growth):
    formulation, batches = _tiny("admm", rho=0.25, rho_growth=growth)
    for update in range(3):
        for batch in batches:
            formulation.training_step(batch)
        before = _lambdas(formulation)
        rho = formulation.rho
        w = {n: t.clone() for n, t in formulation.weights().items()}
        formulation.coordinate()
        for name, lam in formulation.multipliers().items():
            step = rho * (w[name] - formulation.z[name])
            if update == 0:
                assert torch.equal(lam, step)  # from Lambda = 0: exactly rho (W - Z)
            torch.testing.assert_close(lam - before[name], step, rtol=0, atol=1e-7)
        assert formulation.rho == pytest.approx(0.25 * growth ** (update + 1))


def test_rho_growth_is_capped_and_reaches_cooper_penalty_coefficients():
    formulation, _ = _tiny("admm", rho=1.0, rho_growth=10.0, rho_max=50.0)
    formulation.coordinate()
    formulation.coordinate()
    assert formulation.rho == 50.0
    for name, constraint in formulation.problem.named_constraints():
        if name.startswith(CONSTRAINT_PREFIX):
            assert float(constraint.penalty_coefficient.value) == 50.0


def _sgd_run(name: str, lr: float, steps: int, **config):
    """``steps`` split steps of a user's SGD (momentum 0.9), coordinating after every step, rho doubling."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    problem = SparsityProblem(model, F.cross_entropy, Targets().resolve(model, SparsityConfig(sparsity=0.5)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    cls = formulation_class(name)
    settings = {"rho": 0.1, "rho_growth": 2.0, "interval": 1, "interval_unit": "step", **config}
    formulation = cls(problem, cls.Config(**settings), optimizer=optimizer, dual_lr=1e-2)
    formulation.setup(num_epochs=1, steps_per_epoch=steps, reference_batch=(x, y))
    rhos = []
    for i in range(steps):
        optimizer.zero_grad()
        step = formulation.backward((x[i % 6 * 8 : i % 6 * 8 + 8], y[i % 6 * 8 : i % 6 * 8 + 8]))
        optimizer.step()
        formulation.post_step(step)
        rhos.append(formulation.rho)
    return formulation, model, optimizer, rhos


@pytest.mark.parametrize("name", ["slr", "admm"])
def test_rho_is_held_at_one_over_the_sgd_learning_rate_where_it_would_diverge(name, monkeypatch):
    with pytest.warns(UserWarning, match=r"holds rho at 2 = 1 / lr of your SGD instead of 3\.2") as caught:
        _, model, _, rhos = _sgd_run(name, lr=0.5, steps=30)
    held = [w for w in caught if "holds rho" in str(w.message)]
    assert len(held) == 1 and held[0].filename == __file__  # once, at the user's post_step line
    assert max(rhos) == 2.0 and rhos[-1] == 2.0  # 0.1 x 2^k, held at 1 / 0.5
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    # the same run without the bound diverges: what the hold prevents
    monkeypatch.setattr(PenaltyRule, "stable", lambda self: float("inf"))
    _, model, _, rhos = _sgd_run(name, lr=0.5, steps=30, rho_max=100.0)
    assert rhos[-1] == 100.0
    assert not all(bool(p.isfinite().all()) for p in model.parameters())


def test_the_rho_bound_follows_the_learning_rate_and_ignores_adaptive_optimizers():
    formulation, _, optimizer, _ = _sgd_run("admm", lr=0.5, steps=1, rho_max=1e4)
    rule = formulation.penalty_rule
    assert rule.stable() == 2.0
    for group in optimizer.param_groups:
        group["lr"] = 0.25  # a schedule lowered it: the bound rises
    assert rule.stable() == 4.0
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": 10.0})  # holds no target
    assert rule.stable() == 4.0
    state = optimizer.state_dict()
    state["param_groups"][0]["lr"] = 0.125
    optimizer.load_state_dict(state)  # a resume: new group dicts, the lr of the checkpoint
    assert rule.stable() == 8.0
    adam, _ = _tiny("admm", rho=1.0, rho_growth=10.0)
    assert adam.penalty_rule.stable() == float("inf")


@pytest.mark.parametrize("own_backward", [False, True], ids=["f.backward", "compute_lagrangian+own-backward"])
def test_rho_follows_a_learning_rate_raised_between_coordinations_before_the_next_w_step(own_backward):
    formulation, _, optimizer, rhos = _sgd_run("slr", lr=0.1, steps=12, interval=4)
    assert rhos[-1] == pytest.approx(0.1 * 2**3)  # three coordinations, far below 1 / 0.1
    for group in optimizer.param_groups:
        group["lr"] = 2.0  # a warm restart: the bound drops to 0.5
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    with pytest.warns(UserWarning, match=r"holds rho at 0\.5 = 1 / lr of your SGD instead of 0\.8") as caught:
        if own_backward:  # the hooks path: the user's backward of the Lagrangian
            formulation.compute_lagrangian((x, y)).lagrangian.backward()
        else:
            formulation.backward((x, y))
    assert caught[0].filename == __file__
    assert formulation.rho == 0.5  # before this step's penalty gradient


def test_slr_step_sizes_never_exceed_rho_with_sgd_and_keep_the_rule_with_adam(monkeypatch):
    """Every step the rule proposes is 10 (s0 = 1, the ratios 10) and rho is constant: with the user's SGD the
    carried and the ratio steps are held at rho (ADMM's step), before and after the Z-step; with Adam the rule
    is the papers'."""
    monkeypatch.setattr(slr_module, "_ratio_step", lambda alpha, step, numerator, denominator: 10.0)
    formulation, _, _, _ = _sgd_run("slr", lr=0.01, steps=1, rho=0.1, s0=1.0, rho_growth=1.0, interval=10**6)
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    held = set()
    for _ in range(6):
        for i in range(0, 48, 8):
            formulation.training_step((x[i : i + 8], y[i : i + 8]))
        metrics = formulation.coordinate()
        assert formulation.s_prime == formulation.step_size == formulation.rho
        held |= {key for key in ("condition/6_holds", "condition/11_holds") if metrics[key]}
    assert held == {"condition/6_holds", "condition/11_holds"}  # both ratio steps were proposed and capped
    adam, batches = _tiny("slr", rho=0.1, s0=1.0)
    for batch in batches:
        adam.training_step(batch)
    adam.coordinate()
    assert max(adam.s_prime, adam.step_size) > adam.rho


@pytest.mark.parametrize(
    ("optimizer", "settings", "warns"),
    [
        ("sgd-momentum", {}, True),  # 4 coordinations in a 10-step epoch: 2.5 steps apart, momentum needs 10
        ("sgd-momentum", {"interval": 10, "interval_unit": "step"}, False),
        ("sgd", {}, False),
        ("adam", {}, False),
        ("sgd-momentum", {"interval": 1, "interval_unit": "epoch"}, False),  # 10 steps apart
    ],
)
def test_admm_warns_when_coordinations_are_closer_than_sgd_momentum_settles(optimizer, settings, warns, recwarn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    problem = SparsityProblem(model, F.cross_entropy, Targets().resolve(model, SparsityConfig(sparsity=0.5)))
    opt = {
        "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    }[optimizer](model.parameters())
    cls = formulation_class("admm")
    formulation = cls(problem, cls.Config(**settings), optimizer=opt)
    formulation.setup(num_epochs=2, steps_per_epoch=10)
    caught = [w for w in recwarn if "W-steps between coordinations" in str(w.message)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == int(warns)
    if warns:
        assert caught[0].filename == __file__
        assert "admm coordinates every 2.5 W-steps, fewer than the 10 " in messages[0]
        assert "leave at least 10 W-steps between coordinations" in messages[0]


def test_w_step_gradient_is_loss_gradient_plus_lambda_plus_rho_residual():
    """Golden test on hand-set weights: the Cooper primal Lagrangian is exactly L_rho."""
    formulation, batches = _tiny("admm", rho=0.7)
    problem = formulation.problem
    with torch.no_grad():
        for i, target in enumerate(problem.targets):
            formulation.constraints[target.name].multiplier.weight.copy_(
                torch.linspace(-1, 1, target.tensor.numel()) * (i + 1)
            )
    batch = batches[0]
    reference = copy.deepcopy(problem.model)
    F.cross_entropy(reference(batch[0]), batch[1]).backward()

    problem.model.zero_grad()
    problem.compute_cmp_state(batch).compute_primal_lagrangian().backward()
    lam = formulation.multipliers()
    for target in problem.targets:
        expected_grad = (
            reference.get_parameter(target.name).grad
            + lam[target.name]
            + 0.7 * (target.tensor.detach() - formulation.z[target.name])
        )
        torch.testing.assert_close(target.tensor.grad, expected_grad)
        assert target.tensor.grad is not None
    # Multipliers are not touched by a W-step (their updates are the formulation's).
    for constraint in formulation.constraints.values():
        assert constraint.multiplier.weight.grad is None


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_backward_adds_the_penalty_of_all_weights_at_once_as_the_per_tensor_hooks_do(scale):
    """backward(scale) adds scale x the penalty after its backward (foreach); the user's own backward of the
    unscaled Lagrangian goes through the hooks one tensor at a time: the same gradient up to the scale."""
    formulation, batches = _tiny("admm", rho=0.7)
    with torch.no_grad():
        for i, constraint in enumerate(formulation.constraints.values()):
            constraint.multiplier.weight.copy_(torch.linspace(-1, 1, constraint.multiplier.weight.numel()) * (i + 1))
    params = [t.tensor for t in formulation.problem.targets]
    formulation.backward(batches[0], scale=scale)
    deferred = [p.grad.clone() for p in params]
    formulation.problem.model.zero_grad()
    formulation.compute_lagrangian(batches[0]).lagrangian.backward()
    for d, p, lam, z in zip(deferred, params, formulation.multipliers().values(), formulation.z.values()):
        torch.testing.assert_close(d, scale * p.grad, rtol=1e-5, atol=1e-7)
        penalty = lam + 0.7 * (p.detach() - z)
        assert penalty.abs().max() > 0.1  # not negligible: without the hooks the two would differ


def test_slr_and_admm_share_identical_w_steps_until_the_first_dual_update():
    slr, batches = _tiny("slr", seed=4, interval=4, interval_unit="step")
    admm, _ = _tiny("admm", seed=4, interval=4, interval_unit="step")
    for step, batch in enumerate(batches, start=1):
        _, slr_metrics = slr.training_step(batch)
        _, admm_metrics = admm.training_step(batch)
        same = all(torch.equal(a, b) for a, b in zip(slr.problem.model.parameters(), admm.problem.model.parameters()))
        if step <= 4:
            assert same, f"W differs after step {step}, before any dual update"
        assert ("coordination/k" in slr_metrics) == (step % 4 == 0) == ("coordination/k" in admm_metrics)
    assert not same  # after the first coordination the dual steps differ, and so do the W-steps


def test_epoch_interval_coordinates_at_epoch_ends_and_finalize_removes_w_eq_z_constraints():
    formulation, batches = _tiny("slr")
    for batch in batches:
        _, metrics = formulation.training_step(batch)
        assert "coordination/k" not in metrics
    metrics = formulation.end_epoch(0)
    assert metrics["coordination/k"] == 1.0
    for key in (
        "dual/residual",
        "dual/lambda_norm",
        "penalty/rho",
        "stepsize/alpha",
        "stepsize/s",
        "condition/6_holds",
        "condition/11_holds",
    ):
        assert key in metrics
    assert formulation.problem.dual_optimizer(0.1) is None  # W = Z multipliers are not stepped per batch
    z, lam = weakref.ref(formulation.z["0.weight"]), weakref.ref(formulation.constraints["0.weight"].multiplier.weight)
    formulation.finalize()
    assert not any(name.startswith(CONSTRAINT_PREFIX) for name, _ in formulation.problem.named_constraints())
    gc.collect()
    assert z() is None and lam() is None  # Z and Λ freed while the formulation object lives on (its dual optimizer too)


def test_hard_masks_hit_the_target_from_w_or_z():
    for source in ("w", "z"):
        formulation, batches = _tiny("slr", mask_from=source, target=SparsityConfig(sparsity=0.75))
        for batch in batches:
            formulation.training_step(batch)
        formulation.coordinate()
        masks = formulation.hard_masks()
        for target in formulation.problem.targets:
            assert int(masks[target.name].sum()) == target.feasible_set.k


def test_slr_needs_a_reference_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    problem = SparsityProblem(model, F.cross_entropy, Targets().resolve(model, SparsityConfig(sparsity=0.5)))
    slr = formulation_class("slr")(problem, formulation_class("slr").Config(), lr=1e-3, dual_lr=1e-3)
    with pytest.raises(ValueError, match=r"slr needs a reference batch: pass reference_batch to setup\(\)"):
        slr.setup(1, 1)


def test_slr_refuses_a_reference_batch_whose_loss_is_not_finite():
    """Condition (6) compares f on the reference batch: a NaN there failed every comparison and Λ never moved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    problem = SparsityProblem(model, F.cross_entropy, Targets().resolve(model, SparsityConfig(sparsity=0.5)))
    slr = formulation_class("slr")(problem, formulation_class("slr").Config(), lr=1e-3, dual_lr=1e-3)
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^slr: the loss on the reference batch is nan \(not finite\)"):
        slr.setup(1, 1, reference_batch=(x, torch.zeros(8, dtype=torch.long)))
    slr.setup(1, 1, reference_batch=(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)))  # the refusal kept nothing
    assert math.isfinite(slr.f_prev)


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("slr", {"rho": 0.0}, r"rho must be > 0, got 0.0"),
        ("admm", {"rho": -1.0}, r"rho must be > 0, got -1.0"),
        ("slr", {"s0": 0.0}, r"s0 must be > 0, got 0.0"),
        ("slr", {"M": 1.0}, r"M must be > 1, got 1.0"),
        ("slr", {"r": 1.0}, r"r must be in \(0, 1\), got 1.0"),
        ("slr", {"r": 0.0}, r"r must be in \(0, 1\), got 0.0"),
        ("admm", {"interval": 0}, r"interval must be an integer >= 1, got 0"),
        ("admm", {"interval_unit": "batch"}, r"interval_unit must be one of epoch, step, per-epoch, got 'batch'"),
        ("admm", {"rho_growth": 0.9}, r"rho_growth must be >= 1, got 0.9"),
        ("admm", {"rho": 2.0, "rho_max": 1.0}, r"rho_max must be >= rho \(2.0\), got 1.0"),
        ("slr", {"mask_from": "x"}, r"mask_from must be one of w, z, got 'x'"),
    ],
)
def test_bad_hyperparameters_are_precise_value_errors(name, config, message):
    with pytest.raises(ValueError, match=message):
        formulation_class(name).Config(**config).validate()


def test_slr_run_logs_dual_dynamics_to_jsonl_and_wandb_and_retrains_without_w_eq_z(tmp_path):
    import json

    from wandb_records import history_rows, wait_for_complete_run

    from constrainedsparse import RunConfig, run

    out = tmp_path / "slr"
    summary = run(
        RunConfig(
            formulation="slr", sparsity=0.9, epochs=2, retrain_epochs=1, pretrain_epochs=2, out=out,
            wandb="offline", progress=False, settings={"interval": "5"},
        )
    )  # fmt: skip
    assert summary["formulation"] == "slr"
    assert 0.0 <= summary["hardprune_accuracy"] <= 1.0 and 0.0 <= summary["retrain_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    coordinations = [r for r in rows if "coordination/k" in r]
    assert len(coordinations) == 2 * 5  # interval=5 in the default unit: 5 coordinations per epoch
    expected = {
        "condition/6_holds", "condition/11_holds", "stepsize/alpha", "stepsize/s", "stepsize/s_prime",
        "penalty/rho", "dual/residual", "dual/lambda_norm", "residual/0.weight", "lambda/2.weight",
        "offsupport/4.weight", "lagrangian/L_rho",
    }  # fmt: skip
    assert expected <= set(coordinations[0])
    assert [r["coordination/k"] for r in coordinations] == list(range(1, len(coordinations) + 1))
    epoch_rows = [r for r in rows if "accuracy/hardprune_now" in r]
    assert [r["epoch"] for r in epoch_rows] == [1, 2, 1]  # two pruning epochs, one retraining epoch
    logged = [r for r in history_rows(wait_for_complete_run(out)) if "condition/6_holds" in r]
    assert len(logged) == len(coordinations)
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["slr", "admm"])
@pytest.mark.parametrize("chunk", [None, 1])  # one foreach run over all tensors, or one run per tensor
def test_dynamics_metrics_are_the_norms_they_name(name, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(iterate, "CHUNK_ELEMENTS", chunk)
    formulation, batches = _tiny(name, rho=0.4)
    for batch in batches[:3]:
        formulation.training_step(batch)
    z_prev = {n: z.clone() for n, z in formulation.z.items()}
    metrics = formulation.coordinate()
    w, z, lam = formulation.weights(), formulation.z, formulation.multipliers()
    for n in w:
        outside = w[n] * (z[n] == 0)
        assert metrics[f"offsupport/{n}"] == pytest.approx(float(outside.norm() / w[n].norm()), rel=1e-5)
        assert metrics[f"lambda/{n}"] == pytest.approx(float(lam[n].norm()), rel=1e-5)
        assert metrics[f"residual/{n}"] == pytest.approx(float((w[n] - z[n]).norm()), rel=1e-5, abs=1e-7)
    change = sum(float((z[n] - z_prev[n]).pow(2).sum()) for n in w) ** 0.5
    assert metrics["dual/z_change"] == pytest.approx(change, rel=1e-5)
    assert 0.0 < metrics[f"offsupport/{next(iter(w))}"] < 1.0  # W is not yet sparse on Z's support


# --- the W-step's penalty gradient (a gradient hook), the coordination schedule, the levers ------------------


def _grad_of(formulation, batch, **backward):
    formulation.optimizer.zero_grad(set_to_none=True)
    formulation.backward(batch, **backward)
    return {t.name: t.tensor.grad.clone() for t in formulation.problem.targets}


@pytest.mark.parametrize("name", ["slr", "admm"])
def test_split_step_gradient_is_l_rho_gradient_also_scaled_accumulated_and_amp_scaled(name):
    formulation, batches = _tiny(name, rho=0.4)
    for batch in batches[:3]:
        formulation.training_step(batch)
    formulation.coordinate()  # non-zero Lambda and a Z different from W
    problem, lam, rho = formulation.problem, formulation.multipliers(), formulation.rho
    batch = batches[3]
    reference = copy.deepcopy(problem.model)  # a deep copy carries no hooks
    F.cross_entropy(reference(batch[0]), batch[1]).backward()
    expected = {
        t.name: reference.get_parameter(t.name).grad + lam[t.name] + rho * (t.tensor.detach() - formulation.z[t.name])
        for t in problem.targets
    }
    for factor, backward in ((1.0, {}), (0.25, {"scale": 0.25})):
        grads = _grad_of(formulation, batch, **backward)
        for target in problem.targets:
            torch.testing.assert_close(grads[target.name], factor * expected[target.name])
    # two micro-batches at scale 1/2 each: the penalty once in total, as with one backward of the mean
    formulation.optimizer.zero_grad(set_to_none=True)
    for half in (batch, batch):
        formulation.backward(half, scale=0.5)
    for target in problem.targets:
        torch.testing.assert_close(target.tensor.grad, expected[target.name])
    scaled = _grad_of(formulation, batch, scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    for target in problem.targets:
        torch.testing.assert_close(scaled[target.name], 8.0 * expected[target.name])
    # after finalize the hook is gone: the loss gradient alone
    formulation.finalize()
    problem.model.zero_grad(set_to_none=True)
    F.cross_entropy(problem.model(batch[0]), batch[1]).backward()
    for target in problem.targets:
        torch.testing.assert_close(target.tensor.grad, reference.get_parameter(target.name).grad)


class _TwoHeads(nn.Module):  # multi-task: a batch trains one head
    def __init__(self):
        super().__init__()
        self.body, self.head_a, self.head_b = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x, task):
        return (self.head_a if task == "a" else self.head_b)(torch.relu(self.body(x)))


@pytest.mark.parametrize("name", ["slr", "admm"])
def test_a_weight_the_batch_does_not_reach_still_gets_the_penalty_gradient(name):
    # The W = Z terms are in every Lagrangian: head_b, unused by task a's batch, is pulled towards Z too
    # (its hook never fires: it has no gradient from the backward), at the backward's scale.
    torch.manual_seed(0)
    model = _TwoHeads()
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.8))
    loss = lambda m, b: F.cross_entropy(m(b["x"], b["task"]), b["y"])  # noqa: E731
    problem = SparsityProblem(model, targets=targets, compute_loss=loss)
    formulation = make(name, problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    batch = {"x": torch.randn(4, 8), "y": torch.randint(0, 3, (4,)), "task": "a"}
    formulation.setup(1, 4, reference_batch=batch)
    formulation.start_epoch(0)
    for scale in (1.0, 0.5):
        formulation.optimizer.zero_grad(set_to_none=True)
        formulation.backward(batch, scale=scale)
        w = model.head_b.weight
        torch.testing.assert_close(w.grad, scale * 0.5 * (w.detach() - formulation.z["head_b.weight"]))
    formulation.backward(batch, scale=0.5)  # a second micro-batch: the grad it kept gets its share too
    torch.testing.assert_close(w.grad, 0.5 * (w.detach() - formulation.z["head_b.weight"]))
    assert (w.detach() - formulation.z["head_b.weight"]).abs().sum() > 0  # W ≠ Z: the gradient is no zero
    w.requires_grad_(False)  # frozen after make(): it stays frozen (no gradient for the optimizer to step)
    w.grad = None
    formulation.backward(batch)
    assert w.grad is None


def test_w_eq_z_constraints_are_cooper_constraints_outside_the_per_step_state():
    formulation, batches = _tiny("admm")
    problem = formulation.problem
    names = [name for name, _ in problem.named_constraints()]
    assert names == [CONSTRAINT_PREFIX + t.name for t in problem.targets]
    state = problem.compute_cmp_state(batches[0])
    assert state.observed_constraints == {}  # nothing evaluated per step: the hook adds the gradient
    with pytest.raises(ValueError, match=r"an unobserved constraint cannot take a dual step every step"):
        problem.add_constraint("x", problem.named_constraints().__next__()[1], lambda m, b: None, observed=False)


def test_dual_ascent_is_coopers_dual_lagrangian_step_bit_for_bit():
    import cooper

    formulation, batches = _tiny("slr", rho=0.3)
    for batch in batches:
        formulation.training_step(batch)
    residual = {n: w - formulation.z[n] for n, w in formulation.weights().items()}
    before = {n: c.multiplier.weight.detach().clone() for n, c in formulation.constraints.items()}
    # Cooper's way: the dual Lagrangian's gradient is the residual, SGD(lr=s, maximize=True) steps on it
    copies = {n: torch.nn.Parameter(lam.clone()) for n, lam in before.items()}
    sgd = torch.optim.SGD(list(copies.values()), lr=0.37, maximize=True)
    state = cooper.CMPState(
        observed_constraints={
            formulation.constraints[n]: cooper.ConstraintState(
                violation=r.reshape(-1), contributes_to_primal_update=False
            )
            for n, r in residual.items()
        }
    )
    dual = state.compute_dual_lagrangian().lagrangian
    grads = torch.autograd.grad(dual, [formulation.constraints[n].multiplier.weight for n in residual])
    for copy_, grad in zip(copies.values(), grads):
        copy_.grad = grad
    sgd.step()
    formulation.dual_ascent(0.37, residual)
    for name, constraint in formulation.constraints.items():
        assert torch.equal(constraint.multiplier.weight.detach(), copies[name].detach())


def test_parametrized_targets_are_refused():
    from constrainedsparse.masks import apply_masks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
    apply_masks(targets, {t.name: torch.ones_like(t.tensor, dtype=torch.bool) for t in targets})
    problem = SparsityProblem(model, F.cross_entropy, targets)
    with pytest.raises(ValueError, match=r"^admm: 0\.weight carries masks already \(apply_masks\): keep them with "):
        formulation_class("admm")(problem, formulation_class("admm").Config())


@pytest.mark.parametrize(("steps", "per_epoch", "expected"), [(23, 4, [6, 12, 18, 23]), (5, 8, [1, 2, 3, 4, 5])])
def test_per_epoch_interval_coordinates_evenly_within_every_epoch(steps, per_epoch, expected):
    formulation, batches = _tiny("admm", interval=per_epoch, interval_unit="per-epoch")
    formulation.setup(num_epochs=2, steps_per_epoch=steps)
    done = []
    for t in range(1, 2 * steps + 1):
        _, metrics = formulation.training_step(batches[t % len(batches)])
        if "coordination/k" in metrics:
            done.append(t)
    assert done == expected + [steps + t for t in expected]


@pytest.mark.parametrize(
    ("unit", "interval", "steps", "expected"),
    [
        ("per-epoch", 4, 23, 4.0),
        ("per-epoch", 8, 5, 5.0),
        ("step", 3, 12, 4.0),
        ("step", 5, 12, 2.4),
        ("epoch", 2, 6, 0.5),
    ],
)
def test_coordinations_per_epoch_counts_the_coordinations_a_run_does(unit, interval, steps, expected):
    formulation, batches = _tiny("admm", interval=interval, interval_unit=unit)
    formulation.setup(num_epochs=10, steps_per_epoch=steps)
    assert formulation.coordinations_per_epoch() == pytest.approx(expected)
    done = 0
    for epoch in range(10):
        formulation.start_epoch(epoch)
        for t in range(steps):
            _, metrics = formulation.training_step(batches[t % len(batches)])
            done += "coordination/k" in metrics
        done += "coordination/k" in formulation.end_epoch(epoch)
    assert done == pytest.approx(10 * expected, abs=1)  # the step unit's remainder may straddle epochs


def test_cubic_schedule_tightens_z_to_the_target_and_keeps_it_feasible():
    target = SparsityConfig(sparsity=0.75)
    formulation, batches = _tiny(
        "slr", target=target, sparsity_schedule="cubic", schedule_end=0.5, interval=2, interval_unit="step"
    )
    formulation.setup(num_epochs=2, steps_per_epoch=6, reference_batch=batches[0])
    for t in formulation.problem.targets:  # Z^0 at level 0: W itself
        assert torch.equal(formulation.z[t.name], t.tensor.detach())
    fractions = []
    for _ in range(2):
        for batch in batches:
            _, metrics = formulation.training_step(batch)
            if "schedule/fraction" in metrics:
                fractions.append(metrics["schedule/fraction"])
                for t in formulation.problem.targets:
                    level = formulation.level_set(t, metrics["schedule/fraction"])
                    assert level.contains(formulation.z[t.name])
                    assert int(torch.count_nonzero(formulation.z[t.name])) >= t.feasible_set.k  # never sparser
    assert fractions == [1 - (1 - min(1.0, t / 6)) ** 3 for t in (2, 4, 6, 8, 10, 12)]
    for t in formulation.problem.targets:
        assert t.feasible_set.contains(formulation.z[t.name])


def test_residual_balancing_moves_rho_toward_the_larger_residual():
    formulation, _ = _tiny("admm", rho=1.0, rho_growth=2.0, rho_rule="balance")
    assert formulation.next_rho({"dual/residual": 11.0, "dual/z_change": 1.0}) == 2.0  # primal >> dual
    assert formulation.next_rho({"dual/residual": 1.0, "dual/z_change": 11.0}) == 0.5  # dual >> primal
    assert formulation.next_rho({"dual/residual": 1.0, "dual/z_change": 1.0}) == 1.0


def test_slr_checkpoint_keeps_the_terms_of_condition_6_and_converts_an_older_copy_of_w():
    formulation, batches = _tiny("slr")
    for batch in batches:
        formulation.training_step(batch)
    formulation.coordinate()
    state = copy.deepcopy(formulation.state_dict())
    older = {k: v for k, v in state.items() if k != "previous"}
    older["w_prev"] = {n: w.clone() for n, w in formulation.weights().items()}  # no W-step since: W^{k-1} = W
    for saved in (state, older):
        restored, _ = _tiny("slr")
        restored.load_state_dict(copy.deepcopy(saved))
        assert restored.previous.residual_sq == pytest.approx(formulation.previous.residual_sq, rel=1e-6)
        assert restored.previous.linear == pytest.approx(formulation.previous.linear, rel=1e-5, abs=1e-12)
        assert restored.coordinate()["condition/6_holds"] == 0.0  # no W-step: L_rho cannot strictly decrease


def test_per_epoch_coordination_needs_the_steps_of_an_epoch():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    problem = SparsityProblem(model, F.cross_entropy, Targets().resolve(model, PATTERNS[0]))
    formulation = formulation_class("admm")(problem, lr=1e-2)  # the defaults: 4 coordinations per epoch
    with pytest.raises(ValueError, match=r"coordinates 4 times per epoch .* needs steps_per_epoch >= 1"):
        formulation.setup(num_epochs=1, steps_per_epoch=0)
    with pytest.raises(ValueError, match=r"call setup\(num_epochs, steps_per_epoch"):  # nothing was set up
        formulation.start_epoch(0)


def test_admm_says_nothing_of_the_spacing_when_setup_counts_no_steps(recwarn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    problem = SparsityProblem(model, F.cross_entropy, Targets().resolve(model, SparsityConfig(sparsity=0.5)))
    cls = formulation_class("admm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    formulation = cls(problem, cls.Config(interval=1, interval_unit="epoch"), optimizer=optimizer)
    formulation.setup(num_epochs=2, steps_per_epoch=0)
    assert formulation.steps_between() == float("inf")
    assert not [w for w in recwarn if "W-steps between coordinations" in str(w.message)]


@pytest.mark.parametrize("name", ["slr", "admm"])
def test_a_z_the_z_step_replaced_is_freed_at_once(name):
    """The W-step's cached anchor kept the replaced Z alive (for an identity check) until the next backward: one more
    copy of the pruned weights at every coordination."""
    import gc
    import weakref

    formulation, batches = _tiny(name)
    formulation.training_step(batches[0])  # the anchor Lambda - rho Z is cached from this Z
    old = [weakref.ref(z) for z in formulation.z.values()]
    formulation.coordinate()
    gc.collect()
    assert all(ref() is None for ref in old)
    formulation.training_step(batches[1])
    for n, z in formulation.z.items():  # the anchor follows the new Z
        constraint = formulation.penalty.constraints[n]
        rho, anchor = formulation.penalty.anchor(n)
        assert rho == float(constraint.penalty_coefficient.value)
        assert torch.equal(anchor, torch.add(constraint.multiplier.weight.detach().view_as(z), z, alpha=-rho))
