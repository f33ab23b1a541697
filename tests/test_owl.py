"""OWL's published allocation (``--set allocation=owl``): outlier ratios, levels, the exact budget, a run."""

import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from constrainedsparse import RunConfig, run
from constrainedsparse.layerwise.owl import BlockOutliers, outlier_ratio, owl_allocation
from constrainedsparse.summary_text import summary_rows


def test_outlier_ratio_counts_the_scores_above_m_times_the_pooled_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 11.0])]
    # pooled mean 2.0: only 11 is above 5 x 2 (and nothing above 6 x 2); the mean is over both layers
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 10)
    assert outlier_ratio(scores, 6.0) == 0.0
    assert outlier_ratio([torch.full((3, 3), 2.0)], 1.0) == 0.0  # equal scores: none above the mean
    assert outlier_ratio([torch.empty(0)], 5.0) == 0.0


def _blocks(ratios, rows=4, width=50):
    return [BlockOutliers(f"b{i}", r, [(f"b{i}.fc.weight", rows * width, width)]) for i, r in enumerate(ratios)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 0.2), min_size=2, max_size=8, unique=True),
    st.floats(0.2, 0.7),
    st.floats(0.0, 0.15),
)
def test_owl_levels_spread_over_two_lambda_with_the_budget_met_to_a_weight_per_row(ratios, budget, lam):
    blocks = _blocks(ratios)
    result = owl_allocation(blocks, budget, lam)
    levels = [result.levels[b.layers[0][0]] for b in blocks]
    width, rows = 50, 4
    # OWL's rule before rounding: S - (D'_b - mean D'), D' on [0, 2 lambda]; rounding moves a level by
    # at most a few weights per row (the remainder is spread one row-count at a time)
    spread = max(ratios) - min(ratios)
    exact = [budget - 2 * lam * (r - min(ratios)) / spread for r in ratios]
    shift = sum(exact) / len(exact) - budget
    assume(all(0.0 <= wanted - shift <= 0.95 for wanted in exact))  # unclipped (the clipping test is below)
    for level, wanted in zip(levels, exact):
        assert level == pytest.approx(wanted - shift, abs=2.0 / width)
    kept = sum(round((1 - s) * width) * rows for s in levels)
    assert abs(kept - len(blocks) * rows * width * (1 - budget)) <= rows / 2 + 1
    assert result.method == "owl" and result.multiplier is None
    assert result.outlier_ratios == {b.name: b.ratio for b in blocks}
    most, least = ratios.index(max(ratios)), ratios.index(min(ratios))
    assert levels[most] <= levels[least] + 1.0 / width + 1e-9  # more outliers: pruned less (up to one weight a row)


def test_owl_weights_the_centre_by_block_size_so_the_global_budget_holds_for_unequal_blocks():
    small = BlockOutliers("small", 0.0, [("small.weight", 100, 100)])
    large = BlockOutliers("large", 0.1, [("large.weight", 300, 100)])
    result = owl_allocation([small, large], 0.5, 0.1)
    # D' = 0 and 0.2; size-weighted centre 0.15: small 0.5 + 0.15, large 0.5 - 0.05
    assert result.levels["small.weight"] == pytest.approx(0.65)
    assert result.levels["large.weight"] == pytest.approx(0.45)
    assert result.achieved == pytest.approx(0.5)


def test_owl_clips_into_the_bounds_and_refuses_an_unreachable_budget():
    blocks = _blocks([0.0, 0.1], rows=1, width=100)
    result = owl_allocation(blocks, 0.5, 0.4, s_min=0.3, s_max=0.7)
    assert all(0.3 - 1e-9 <= s <= 0.7 + 1e-9 for s in result.levels.values())
    assert result.achieved == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"^the allocation budget 0.9 is outside the levels the bounds allow"):
        owl_allocation(blocks, 0.9, 0.08, s_max=0.8)


def test_equal_ratios_give_every_block_the_target():
    result = owl_allocation(_blocks([0.05, 0.05, 0.05]), 0.6, 0.08)
    assert list(result.levels.values()) == pytest.approx([0.6, 0.6, 0.6])


def test_a_run_with_owl_allocation(tmp_path, tiny_llama):
    settings = {"model": str(tiny_llama), "calibration_samples": "4", "seq_len": "16", "held_out_samples": "2",
                "allocation": "owl", "owl_m": "2", "owl_lambda": "0.1"}  # fmt: skip
    config = RunConfig(problem="hf-causal-lm", formulation="wanda", sparsity=0.6, out=tmp_path / "a", progress=False,
                       settings=settings)  # fmt: skip
    summary = run(config)
    allocation = summary["allocation"]
    assert allocation["method"] == "owl" and allocation["multiplier"] is None
    assert set(allocation["levels"]) == set(summary["layer_sparsity"])
    for name, level in allocation["levels"].items():
        assert summary["layer_sparsity"][name] == pytest.approx(level, abs=1e-6)
    assert summary["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    blocks = allocation["outlier_ratios"]
    assert len(blocks) >= 2 and all(0.0 <= r <= 1.0 for r in blocks.values())
    low, high = min(allocation["levels"].values()), max(allocation["levels"].values())
    assert ("allocation", f"owl: layer levels {low:.4f} to {high:.4f}") in summary_rows(summary)  # printed
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any(key.startswith("allocation/outlier_ratio/") for row in rows for key in row)
    assert not any("allocation/multiplier" in row for row in rows)
