"""Per-layer sparsity allocation: the Lagrangian relaxation meets the budget and the bounds."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrainedsparse import RunConfig, run
from constrainedsparse.layerwise.allocation import ErrorCurve, allocate, grid_levels, reachable_range


def _curve(name, size, width, growth, levels):
    return ErrorCurve(name, size, width, list(levels), [growth * s**2 + 0.01 * s for s in levels])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(1, 8), st.floats(0.1, 10.0)), min_size=1, max_size=6),
    st.floats(0.05, 0.9),
)
def test_allocation_meets_the_budget_to_a_row_and_keeps_the_bounds(layers, budget):
    levels = grid_levels(0.0, 0.95, 0.1)
    curves = [_curve(f"l{i}.weight", rows * 8, 8, growth, levels) for i, (rows, _, growth) in enumerate(layers)]
    if budget > 0.875:  # a row of 8 keeps at least 1 weight under s_max = 0.95: every layer is at most 0.875
        with pytest.raises(ValueError, match=r"^the allocation budget .* whole weights per row \[0, 0.875\]$"):
            allocate(curves, budget)
        return
    result = allocate(curves, budget)
    assert all(0.0 <= s <= 0.95 + 1e-9 for s in result.levels.values())
    kept = sum(round((1 - result.levels[c.name]) * c.width) * (c.size // c.width) for c in curves)
    wanted = sum(c.size for c in curves) * (1 - budget)
    assert abs(kept - wanted) <= max(c.size // c.width for c in curves) / 2 + 1  # within half a row-count
    assert all(abs((1 - s) * 8 - round((1 - s) * 8)) < 1e-6 for s in result.levels.values())  # whole weights per row


def test_reachable_range_counts_whole_weights_per_row():
    assert reachable_range([(80, 8, 0.0, 0.95)]) == (0.0, 0.875)
    assert reachable_range([(800, 800, 0.0, 0.95)]) == (0.0, pytest.approx(0.95))  # a layer-wide level: any count
    assert reachable_range([(80, 8, 0.5, 0.5), (80, 8, 0.0, 0.0)]) == (0.25, 0.25)


def test_allocation_the_model_rows_cannot_reach_stops_before_any_measuring(tmp_path, capsys, tiny_llama):
    from constrainedsparse.cli import main

    # rows of 32 inputs under allocation_max 0.8 keep at least 7 weights (0.78); rows of 64 keep 13 (0.797)
    with pytest.raises(SystemExit) as stopped:
        main(["run", "hf-causal-lm", "--set", f"model={tiny_llama}", "--set", "seq_len=16", "--formulation", "wanda",
              "--sparsity", "0.79", "--set", "allocation=lagrangian", "--set", "allocation_max=0.8",
              "--out", str(tmp_path / "run"), "--wandb", "disabled", "--no-progress"])  # fmt: skip
    assert stopped.value.code == 2 and not (tmp_path / "run").exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --sparsity 0.79 cannot be allocated: whole weights per row"), last


def test_the_cheaper_layer_gets_the_higher_level_and_the_budget_is_exact_for_layer_wide_levels():
    levels = grid_levels(0.0, 0.9, 0.1)
    cheap = _curve("cheap.weight", 100, 100, 0.1, levels)  # layer-wide (unstructured) levels: any count
    dear = _curve("dear.weight", 100, 100, 10.0, levels)
    result = allocate([cheap, dear], 0.5)
    assert result.levels["cheap.weight"] > 0.5 > result.levels["dear.weight"]
    assert result.achieved == pytest.approx(0.5) and result.multiplier > 0
    with pytest.raises(ValueError, match=r"^the allocation budget 0.95 is outside the levels the bounds allow"):
        allocate([cheap, dear], 0.95)


def test_a_run_with_lagrangian_allocation(tmp_path, tiny_llama):
    settings = {"model": str(tiny_llama), "calibration_samples": "4", "seq_len": "16", "held_out_samples": "2",
                "allocation": "lagrangian", "allocation_max": "0.8"}  # fmt: skip
    config = RunConfig(problem="hf-causal-lm", formulation="wanda", sparsity=0.6, out=tmp_path / "a", progress=False,
                       settings=settings)  # fmt: skip
    summary = run(config)
    allocation = summary["allocation"]
    assert set(allocation["levels"]) == set(summary["layer_sparsity"])
    assert all(0.0 <= s <= 0.8 for s in allocation["levels"].values())
    assert len({round(s, 6) for s in allocation["levels"].values()}) > 1  # not uniform
    for name, level in allocation["levels"].items():
        assert summary["layer_sparsity"][name] == pytest.approx(level, abs=1e-6)
    assert summary["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("allocation/multiplier" in row for row in rows)


def test_block_weighted_allocation_leaves_padding_out(tiny_llama):
    # The same real tokens, right-padded or not, give the same levels (the Gram matrices and the block errors
    # both read the attention mask; a causal model's real positions do not see the padding after them).
    from transformers import AutoModelForCausalLM

    from constrainedsparse import prune_layerwise

    ids = torch.randint(1, 200, (3, 10), generator=torch.Generator().manual_seed(0))
    plain = [{"input_ids": ids}]
    mask = torch.cat([torch.ones_like(ids), torch.zeros(3, 6, dtype=ids.dtype)], dim=1)
    padded = [{"input_ids": torch.cat([ids, torch.full((3, 6), 7)], dim=1), "attention_mask": mask}]
    levels = []
    for batches in (plain, padded):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        kwargs = {"allocation": "lagrangian", "allocation_weight": "block"}
        levels.append(prune_layerwise(model, batches, "wanda", sparsity=0.6, **kwargs).allocation["levels"])
    assert len(set(levels[0].values())) > 1 and levels[0] == levels[1]


class _TwoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)) for _ in range(2)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize("allocation", ["lagrangian", "owl"])
def test_an_allocation_shares_the_budget_over_the_targeted_layers_only(allocation):
    """Globs with the model's names (``blocks.0.*``) were not applied to the measured layers: the budget went to
    excluded layers that stayed dense, the rest missed the level, and the report said it was met."""
    from constrainedsparse import Targets, prune_layerwise

    torch.manual_seed(0)
    model = _TwoBlocks()
    targets = Targets(module_types=(torch.nn.Linear,), exclude=["blocks.0.*"])
    report = prune_layerwise(model, [torch.randn(16, 8)], "wanda", sparsity=0.5, targets=targets, allocation=allocation)
    assert sorted(report.allocation["levels"]) == ["blocks.1.0.weight", "blocks.1.2.weight"]
    pruned = [model.blocks[1][0].weight, model.blocks[1][2].weight]
    assert sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned) == 0.5
    assert all(int((w == 0).sum()) == 0 for w in (model.blocks[0][0].weight, model.blocks[0][2].weight))


def test_equal_allocation_bounds_give_every_layer_that_level():
    """allocation_min = allocation_max made a grid of two equal levels: a division by zero."""
    from constrainedsparse import prune_layerwise

    assert grid_levels(0.5, 0.5, 0.05) == [0.5]
    torch.manual_seed(0)
    report = prune_layerwise(_TwoBlocks(), [torch.randn(16, 8)], "wanda", sparsity=0.5, allocation="lagrangian",
                             allocation_min=0.5, allocation_max=0.5)  # fmt: skip
    assert set(report.allocation["levels"].values()) == {0.5}


def test_python_allocation_bounds_out_of_order_are_said_in_keywords():
    """prune_layerwise answered in the CLI's syntax: '--set allocation_min=0.9 is above ...'."""
    from constrainedsparse import prune_layerwise

    with pytest.raises(ValueError, match=r"^allocation_min=0.9 is above allocation_max=0.5$"):
        prune_layerwise(_TwoBlocks(), [torch.randn(16, 8)], "wanda", sparsity=0.5, allocation="lagrangian",
                        allocation_min=0.9, allocation_max=0.5)  # fmt: skip
