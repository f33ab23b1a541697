"""UserConstraint's own dual step size (``dual_lr``) and proxy measurement (``strict_fn``), through make() and the
split step as a user runs them."""

import math

import pytest
import torch
from torch import nn

import constrainedsparse as cs
from constrainedsparse import SparsityConfig, SparsityProblem, Targets, UserConstraint, make
from constrainedsparse.report import constraint_report

FORMULATIONS = ["magnitude", "slr", "admm", "l0"]


def _problem(constraints, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    batch = (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
    return SparsityProblem(model, nn.functional.cross_entropy, targets, constraints, example_batch=batch), batch


def _steps(formulation, batch, n):
    formulation.setup(num_epochs=1, steps_per_epoch=n, reference_batch=batch if formulation.reference_samples else None)
    formulation.start_epoch(0)
    return [formulation.training_step(batch) for _ in range(n)]


@pytest.mark.parametrize("method", FORMULATIONS)
def test_each_constraint_steps_its_multiplier_at_its_own_dual_lr(method):
    # Constant violations (2 and 3, not differentiable in a way that matters): after n ascent steps λ = n * lr * g.
    constant = {
        "own": UserConstraint(lambda m: m[0].weight.sum() * 0 + 2.0, dual_lr=0.25),
        "shared": UserConstraint(lambda m: m[0].weight.sum() * 0 + 3.0),
    }
    problem, batch = _problem(constant)
    formulation = make(method, problem, dual_lr=0.01)
    _steps(formulation, batch, 3)
    values = problem.named_multiplier_values()
    assert values["own"].item() == pytest.approx(3 * 0.25 * 2.0, rel=1e-6)
    assert values["shared"].item() == pytest.approx(3 * 0.01 * 3.0, rel=1e-6)


def test_the_dual_optimizer_has_the_formulations_group_and_one_per_constraint_with_its_own_step():
    constraints = {
        "a": UserConstraint(lambda m: m[0].weight.norm() - 1.0, dual_lr=0.5),
        "b": UserConstraint(lambda m: m[2].weight.norm() - 1.0),
        "c": UserConstraint(lambda m: m[2].weight.abs().sum() - 1.0, dual_lr=0.5),
    }
    problem, batch = _problem(constraints)
    formulation = make("magnitude", problem, dual_lr=0.1)
    # The formulation's group first, then one for each constraint with its own step (not one per value).
    assert [g["lr"] for g in formulation.dual_optimizer.param_groups] == [0.1, 0.5, 0.5]
    assert [len(g["params"]) for g in formulation.dual_optimizer.param_groups] == [1, 1, 1]
    alone = make("magnitude", _problem({"a": constraints["a"]})[0]).dual_optimizer
    assert [len(g["params"]) for g in alone.param_groups] == [0, 1]
    _steps(formulation, batch, 2)
    state = formulation.state_dict()
    again = make("magnitude", _problem(constraints)[0], dual_lr=0.1)
    again.setup(num_epochs=1, steps_per_epoch=2)
    again.load_state_dict(state)
    for name, value in formulation.problem.named_multiplier_values().items():
        assert torch.equal(again.problem.named_multiplier_values()[name], value)


def test_a_proxy_constraint_steps_on_its_measurement_and_trains_on_its_surrogate():
    # fn: a differentiable surrogate; strict_fn: the measurement the multiplier reads (a count, not differentiable).
    layer_norm = lambda m: m[0].weight.norm() - 1.0  # noqa: E731
    nonzeros = lambda m: (m[0].weight != 0).sum().float() - 10.0  # noqa: E731
    spec = UserConstraint(layer_norm, strict_fn=nonzeros)
    problem, batch = _problem({"budget": spec})
    formulation = make("magnitude", problem, lr=1e-3, dual_lr=0.01)
    formulation.setup(num_epochs=1, steps_per_epoch=1)
    formulation.start_epoch(0)
    measured, surrogate = float(nonzeros(problem.model)), float(layer_norm(problem.model))
    assert measured != pytest.approx(surrogate)
    formulation.training_step(batch)
    assert problem.named_multiplier_values()["budget"].item() == pytest.approx(0.01 * measured, rel=1e-5)
    step = formulation.backward(batch)
    metrics = problem.step_metrics(step.cmp_state)
    assert metrics["violation/budget"] == pytest.approx(float(nonzeros(problem.model)))
    assert metrics["surrogate/budget"] == pytest.approx(float(layer_norm(problem.model)), rel=1e-5)
    report = constraint_report(problem.model, {"budget": spec}, problem.named_multiplier_values(), batch)
    assert report["budget"]["value"] == pytest.approx(float(nonzeros(problem.model)))


def test_restarts_read_the_measurement():
    # The surrogate is violated (> 0) while the measurement holds (< 0): a restart resets the multiplier to 0.
    spec = UserConstraint(lambda m: m[0].weight.sum() * 0 + 1.0, restarts=True, strict_fn=lambda m: torch.tensor(-1.0))
    problem, batch = _problem({"c": spec})
    formulation = make("magnitude", problem, dual_lr=0.1)
    _steps(formulation, batch, 2)
    assert problem.named_multiplier_values()["c"].item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"dual_lr": 0.0},
            r"^constraint dual_lr must be a finite number > 0 \(or None: the formulation's\), got 0\.0",
        ),
        ({"dual_lr": -1}, r"^constraint dual_lr must be a finite number > 0 .*got -1$"),
        ({"dual_lr": math.nan}, r"^constraint dual_lr must be a finite number > 0 .*got nan$"),
        ({"dual_lr": math.inf}, r"^constraint dual_lr must be a finite number > 0 .*got inf$"),
        ({"dual_lr": True}, r"^constraint dual_lr must be a finite number > 0 .*got True$"),
        ({"dual_lr": "0.1"}, r"^constraint dual_lr must be a finite number > 0 .*got '0\.1'$"),
        ({"strict_fn": 3}, r"^constraint strict_fn must be callable, got int$"),
        (
            {"strict_fn": lambda: 0},
            r"^constraint strict_fn must take \(model\) or \(model, batch\), got a function of \(\)",
        ),
    ],
)
def test_bad_options_are_one_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UserConstraint(lambda m: m[0].weight.sum(), **kwargs)


def test_a_measurement_that_does_not_fit_its_constraint_is_refused_when_sized():
    two = UserConstraint(lambda m: m[0].weight.sum(), strict_fn=lambda m: torch.zeros(2))
    with pytest.raises(ValueError, match=r"^constraint 'c': strict_fn returned 2 entries but fn 1: one measurement"):
        _problem({"c": two})
    number = UserConstraint(lambda m: m[0].weight.sum(), strict_fn=lambda m: 3)
    with pytest.raises(ValueError, match=r"^constraint 'c' strict_fn must return a tensor, got int$"):
        _problem({"c": number})
    nan = UserConstraint(lambda m: m[0].weight.sum(), strict_fn=lambda m: torch.tensor(math.nan))
    with pytest.raises(ValueError, match=r"^constraint 'c' strict_fn is not finite on the model as given"):
        _problem({"c": nan})


def test_a_batch_measurement_needs_an_example_batch_and_reads_the_batch():
    seen = []
    spec = UserConstraint(lambda m: m[0].weight.sum() * 0, strict_fn=lambda m, b: seen.append(b) or b[0].mean())
    assert spec.uses_batch
    problem, batch = _problem({"c": spec})
    formulation = make("magnitude", problem, dual_lr=1.0)
    _steps(formulation, batch, 1)
    assert seen[-1] is batch
    assert problem.named_multiplier_values()["c"].item() == pytest.approx(max(0.0, float(batch[0].mean())))
    with pytest.raises(ValueError, match=r"constraint 'd' takes a batch; pass example_batch to size it"):
        problem.add_user_constraint("d", spec, None)
    assert cs.UserConstraint is UserConstraint


@pytest.mark.parametrize("method", ["magnitude", "l0"])
def test_a_dual_lr_changed_before_a_resume_applies_to_its_own_constraint(method):
    """The groups were keyed by value: a changed dual_lr was overwritten by the saved one, or (another constraint
    given one too) the saved step sizes landed on the wrong constraints."""

    def build(a_lr, b_lr):
        constant = {
            "a": UserConstraint(lambda m: m[0].weight.sum() * 0 + 1.0, dual_lr=a_lr),
            "b": UserConstraint(lambda m: m[0].weight.sum() * 0 + 2.0, dual_lr=b_lr),
        }
        problem, batch = _problem(constant)
        formulation = make(method, problem, dual_lr=0.01)
        formulation.setup(num_epochs=1, steps_per_epoch=4)
        formulation.start_epoch(0)
        return formulation, batch

    saved, batch = build(0.3, None)
    saved.training_step(batch)
    state = saved.state_dict()
    # Another set of constraints with a step of their own changes the groups: refused, not misapplied (l0 drops an
    # empty group of the formulation's, so a: 0.3, b: 0.7 keeps its sizes there and loads).
    refused = {(None, None)} | ({(0.3, 0.7)} if method == "magnitude" else set())
    for a_lr, b_lr in [(0.05, None), (0.3, 0.7), (None, None)]:
        resumed, _ = build(a_lr, b_lr)
        if (a_lr, b_lr) in refused:
            with pytest.raises(ValueError, match=r"saved with other constraints or settings \(a constraint given a "):
                resumed.load_state_dict(state)
            continue
        resumed.load_state_dict(state)
        before = {name: value.clone() for name, value in resumed.problem.named_multiplier_values().items()}
        resumed.training_step(batch)
        after = resumed.problem.named_multiplier_values()
        assert (after["a"] - before["a"]).item() == pytest.approx(1.0 * (a_lr or 0.01), rel=1e-5)
        assert (after["b"] - before["b"]).item() == pytest.approx(2.0 * (b_lr or 0.01), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it)")
def test_a_strict_fn_measured_on_the_cpu_steps_a_cuda_models_multiplier():
    """A latency or a count taken on the host: the measurement joins its multiplier's device."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).cuda()
    batch = (torch.randn(32, 6, device="cuda"), torch.randint(0, 3, (32,), device="cuda"))
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
    spec = UserConstraint(lambda m: m[0].weight.sum() * 0, strict_fn=lambda m: torch.tensor(2.0))  # on the host
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets, {"c": spec})
    formulation = make("magnitude", problem, dual_lr=0.5)
    _steps(formulation, batch, 1)
    assert problem.named_multiplier_values()["c"].item() == pytest.approx(1.0)


def test_a_measurement_that_is_not_finite_at_the_end_is_reported_as_none_and_not_satisfied():
    """It went into summary.json as a bare NaN (no JSON other readers parse) and read 'satisfied': false by chance."""
    import json

    from constrainedsparse.summary_text import summary_rows

    spec = UserConstraint(lambda m: m[0].weight.sum() * 0, strict_fn=lambda m: torch.tensor(math.nan))
    problem, batch = _problem({})
    entry = constraint_report(problem.model, {"c": spec}, {"c": torch.zeros(1)}, batch)["c"]
    assert entry["value"] is None and entry["satisfied"] is False
    json.loads(json.dumps(entry), parse_constant=lambda token: pytest.fail(f"non-standard JSON {token}"))
    rows = dict(summary_rows({"problem": "p", "formulation": "f", "achieved_sparsity": 0.5, "seconds": 1.0,
                              "constraints": {"c": entry}}))  # fmt: skip
    assert rows["constraint c"] == "not finite <= 0: VIOLATED (multiplier 0)"


def test_the_final_report_decides_satisfied_at_the_limits_and_measures_in_eval_mode():
    """Mutants that survived: the equality's 1e-3 band, a budget met exactly, a -inf measurement, eval mode."""

    def entry(value, sense="<="):
        spec = UserConstraint(lambda m: m[0].weight.sum() * 0, sense, strict_fn=lambda m: torch.tensor(value))
        problem, batch = _problem({})
        return constraint_report(problem.model, {"c": spec}, {}, batch)["c"]

    assert entry(0.0)["satisfied"] is True  # a budget met exactly holds
    assert entry(5e-4, "==")["satisfied"] is True and entry(-5e-4, "==")["satisfied"] is True
    assert entry(2e-3, "==")["satisfied"] is False
    low = entry(-math.inf)
    assert low["value"] is None and low["satisfied"] is False
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noisy = UserConstraint(lambda m, b: m(b[0]).mean(), "<=")
    batch = (torch.randn(16, 4), torch.zeros(16))
    first = constraint_report(model, {"c": noisy}, {}, batch)["c"]["value"]
    assert constraint_report(model, {"c": noisy}, {}, batch)["c"]["value"] == first  # no dropout draw
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN stats kept


def test_a_measurement_builds_no_graph():
    spec = UserConstraint(lambda m: m[0].weight.sum(), strict_fn=lambda m: m[0].weight.sum())
    problem, _ = _problem({})
    assert spec.measure(problem.model, None).requires_grad is False


def test_nonfinite_constraints_name_yours_first_and_read_the_steps_violations():
    broken = []
    later = UserConstraint(lambda m: m[0].weight.sum() * (math.nan if broken else 0.0))
    problem, batch = _problem({"c": later})
    broken.append(True)
    formulation = make("slr", problem)
    formulation.setup(1, 1, reference_batch=batch)
    formulation.start_epoch(0)
    step = formulation.compute_lagrangian(batch)  # the violation is nan; no dual step yet: the multiplier is 0
    assert torch.isfinite(problem.named_multiplier_values()["c"]).all()
    assert problem.nonfinite_constraints(step.cmp_state) == ["c"]
    for constraint in formulation.constraints.values():  # a formulation's constraint not finite too: named after
        constraint.multiplier.weight.data.fill_(math.nan)
        break
    named = problem.nonfinite_constraints(step.cmp_state)
    assert named[0] == "c" and len(named) == 2
