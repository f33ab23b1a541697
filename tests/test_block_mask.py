"""The block-level mask search (``block_mask_rounds``): still masks of the dense weights, patterns held,
block errors never raised, bad input refused (its resume and one-process rule: ``test_block_fit.py``)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_batches import random_token_batches
from transformers import AutoModelForCausalLM

from constrainedsparse import Targets, prune_layerwise
from constrainedsparse.layerwise.blockmask import start_mask
from constrainedsparse.layerwise.fw.groups import group_sweep_polish
from constrainedsparse.layerwise.fw.search import swap_polish
from constrainedsparse.sets import NMSparse, RowTopK


def _model(folder, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    model.config.use_cache = False
    return model


def _pruned_weights(model):
    return {n: p for n, p in model.named_parameters() if n.startswith("model.layers.") and p.ndim == 2}


@pytest.mark.parametrize(("method", "target"), [("wanda", {"sparsity": 0.6}), ("fw", {"pattern": "2:4"})])
def test_the_search_moves_masks_of_the_dense_weights_within_the_pattern(tiny_llama, method, target):
    batches = random_token_batches()
    dense, plain, searched = _model(tiny_llama), _model(tiny_llama), _model(tiny_llama)
    prune_layerwise(plain, batches, method, **target)
    report = prune_layerwise(searched, batches, method, block_mask_rounds=2, **target)
    reference, before, after = _pruned_weights(dense), _pruned_weights(plain), _pruned_weights(searched)
    for name, w in after.items():
        kept = w != 0
        assert torch.equal(w[kept], reference[name][kept]), name  # kept weights are the dense ones
        if "pattern" in target:
            assert int(kept.reshape(-1, 4).sum(dim=1).max()) <= 2, name
        else:  # every row keeps what the solver's row kept (dense zeros aside)
            dense_zeros = (reference[name] == 0).sum(dim=1)
            assert bool(((kept.sum(dim=1) - (before[name] != 0).sum(dim=1)).abs() <= dense_zeros).all()), name
    metrics = report.layers
    assert all(m["block_error_masked"] <= m["block_error"] for m in metrics.values())
    first = "model.layers.0.self_attn.q_proj.weight"  # same inputs as the plain run: the search moved it
    assert metrics[first]["block_mask_changed"] > 0
    assert metrics[first]["block_error_masked"] < metrics[first]["block_error"]
    changed = [
        name for name in after if name.startswith("model.layers.0.") and not torch.equal(after[name], before[name])
    ]
    assert changed


def test_the_search_then_the_refit_report_all_three_errors(tiny_llama):
    model = _model(tiny_llama)
    report = prune_layerwise(
        model, random_token_batches(), "wanda", sparsity=0.5, block_mask_rounds=1, block_fit_epochs=3
    )
    for name, m in report.layers.items():
        assert m["block_error_fitted"] < m["block_error_masked"] <= m["block_error"], name


def test_the_search_and_the_refit_report_the_error_before_both_steps(tiny_llama):
    """block_error is the error before the search and the refit, as with the search alone (not the searched one)."""
    batches = random_token_batches()
    searched = prune_layerwise(_model(tiny_llama), batches, "wanda", sparsity=0.5, block_mask_rounds=1).layers
    both = prune_layerwise(_model(tiny_llama), batches, "wanda", sparsity=0.5, block_mask_rounds=1, block_fit_epochs=1)
    first = "model.layers.0.self_attn.q_proj.weight"  # the same inputs in both runs
    assert both.layers[first]["block_error"] == searched[first]["block_error"]
    assert both.layers[first]["block_error_masked"] < both.layers[first]["block_error"]


def test_the_search_keeps_each_layers_own_level(tiny_llama):
    model = _model(tiny_llama)
    targets = Targets(overrides={"*mlp*": 0.75})
    prune_layerwise(model, random_token_batches(), "wanda", sparsity=0.5, targets=targets, block_mask_rounds=1)
    for name, weight in _pruned_weights(model).items():
        assert float((weight == 0).float().mean()) == pytest.approx(0.75 if ".mlp." in name else 0.5, abs=0.01), name


def test_a_bfloat16_model_keeps_its_dtype_and_its_dense_values(tiny_llama):
    dense, model = _model(tiny_llama, torch.bfloat16), _model(tiny_llama, torch.bfloat16)
    prune_layerwise(model, random_token_batches(), "wanda", sparsity=0.5, block_mask_rounds=1)
    reference = _pruned_weights(dense)
    for name, w in _pruned_weights(model).items():
        assert w.dtype == torch.bfloat16
        assert torch.equal(w[w != 0], reference[name][w != 0]), name


def test_start_mask_tops_up_with_dense_zeros():
    dense = torch.tensor([[0.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 5.0]])
    pruned = torch.tensor([[0.0, 0.0, 3.0, 4.0], [0.0, 0.0, 0.0, 5.0]])  # row 1 kept a dense zero
    mask = start_mask(pruned, dense, NMSparse.at_level(dense.shape, 0.5, n=2, m=4))
    assert mask.sum(dim=1).tolist() == [2, 2]
    assert mask[0].tolist() == [False, False, True, True]
    assert bool(mask[1, 3]) and not bool(mask[1, 0])


def _local_model(weight, gram, start, mask, shift):
    """The search's local model minus its value at the start, (D - D0)G(D - D0) + 2<shift, D - D0> per row,
    over the row's scale (its round-off)."""
    change = weight * (~mask).float() - weight * (~start).float()
    value = ((change @ gram) * change).sum(dim=1) + 2.0 * (shift * change).sum(dim=1)
    return value / (1.0 + (weight.square() * gram.diagonal()).sum(dim=1) + shift.abs().sum(dim=1))


def _problem(seed, rows, groups):
    generator = torch.Generator().manual_seed(seed)
    d_in = 4 * groups
    x = torch.randn(d_in, 3 * d_in, generator=generator)
    weight = torch.randn(rows, d_in, generator=generator)
    shift = torch.randn(rows, d_in, generator=generator)
    return weight, x @ x.T / x.shape[1], shift


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), groups=st.integers(1, 6))
def test_the_swap_descent_on_a_shifted_residual_keeps_row_counts_and_lowers_the_local_model(seed, rows, groups):
    weight, gram, shift = _problem(seed, rows, groups)
    start = RowTopK.at_level(weight.shape, 0.5).mask(
        torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    )
    found = swap_polish(weight, gram, start, 50, residual=shift).mask
    assert torch.equal(found.sum(dim=1), start.sum(dim=1))
    assert bool((_local_model(weight, gram, start, found, shift) <= 1e-4).all())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), groups=st.integers(1, 6))
def test_the_group_sweep_on_a_shifted_residual_keeps_n_m_and_lowers_the_local_model(seed, rows, groups):
    weight, gram, shift = _problem(seed, rows, groups)
    feasible = NMSparse.at_level(weight.shape, 0.5, n=2, m=4)
    start = feasible.mask(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
    found = group_sweep_polish(weight, gram, start, 4, 2, residual=shift).mask
    assert bool((found.reshape(-1, 4).sum(dim=1) == 2).all())
    assert bool((_local_model(weight, gram, start, found, shift) <= 1e-4).all())


@pytest.mark.parametrize(
    ("method", "values", "match"),
    [
        ("sparsegpt", {"block_mask_rounds": 1}, "sparsegpt changes the kept weights"),
        ("fw", {"block_mask_rounds": 1, "reconstruct": True}, "fw changes the kept weights"),
        ("wanda", {"block_mask_rounds": 1, "pattern": "block:2x2", "sparsity": 0.5}, "searches the row, unstructured"),
        ("wanda", {"block_mask_rounds": -1}, "block_mask_rounds"),
    ],
)
def test_bad_mask_search_settings_are_one_precise_error(tiny_llama, method, values, match):
    model = _model(tiny_llama)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        prune_layerwise(model, random_token_batches(), method, **values)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned


def test_the_cli_refuses_the_search_for_a_weight_updating_solver(tiny_llama, tmp_path, capsys):
    from cli_helpers import fails_with_one_line

    out = tmp_path / "run"
    args = ["run", "hf-causal-lm", "--formulation", "sparsegpt", "--out", str(out), "--wandb", "disabled",
            "--set", f"model={tiny_llama}", "--set", "calibration_samples=4", "--set", "seq_len=16",
            "--set", "block_mask_rounds=1"]  # fmt: skip
    line = fails_with_one_line(args, capsys)
    assert "sparsegpt changes the kept weights" in line
    assert not out.exists()
