"""``true_sequential``: a block's layers pruned group by group (those sharing an input), each group's
Gram matrices taken from the block with the earlier groups already pruned."""

import copy

import pytest
import torch
from lm_batches import random_token_batches
from transformers import AutoModelForCausalLM

from constrainedsparse import prune_layerwise
from constrainedsparse.layerwise import solver_class
from constrainedsparse.layerwise.base import LayerProblem
from constrainedsparse.layerwise.driver import accumulate_grams, capture_block_inputs
from constrainedsparse.layerwise.layers import find_blocks, targeted_layers
from constrainedsparse.layerwise.sequential import input_groups
from constrainedsparse.targets import SparsityConfig, Targets

LLAMA_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def _setup(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.use_cache = False
    blocks = find_blocks(model)
    layers = targeted_layers(blocks[0], Targets(module_types=(torch.nn.Linear,)))
    return model, blocks, layers


def test_a_llama_block_has_four_input_groups_in_call_order(tiny_llama):
    model, blocks, layers = _setup(tiny_llama)
    inputs = capture_block_inputs(model, blocks[0], random_token_batches())
    groups = input_groups(layers, lambda: blocks[0](*inputs[0].args, **inputs[0].kwargs))
    assert [[name for name, _ in group] for group in groups] == LLAMA_GROUPS
    assert groups.called_once


def test_a_layer_called_twice_is_grouped_by_its_first_calls_input():
    """``a`` is called on x, then on r = relu(a(x)), where ``b`` reads r too: the groups are [a], [b] (b calibrated on
    the pruned a's output), not a and b together by a's last input."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            r = torch.relu(self.a(x))
            return x + self.a(r) + self.b(r)

    block = Block()
    groups = input_groups([("a", block.a), ("b", block.b)], lambda: block(torch.randn(8, 16)))
    assert [[name for name, _ in group] for group in groups] == [["a"], ["b"]]


def test_a_layer_never_called_ends_up_alone_and_last(tiny_llama):
    model, blocks, layers = _setup(tiny_llama)
    groups = input_groups(layers, lambda: None)
    assert [[name for name, _ in group] for group in groups] == [[name] for name, _ in layers]


def test_stopping_after_a_group_gives_the_same_gram_matrices(tiny_llama):
    model, blocks, layers = _setup(tiny_llama)
    inputs = capture_block_inputs(model, blocks[0], random_token_batches())
    group = [layer for layer in layers if layer[0] in LLAMA_GROUPS[2]]
    full = accumulate_grams(blocks[0], group, inputs)
    stopped = accumulate_grams(blocks[0], group, inputs, stop_after="mlp.up_proj")
    for name in full:
        assert torch.equal(full[name][0], stopped[name][0]) and full[name][1] == stopped[name][1]


def _by_hand(model, batches, method, target):
    """Group by group, each from Gram matrices computed here with plain forward hooks on the partly pruned block."""
    solver = solver_class(method)(solver_class(method).Config())
    blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        layers = dict(targeted_layers(block, Targets(module_types=(torch.nn.Linear,))))
        for group in LLAMA_GROUPS:
            grams = {name: torch.zeros(layers[name].in_features, layers[name].in_features) for name in group}
            counts = dict.fromkeys(group, 0)
            handles = []
            for name in group:

                def add(module, args, name=name, grams=grams, counts=counts):
                    rows = args[0].reshape(-1, args[0].shape[-1]).float()
                    grams[name] += rows.T @ rows
                    counts[name] += rows.shape[0]

                handles.append(layers[name].register_forward_pre_hook(add))
            with torch.no_grad():
                for batch in batches:
                    model(**batch)
            for handle in handles:
                handle.remove()
            for name in group:
                weight = layers[name].weight.detach().clone()
                full = f"model.layers.{index}.{name}.weight"
                result = solver.prune(LayerProblem(full, weight, grams[name], target, counts[name]))
                with torch.no_grad():
                    layers[name].weight.copy_(torch.where(result.mask, result.weight, torch.zeros_like(weight)))
    return model


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_true_sequential_prunes_each_group_from_the_partly_pruned_block(tiny_llama, method):
    model, _, _ = _setup(tiny_llama)
    expected = _by_hand(
        copy.deepcopy(model), random_token_batches(), method, SparsityConfig(sparsity=0.5, pattern="row")
    )
    dense = copy.deepcopy(model)
    report = prune_layerwise(model, random_token_batches(), method, sparsity=0.5, true_sequential=True)
    got, want = dict(model.named_parameters()), dict(expected.named_parameters())
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    prune_layerwise(
        dense, random_token_batches(), method, sparsity=0.5
    )  # the default: every layer from the dense block
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(dict(dense.named_parameters())[first], got[first])  # the first group sees the same inputs
    later = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(dict(dense.named_parameters())[later], got[later]) or method == "wanda"
    order = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    order += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert list(report.layers)[:7] == [f"model.layers.0.{name}.weight" for name in order]  # module order kept


def test_the_run_setting_reaches_the_driver(tmp_path, tiny_llama):
    from constrainedsparse import RunConfig, run

    weights = {}
    for flag in ("false", "true"):
        settings = {"model": str(tiny_llama), "calibration_samples": "4", "seq_len": "16", "held_out_samples": "2",
                    "true_sequential": flag}  # fmt: skip
        out = tmp_path / flag
        run(RunConfig(problem="hf-causal-lm", formulation="sparsegpt", sparsity=0.5, out=out, progress=False,
                      settings=settings))  # fmt: skip
        weights[flag] = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    first, later = "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(weights["false"][first], weights["true"][first])
    assert not torch.equal(weights["false"][later], weights["true"][later])
