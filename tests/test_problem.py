"""SparsityProblem as a Cooper CMP, and user constraints as real Cooper constraints."""

import json
from pathlib import Path

import cooper
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from constrainedsparse import RunConfig, SparsityConfig, SparsityProblem, Targets, UserConstraint, make, run

PROBLEMS = Path(__file__).parent / "problems"


def _tiny(constraints, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(32, 6)
    y = torch.randint(0, 3, (32,))
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets, constraints, example_batch=(x, y))
    return problem, (x, y)


def test_user_constraints_become_cooper_constraints_with_their_own_multipliers():
    problem, batch = _tiny(
        {
            "norm": UserConstraint(lambda m: m[0].weight.norm() - 0.1, "<="),
            "rows": UserConstraint(lambda m: m[2].weight.sum(dim=1), "=="),
            "logits": UserConstraint(lambda m, b: m(b[0]).mean() - 5.0, "<="),
        }
    )
    constraints = dict(problem.named_constraints())
    assert list(constraints) == ["norm", "rows", "logits"]
    assert constraints["norm"].constraint_type == cooper.ConstraintType.INEQUALITY
    assert constraints["rows"].constraint_type == cooper.ConstraintType.EQUALITY
    assert isinstance(constraints["rows"].multiplier, cooper.multipliers.DenseMultiplier)
    assert constraints["rows"].multiplier.weight.shape == (3,)
    state = problem.compute_cmp_state(batch)
    assert set(c.name for c in state.observed_constraints) == {"norm", "rows", "logits"}
    assert state.misc["output"].shape == (32, 3)


def test_multiplier_grows_while_violated_and_training_reduces_violation():
    problem, batch = _tiny({"norm": UserConstraint(lambda m: m[0].weight.norm() - 0.5, "<=")})
    formulation = make("magnitude", problem, lr=1e-2, dual_lr=0.5)
    formulation.setup(num_epochs=1, steps_per_epoch=50)
    formulation.start_epoch(0)
    before = problem.model[0].weight.norm().item()
    multipliers = []
    for _ in range(50):
        formulation.training_step(batch)
        multipliers.append(problem.norm.multiplier.weight.item())
    assert multipliers[0] > 0 and max(multipliers) > multipliers[0]
    assert min(multipliers) >= 0.0
    assert problem.model[0].weight.norm().item() < before


def test_dual_optimizer_is_stock_sgd_with_maximize():
    problem, _ = _tiny({"norm": UserConstraint(lambda m: m[0].weight.norm() - 1.0)})
    optimizer = problem.dual_optimizer(0.1)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(group["maximize"] for group in optimizer.param_groups)
    assert _tiny({})[0].dual_optimizer(0.1) is None


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=4), st.floats(0.01, 2.0))
def test_inequality_multipliers_never_negative(violations, lr):
    problem, batch = _tiny({"c": UserConstraint(lambda m: m[0].weight.sum() * 0 + torch.tensor(violations), "<=")})
    formulation = make("magnitude", problem, dual_lr=lr)
    formulation.setup(1, 1)
    formulation.start_epoch(0)
    for _ in range(3):
        formulation.training_step(batch)
        weight = problem.c.multiplier.weight
        assert (weight >= 0).all()
    # Constant violations: after n ascent steps the multiplier is max(0, n * lr * g) entrywise.
    assert torch.allclose(weight, torch.clamp(3 * lr * torch.tensor(violations), min=0), atol=1e-5)


def test_bad_constraint_specs():
    with pytest.raises(ValueError, match=r"constraint sense must be '<=' or '==', got '>='"):
        UserConstraint(lambda m: m, ">=")
    with pytest.raises(ValueError, match=r"constraint fn must be callable, got int"):
        UserConstraint(3)
    problem, _ = _tiny({})
    with pytest.raises(ValueError, match=r"constraint 'c' takes a batch; pass example_batch to size it"):
        problem.add_user_constraint("c", UserConstraint(lambda m, b: m(b[0]).sum()), None)
    problem.add_user_constraint("d", UserConstraint(lambda m: m[0].weight.sum()), None)
    with pytest.raises(ValueError, match=r"constraint 'd' is already registered"):
        problem.add_user_constraint("d", UserConstraint(lambda m: m[0].weight.sum()), None)


def test_run_logs_user_constraint_multiplier_and_violation(tmp_path):
    out = tmp_path / "budget"
    run(
        RunConfig(
            problem=str(PROBLEMS / "digits_budget.py"), formulation="magnitude", sparsity=0.5, epochs=2,
            pretrain_epochs=3, retrain_epochs=1, out=out, wandb="disabled", progress=False,
        )
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    multipliers = [r["multiplier/budget"] for r in rows if "multiplier/budget" in r]
    violations = [r["violation/budget"] for r in rows if "violation/budget" in r]
    assert len(multipliers) == len(violations) > 5
    assert violations[0] > 0 and max(multipliers) > 0
    assert all(m >= 0 for m in multipliers)


def test_a_problem_files_constraint_keeps_its_restarts_and_sense_in_a_run():
    import dataclasses

    from constrainedsparse.spec import load_problem

    problem = load_problem(str(PROBLEMS / "digits_budget.py"))
    (name, spec), *_ = problem.constraints.items()
    problem = dataclasses.replace(problem, constraints={name: dataclasses.replace(spec, restarts=True)})
    guarded = problem.guarded().constraints[name]  # what a run uses (its errors as one line)
    assert guarded.restarts and guarded.sense == spec.sense and guarded.fn is not spec.fn


def test_paths_may_be_str_or_path():
    """load_problem takes a Path as well as a str; RunConfig(out="...") holds a Path (what a run reads)."""
    from constrainedsparse.spec import load_problem

    assert load_problem(PROBLEMS / "digits_budget.py").source == str(PROBLEMS / "digits_budget.py")
    config = RunConfig(out="runs/mine/")
    assert config.out == Path("runs/mine") and isinstance(config.out, Path)
