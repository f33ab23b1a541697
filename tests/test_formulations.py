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
