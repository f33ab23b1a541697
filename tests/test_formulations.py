"""One table every registered formulation joins automatically: tiny run, target hit, resume."""

import re

import pytest
import torch
from safetensors.torch import load_file

from constrainedsparse import Formulation, RunConfig, available_formulations, make, read_metrics, run
from constrainedsparse.formulations import formulation_class, register_formulation

COMMON = dict(problem="digits-mlp", epochs=2, retrain_epochs=1, pretrain_epochs=2, wandb="disabled", progress=False)


@pytest.mark.parametrize("name", available_formulations())
def test_every_formulation_hits_its_target_and_resumes(tmp_path, name):
    full = run(RunConfig(formulation=name, sparsity=0.8, out=tmp_path / "full", **COMMON))
    assert full["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)
    # What the run showed as the hard-pruned model during pruning is what the hard prune then gave.
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    last_preview = [r["accuracy/hardprune_now"] for r in rows if r.get("phase") == 0 and "accuracy/hardprune_now" in r]
    assert last_preview[-1] == full["hardprune_accuracy"]
    cls = formulation_class(name)
    if cls.exact_layer_sparsity(cls.Config()):
        for level in full["layer_sparsity"].values():
            assert level == pytest.approx(0.8, abs=2e-3)
    assert run(RunConfig(formulation=name, sparsity=0.8, out=tmp_path / "cut", stop_after_epochs=1, **COMMON)) is None
    resumed = run(RunConfig(formulation=name, sparsity=0.8, out=tmp_path / "cut", resume=True, **COMMON))
    for key in ("achieved_sparsity", "hardprune_accuracy", "retrain_accuracy"):
        assert resumed[key] == full[key], key
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k] != 0, b[k] != 0) for k in a)


def test_registry_errors():
    known = re.escape(", ".join(available_formulations()))
    with pytest.raises(ValueError, match=rf"unknown formulation 'nope'; available: {known}$"):
        formulation_class("nope")
    with pytest.raises(ValueError, match=r"formulation 'magnitude' is already registered"):
        register_formulation("magnitude")(type("Dup", (Formulation,), {"description": "another magnitude"}))
    with pytest.raises(ValueError, match=r"unknown formulation 'nope'"):
        make("nope", None)


def test_every_formulation_has_a_description_and_a_validated_config():
    for name in available_formulations():
        cls = formulation_class(name)
        assert cls.name == name and cls.description and "\n" not in cls.description
        cls.Config().validate()


PATTERNS = {"unstructured": 0.75, "row": 0.5, "2:4": None, "structured:rows": 0.5, "structured:columns": 0.5,
            "block:2x2": 0.5}  # fmt: skip


@pytest.mark.parametrize("name", available_formulations())
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_every_formulation_meets_every_pattern_in_its_own_loop(name, pattern):
    """Every registered formulation × every built-in pattern kind: the hard-pruned weights lie in each target's set."""
    from torch import nn

    from constrainedsparse import SparsityConfig, SparsityProblem, Targets, achieved_sparsity, hard_prune
    from constrainedsparse.errors import is_ours
    from constrainedsparse.sets import available_patterns, pattern_class

    built_in = {kind for kind in available_patterns() if is_ours(pattern_class(kind))}
    config = SparsityConfig.parse(pattern, PATTERNS[pattern])
    assert {SparsityConfig.parse(p, s).pattern for p, s in PATTERNS.items()} == built_in  # new patterns join
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    targets = Targets().resolve(model, config)
    f = make(name, SparsityProblem(model, nn.functional.cross_entropy, targets), optimizer=torch.optim.SGD(
        model.parameters(), lr=0.05))  # fmt: skip
    f.setup(1, 4, reference_batch=(x, y))
    f.start_epoch(0)
    for _ in range(4):
        f.training_step((x, y))
    f.end_epoch(0)
    masks = f.hard_masks()
    f.finalize()
    hard_prune(targets, masks)
    cls = formulation_class(name)
    for target in targets:
        if cls.exact_layer_sparsity(cls.Config()):
            assert target.feasible_set.contains(target.tensor.detach()), target.name
    assert achieved_sparsity(targets) == pytest.approx(config.sparsity, abs=0.05)


def _flat_tensors(value, prefix=""):
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat_tensors(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat_tensors(item, f"{prefix}/{i}").items()}
    return {}


@pytest.mark.parametrize("name", available_formulations())
def test_every_formulations_load_leaves_the_given_state_alone(name):
    """state_dict()'s tensors are the live ones (torch's convention; a deepcopy keeps one); a load copies what it
    is given: training on after load_state_dict(state) leaves state as it was, and no tensor is shared (Cooper kept
    a loaded rho as given, so two formulations loaded from one dict shared it and set_rho wrote into the dict)."""
    import copy

    from torch import nn

    from constrainedsparse import SparsityConfig, SparsityProblem, Targets, UserConstraint

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
        budget = {"norm": UserConstraint(lambda m: m[0].weight.norm() - 0.5)}
        problem = SparsityProblem(model, nn.functional.cross_entropy, targets, budget)
        config = {"interval": 1, "interval_unit": "step", "rho_growth": 1.5} if name in ("slr", "admm") else {}
        f = make(name, problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), **config)
        f.setup(1, 6, reference_batch=(x, y))
        f.start_epoch(0)
        return f

    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    f = build()
    for _ in range(2):
        f.training_step((x, y))
    state = copy.deepcopy(f.state_dict())
    kept = {k: v.clone() for k, v in _flat_tensors(state).items()}
    assert kept, "the state holds tensors"
    loaded = [build(), build()]
    for g in loaded:
        g.load_state_dict(state)
    for _ in range(2):
        loaded[0].training_step((x, y))
    assert all(torch.equal(_flat_tensors(state)[k], v) for k, v in kept.items())
    assert all(torch.equal(_flat_tensors(loaded[1].state_dict())[k], v) for k, v in kept.items())  # not shared
