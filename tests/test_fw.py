"""Tests for the ``fw`` layer-wise solver (:mod:`constrainedsparse.layerwise.fw`) and its public parts.

Independent references written here: the objective :math:`\\operatorname{tr}(DGD^\\top)` from an
explicit ``X`` (not from the solver's products), pattern counts from plain reshapes, and the
reconstruction from a direct per-row linear solve in float64.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrainedsparse.layerwise.base import LayerProblem, solver_class, wanda_scores
from constrainedsparse.layerwise.fw import (
    FWConfig,
    FWSolver,
    core,
    frank_wolfe,
    group_sweep_polish,
    group_tabu_search,
    joint_swap_polish,
    reconstruct_rows,
    swap_polish,
    swap_tabu_search,
    tabu,
)
from constrainedsparse.settings import config_field_types
from constrainedsparse.targets import SparsityConfig

FAST = settings(max_examples=25, deadline=None)
PATTERNS = {
    "row": SparsityConfig(0.5, "row"),
    "row60": SparsityConfig(0.6, "row"),
    "unstructured": SparsityConfig(0.5, "unstructured"),
    "nm": SparsityConfig.from_pattern("2:4"),
    "nm14": SparsityConfig.from_pattern("1:4"),
}


def _layer(seed: int, d_out: int = 6, d_in: int = 16, pattern: str = "row", tokens: int = 64) -> LayerProblem:
    """A layer whose inputs are correlated (mixed features), so masks interact through G."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.eye(d_in) + 0.6 * torch.randn(d_in, d_in, generator=gen) / math.sqrt(d_in)
    scales = torch.exp(torch.randn(d_in, 1, generator=gen))
    x = mixing @ (scales * torch.randn(d_in, tokens, generator=gen))
    weight = torch.randn(d_out, d_in, generator=gen)
    return LayerProblem("layer.weight", weight, x @ x.T, PATTERNS[pattern], tokens=tokens)


def _row_objective(layer: LayerProblem, weight_hat: torch.Tensor) -> torch.Tensor:
    """Per-row error ``D_i G D_i^T`` in float64 (reference)."""
    diff = (layer.weight - weight_hat).double()
    return ((diff @ layer.gram.double()) * diff).sum(dim=1)


def _counts_ok(mask: torch.Tensor, target: SparsityConfig) -> bool:
    """Exact keep counts per unit of the pattern, from plain reshapes."""
    d_out, d_in = mask.shape
    if target.pattern == "row":
        return bool((mask.sum(dim=1) == round((1 - target.sparsity) * d_in)).all())
    if target.pattern == "unstructured":
        return int(mask.sum()) == round((1 - target.sparsity) * d_out * d_in)
    n, m = target.nm
    return bool((mask.reshape(d_out, d_in // m, m).sum(dim=2) == n).all())


def _run(layer: LayerProblem, **overrides) -> tuple:
    config = FWConfig.from_values(overrides)
    weight = layer.weight
    scores = wanda_scores(weight, layer.gram)
    feasible = layer.feasible_set()
    start = feasible.mask(scores)
    return frank_wolfe(weight, layer.gram, feasible, start, scores, config), start


# ---------------------------------------------------------------------------------------------
# Frank-Wolfe iterations
# ---------------------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 10_000), pattern=st.sampled_from(sorted(PATTERNS)), alpha=st.sampled_from([0.0, 0.5, 0.9]))
def test_duality_gap_nonnegative_every_iteration(seed: int, pattern: str, alpha: float) -> None:
    layer = _layer(seed, pattern=pattern)
    run, _ = _run(layer, alpha=alpha, iterations=15)
    scale = max(run.objectives[0], 1.0)
    assert all(gap >= -1e-5 * scale for gap in run.gaps), run.gaps
    # The gap bounds the suboptimality: no iterate may fall below the certified lower bound.
    for objective, gap in zip(run.objectives, run.gaps):
        assert min(run.objectives) >= objective - gap - 1e-4 * scale


@pytest.mark.parametrize("pattern", ["row", "unstructured", "nm"])
@pytest.mark.parametrize("step", ["line_search", "open_loop"])
def test_duality_gap_decreases_on_average(pattern: str, step: str) -> None:
    layer = _layer(3, d_out=8, d_in=32, pattern=pattern)
    run, _ = _run(layer, alpha=0.0, iterations=40, step=step)
    gaps = torch.tensor(run.gaps)
    assert gaps[20:].mean() < gaps[:20].mean()
    assert gaps[-10:].mean() < 0.5 * gaps[:5].mean()


@FAST
@given(seed=st.integers(0, 10_000), pattern=st.sampled_from(sorted(PATTERNS)), alpha=st.sampled_from([0.0, 0.5, 0.9]))
def test_line_search_objective_never_increases(seed: int, pattern: str, alpha: float) -> None:
    layer = _layer(seed, pattern=pattern)
    run, start = _run(layer, alpha=alpha, iterations=12)
    objectives = run.objectives
    scale = max(objectives[0], 1.0)
    assert all(b <= a + 1e-5 * scale for a, b in zip(objectives, objectives[1:])), objectives
    # objectives[0] is the Wanda warm start's error, computed independently here.
    assert objectives[0] == pytest.approx(float(_row_objective(layer, layer.weight * start).sum()), rel=1e-4)


def test_open_loop_objective_trend() -> None:
    layer = _layer(5, d_out=8, d_in=32, pattern="row")
    run, _ = _run(layer, alpha=0.5, iterations=40, step="open_loop")
    # gamma_0 = 1 jumps to the first vertex; from there the open loop trends down.
    assert run.objectives[-1] <= run.objectives[1]
    assert sum(run.objectives[-10:]) < sum(run.objectives[1:11])


@pytest.mark.parametrize("pattern", ["row", "unstructured", "nm"])
def test_incremental_product_matches_dense(pattern: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Always take the sparse-difference path (small layers change more than the dense threshold).
    monkeypatch.setattr(core, "DENSE_FRACTION", 1.0)
    layer = _layer(11, d_out=12, d_in=32, pattern=pattern)
    run, _ = _run(layer, alpha=0.3, iterations=30, refresh_every=1000)
    assert run.sparse_updates == 29 and run.dense_updates == 1
    dense = (layer.weight * run.mask) @ layer.gram
    scale = float(((layer.weight @ layer.gram).abs()).max())
    assert torch.allclose(run.kept_product, dense, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("pattern", ["row", "nm"])
def test_bfloat16_products_approximate_the_float32_relaxation(pattern: str) -> None:
    # bfloat16 vertex products: the same iterations on rounded inputs, the result kept in float32.
    layer = _layer(13, d_out=12, d_in=32, pattern=pattern)
    exact, _ = _run(layer, alpha=0.5, iterations=10)
    low, _ = _run(layer, alpha=0.5, iterations=10, product_dtype="bfloat16")
    assert low.kept_product.dtype == torch.float32 and low.dense_updates == exact.dense_updates
    assert low.objectives[-1] == pytest.approx(exact.objectives[-1], rel=0.05)
    # P follows the iterate up to the products' rounding.
    dense = (layer.weight * low.mask) @ layer.gram
    scale = float(((layer.weight @ layer.gram).abs()).max())
    assert torch.allclose(low.kept_product, dense, atol=2e-2 * scale, rtol=0)


@pytest.mark.parametrize("pattern", ["nm", "row60"])
def test_bfloat16_products_keep_the_pattern_and_the_guarantee(pattern: str) -> None:
    layer = _layer(8, d_out=10, d_in=32, pattern=pattern)
    config = {"iterations": 6, "relax_rows": True, "tabu_steps": 10, "product_dtype": "bfloat16"}
    result = FWSolver(FWConfig.from_values(config)).prune(layer)
    assert _counts_ok(result.mask, layer.target)
    wanda = layer.feasible_set().mask(wanda_scores(layer.weight, layer.gram))
    final, start = _row_objective(layer, result.weight), _row_objective(layer, layer.weight * wanda)
    assert bool((final <= start * (1 + 1e-5) + 1e-6).all())
    metrics = result.metrics
    assert metrics["fw/objective_final"] <= metrics["fw/objective_rounded"] * (1 + 1e-6)


def test_fixed_weights_stay_at_one() -> None:
    layer = _layer(2, d_out=6, d_in=32, pattern="row")
    run, start = _run(layer, alpha=0.75, iterations=10)
    k = int(start[0].sum())
    assert bool((run.fixed.sum(dim=1) == math.floor(0.75 * k)).all())
    assert bool((run.mask[run.fixed] == 1).all())
    assert bool((start | ~run.fixed).all())  # the fixed weights are the Wanda mask's best
    assert float(run.mask.min()) >= 0 and float(run.mask.max()) <= 1 + 1e-6


# ---------------------------------------------------------------------------------------------
# The solver: feasibility, rounding guarantee, edge cases
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 10_000),
    pattern=st.sampled_from(sorted(PATTERNS)),
    alpha=st.sampled_from([0.0, 0.3, 0.9, 0.999]),
    polish=st.sampled_from([0, 3]),
    tabu=st.sampled_from([0, 20]),
)
def test_result_is_feasible_and_never_worse_than_wanda(
    seed: int, pattern: str, alpha: float, polish: int, tabu: int
) -> None:
    layer = _layer(seed, d_out=5, d_in=16, pattern=pattern)
    config = FWConfig.from_values(
        {"alpha": alpha, "iterations": 8, "polish_steps": polish, "polish_sweeps": polish, "tabu_steps": tabu}
    )
    result = FWSolver(config).prune(layer)
    assert result.mask.dtype == torch.bool
    assert layer.feasible_set().contains(result.mask)
    assert _counts_ok(result.mask, layer.target)
    assert bool((result.weight[~result.mask] == 0).all())
    assert torch.equal(result.weight[result.mask], layer.weight[result.mask])

    wanda = layer.feasible_set().mask(wanda_scores(layer.weight, layer.gram))
    final_rows = _row_objective(layer, result.weight)
    wanda_rows = _row_objective(layer, layer.weight * wanda)
    tol = 1e-5 * float(wanda_rows.sum()) + 1e-6
    if pattern == "unstructured":
        assert float(final_rows.sum()) <= float(wanda_rows.sum()) + tol
    else:  # row-separable: the guarantee holds row by row
        assert bool((final_rows <= wanda_rows + tol).all())
    metrics = result.metrics
    assert metrics["fw/objective_final"] <= metrics["fw/objective_start"] + tol
    assert metrics["fw/objective_final"] <= metrics["fw/objective_rounded"] + tol
    assert metrics["fw/objective_final"] == pytest.approx(float(final_rows.sum()), rel=1e-4, abs=1e-6)


def test_alpha_zero_and_near_one() -> None:
    layer = _layer(7, d_out=6, d_in=32, pattern="row")
    k = 16
    run0, _ = _run(layer, alpha=0.0, iterations=5)
    assert not bool(run0.fixed.any())
    near, _ = _run(layer, alpha=0.999, iterations=5)
    assert bool((near.fixed.sum(dim=1) == k - 1).all())  # floor(0.999 * 16) = 15: one free slot per row
    # With one free slot per row the relaxed iterate spends at most one unit of mass off the fixed set.
    assert bool(near.mask[~near.fixed].sum() <= 6 + 1e-5)
    for alpha in (0.0, 0.999):
        result = FWSolver(FWConfig.from_values({"alpha": alpha, "iterations": 5})).prune(layer)
        assert _counts_ok(result.mask, layer.target)


def test_polish_does_better_than_rounding_on_correlated_inputs() -> None:
    layer = _layer(13, d_out=16, d_in=32, pattern="row")
    # swap_steps=0: the descent of polish_steps, not the tabu search.
    plain = FWSolver(FWConfig.from_values({"iterations": 10, "polish_steps": 0, "swap_steps": 0})).prune(layer)
    polished = FWSolver(FWConfig.from_values({"iterations": 10, "polish_steps": 100, "swap_steps": 0})).prune(layer)
    assert polished.metrics["fw/objective_final"] < polished.metrics["fw/objective_rounded"]
    assert layer.error(polished.weight) < layer.error(plain.weight)
    assert polished.metrics["fw/swaps"] > 0


@pytest.mark.parametrize("pattern", ["row", "nm", "nm14", "unstructured"])
def test_polish_keeps_counts_and_only_improves(pattern: str) -> None:
    layer = _layer(17, d_out=10, d_in=24, pattern=pattern)
    weight, gram = layer.weight, layer.gram
    start = layer.feasible_set().mask(weight.abs())  # magnitude: a poor start with room to improve
    if pattern.startswith("nm"):
        result = group_sweep_polish(weight, gram, start, 4, 5, block=8)
        polished, rows, steps, swaps = result.mask, result.row_errors, result.steps, result.moves
        assert torch.equal(polished.reshape(10, 6, 4).sum(dim=2), start.reshape(10, 6, 4).sum(dim=2))
    else:
        result = swap_polish(weight, gram, start, 200)
        polished, rows, steps, swaps = result.mask, result.row_errors, result.steps, result.moves
    assert swaps > 0 and steps >= 1
    assert torch.equal(polished.sum(dim=1), start.sum(dim=1))
    before, after = _row_objective(layer, weight * start), _row_objective(layer, weight * polished)
    assert torch.allclose(rows, after, rtol=1e-4, atol=1e-6 * float(before.abs().max()))
    assert bool((after <= before + 1e-6 * before.abs().max()).all())
    assert float(after.sum()) < float(before.sum())


def test_group_sweep_reaches_a_groupwise_optimum() -> None:
    # After sweeps that change nothing, no group of any row can take a better kept set alone.
    layer = _layer(19, d_out=3, d_in=12, pattern="nm")
    weight, gram = layer.weight, layer.gram
    start = layer.feasible_set().mask(weight.abs())
    result = group_sweep_polish(weight, gram, start, 4, 50, block=4)
    polished, sweeps = result.mask, result.steps
    assert sweeps < 50
    value = _row_objective(layer, weight * polished)
    for group in range(3):
        for kept in itertools.combinations(range(4), 2):
            other = polished.clone()
            other[:, 4 * group : 4 * group + 4] = False
            other[:, [4 * group + i for i in kept]] = True
            assert bool((value <= _row_objective(layer, weight * other) + 1e-6 * value.abs().max()).all())


def _group_optimum(layer: LayerProblem, mask: torch.Tensor) -> torch.Tensor:
    """Brute force: every row's best N:M (2:4) mask over all kept sets of all its groups, float64."""
    d_out, d_in = mask.shape
    best = torch.full((d_out,), math.inf, dtype=torch.float64)
    for kept in itertools.product(itertools.combinations(range(4), 2), repeat=d_in // 4):
        candidate = torch.zeros(d_in, dtype=torch.bool)
        for group, chosen in enumerate(kept):
            candidate[[4 * group + i for i in chosen]] = True
        best = torch.minimum(best, _row_objective(layer, layer.weight * candidate))
    return best


@FAST
@given(seed=st.integers(0, 10_000), steps=st.integers(0, 12), tenure=st.integers(1, 4))
def test_tabu_search_keeps_the_pattern_and_never_worsens_a_row(seed: int, steps: int, tenure: int) -> None:
    layer = _layer(seed, d_out=5, d_in=16, pattern="nm")
    start = layer.feasible_set().mask(layer.weight.abs())
    result = group_tabu_search(layer.weight, layer.gram, start, 4, steps, tenure)
    mask, rows, improved = result.mask, result.row_errors, result.improved_rows
    assert _counts_ok(mask, layer.target)
    before, after = _row_objective(layer, layer.weight * start), _row_objective(layer, layer.weight * mask)
    scale = 1e-5 * float(before.abs().max())
    assert torch.allclose(rows, after, rtol=1e-4, atol=scale)
    assert bool((after <= before + scale).all())
    changed = (mask != start).any(dim=1)
    assert improved == int(changed.sum())
    assert bool((after[changed] < before[changed]).all())
    if steps == 0:
        assert torch.equal(mask, start) and improved == 0


@FAST
@given(seed=st.integers(0, 10_000), pattern=st.sampled_from(["nm", "nm14"]))
def test_tabu_search_tabulated_quadratic_terms_equal_the_recomputed_ones(seed: int, pattern: str) -> None:
    # The table holds (m_c - s)ᵀ Q_g (m_c - s) for every slot and current set c (+inf for s = c);
    # the per-move recomputation it replaces gives the same terms for any current sets.
    layer = _layer(seed, d_out=5, d_in=16, pattern=pattern)
    start = layer.feasible_set().mask(layer.weight.abs())
    search = tabu._TabuSearch(layer.weight, layer.gram, start, 4, 2, None)
    assert search.quadratic_table is not None
    choices = search.choices
    count = choices.shape[0]
    table = search.quadratic_table.view(search.slots, count, count)
    for current in range(count):
        sets = torch.full((search.slots,), current, dtype=torch.long)
        expected = tabu._quadratic_terms(choices, search.q_flat, search.set_quadratic, sets)
        got = table[:, current, :].T
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = torch.isfinite(expected)
        scale = 1e-5 * float(expected[finite].abs().max())
        assert torch.allclose(got[finite], expected[finite], rtol=1e-4, atol=scale)


@pytest.mark.parametrize("seed", [3, 17, 41])
def test_tabu_search_with_and_without_the_table_agree(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(seed, d_out=8, d_in=32, pattern="nm")
    start = layer.feasible_set().mask(layer.weight.abs())
    tabulated = group_tabu_search(layer.weight, layer.gram, start, 4, 15, 3)
    monkeypatch.setattr(tabu, "MAX_TABLE_CHOICES", 0)
    recomputed = group_tabu_search(layer.weight, layer.gram, start, 4, 15, 3)
    assert torch.equal(tabulated.mask, recomputed.mask)
    assert torch.allclose(tabulated.row_errors, recomputed.row_errors, rtol=1e-6)
    assert tabulated.improved_rows == recomputed.improved_rows > 0


def test_tabu_search_leaves_groupwise_optima_for_better_ones() -> None:
    # From masks where no single group can improve, accepting uphill moves reaches each row's
    # brute-force optimum (3 groups: 216 masks per row) on most rows and never ends worse.
    layer = _layer(29, d_out=24, d_in=12, pattern="nm")
    weight, gram = layer.weight, layer.gram
    swept = group_sweep_polish(weight, gram, layer.feasible_set().mask(weight.abs()), 4, 50)
    start, sweeps = swept.mask, swept.steps
    assert sweeps < 50
    optimum = _group_optimum(layer, start)
    local = _row_objective(layer, weight * start)
    stuck = local > optimum * (1 + 1e-6)
    assert int(stuck.sum()) >= 3  # the instance has rows caught in a worse local optimum
    result = group_tabu_search(weight, gram, start, 4, 40, 2)
    mask, improved = result.mask, result.improved_rows
    found = _row_objective(layer, weight * mask)
    assert improved >= 3
    assert bool((found <= local * (1 + 1e-6)).all())
    assert int((found[stuck] <= optimum[stuck] * (1 + 1e-6)).sum()) >= 2 * int(stuck.sum()) // 3


def test_tabu_search_is_the_default_nm_search_and_runs_after_an_optional_sweep() -> None:
    layer = _layer(31, d_out=24, d_in=32, pattern="nm")
    sweep_only = FWSolver(FWConfig.from_values({"iterations": 5, "polish_sweeps": 6, "tabu_steps": 0})).prune(layer)
    assert sweep_only.metrics["fw/tabu_improved_rows"] == 0 and sweep_only.metrics["fw/polish_steps"] > 0
    default = FWSolver(FWConfig.from_values({"iterations": 5})).prune(layer)
    assert default.metrics["fw/polish_steps"] == 0 and default.metrics["fw/tabu_improved_rows"] > 0
    assert _counts_ok(default.mask, layer.target)
    assert default.metrics["fw/objective_final"] < default.metrics["fw/objective_rounded"]
    # After a sweep the tabu search starts from the swept mask and a row keeps it unless it finds better.
    both = FWSolver(FWConfig.from_values({"iterations": 5, "polish_sweeps": 6, "tabu_steps": 30})).prune(layer)
    assert both.metrics["fw/tabu_improved_rows"] > 0
    assert both.metrics["fw/objective_final"] < sweep_only.metrics["fw/objective_final"]
    assert layer.error(both.weight) < layer.error(sweep_only.weight)


# ---------------------------------------------------------------------------------------------
# The swap tabu search (row, unstructured) and the search from the Wanda mask
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 10_000),
    steps=st.integers(0, 15),
    tenure=st.integers(1, 4),
    pattern=st.sampled_from(["row", "row60", "unstructured"]),
)
def test_swap_tabu_search_keeps_counts_and_never_worsens_a_row(
    seed: int, steps: int, tenure: int, pattern: str
) -> None:
    layer = _layer(seed, d_out=5, d_in=16, pattern=pattern)
    start = layer.feasible_set().mask(layer.weight.abs())  # magnitude: a poor start with room to improve
    result = swap_tabu_search(layer.weight, layer.gram, start, steps, tenure)
    mask, rows = result.mask, result.row_errors
    assert torch.equal(mask.sum(dim=1), start.sum(dim=1))  # every row keeps its count
    assert layer.feasible_set().contains(mask) and _counts_ok(mask, layer.target)
    before, after = _row_objective(layer, layer.weight * start), _row_objective(layer, layer.weight * mask)
    scale = 1e-5 * float(before.abs().max())
    assert torch.allclose(rows, after, rtol=1e-4, atol=scale)
    assert bool((after <= before + scale).all())
    changed = (mask != start).any(dim=1)
    assert result.improved_rows == int(changed.sum())
    assert bool((after[changed] < before[changed]).all())
    assert result.steps <= steps and result.moves <= 5 * steps
    if steps == 0:
        assert torch.equal(mask, start) and result.improved_rows == 0


def test_swap_tabu_search_leaves_swap_optima_for_better_ones() -> None:
    # From masks where the swap descent stops (no improving swap of its kind), uphill swaps find
    # better masks on a third of the rows and never end worse.
    layer = _layer(31, d_out=24, d_in=32, pattern="row")
    weight, gram = layer.weight, layer.gram
    descent = swap_polish(weight, gram, layer.feasible_set().mask(weight.abs()), 200)
    assert descent.steps < 200
    local = _row_objective(layer, weight * descent.mask)
    result = swap_tabu_search(weight, gram, descent.mask, 60, 2)
    found = _row_objective(layer, weight * result.mask)
    assert result.improved_rows >= 6
    assert bool((found <= local * (1 + 1e-6)).all())
    assert float(found.sum()) < 0.97 * float(local.sum())


def test_swap_tabu_search_lets_rows_without_a_swap_wait() -> None:
    # unstructured: a row with every weight kept or none kept has no swap; the others still move.
    layer = _layer(37, d_out=4, d_in=12, pattern="unstructured")
    start = layer.feasible_set().mask(layer.weight.abs())
    start[0], start[1] = True, False
    result = swap_tabu_search(layer.weight, layer.gram, start, 20, 2)
    assert torch.equal(result.mask[:2], start[:2])
    assert torch.equal(result.mask.sum(dim=1), start.sum(dim=1))
    assert result.improved_rows > 0


@pytest.mark.parametrize("pattern", ["row", "row60", "unstructured"])
def test_row_patterns_search_from_the_wanda_mask_unless_relax_rows(pattern: str) -> None:
    layer = _layer(41, d_out=12, d_in=32, pattern=pattern)
    default = FWSolver().prune(layer)
    metrics = default.metrics
    assert metrics["fw/iterations"] == 0 and default.trace == []
    assert "fw/gap_last" not in metrics and "fw/lower_bound" not in metrics
    assert metrics["fw/objective_rounded"] == metrics["fw/objective_start"]  # the search starts from Wanda
    assert metrics["fw/objective_final"] < metrics["fw/objective_start"]
    assert metrics["fw/polish_steps"] == 80 and metrics["fw/tabu_improved_rows"] > 0
    relaxed = FWSolver(FWConfig.from_values({"relax_rows": True, "iterations": 6})).prune(layer)
    assert relaxed.metrics["fw/iterations"] == 6 and len(relaxed.trace) == 6
    assert relaxed.metrics["fw/lower_bound"] <= relaxed.metrics["fw/objective_relaxed"] + 1e-6
    assert _counts_ok(relaxed.mask, layer.target) and _counts_ok(default.mask, layer.target)


def test_swap_tabu_search_does_better_than_the_descent_it_replaces() -> None:
    layer = _layer(43, d_out=16, d_in=48, pattern="row")
    descent = FWSolver(FWConfig.from_values({"swap_steps": 0, "polish_steps": 200})).prune(layer)
    tabu = FWSolver().prune(layer)
    assert descent.metrics["fw/polish_steps"] < 200  # the descent stopped in a local optimum
    assert layer.error(tabu.weight) < layer.error(descent.weight)


@FAST
@given(seed=st.integers(0, 10_000), pattern=st.sampled_from(sorted(PATTERNS)), alpha=st.sampled_from([0.0, 0.5, 0.9]))
def test_full_shape_oracle_matches_the_gathered_one(seed: int, pattern: str, alpha: float) -> None:
    # The oracle on whole units with the fixed weights blocked picks the gathered oracle's vertex,
    # ties (rounded gradients) broken alike.
    layer = _layer(seed, pattern=pattern)
    scores = wanda_scores(layer.weight, layer.gram)
    face = core.FaceCoordinates.of(layer.feasible_set(), alpha, scores)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(layer.weight.shape, generator=gen).mul_(2).round_()
    gathered = face.vertex(face.lmo(grad))
    full = core.as_float(face.chosen_full(-grad) | face.fixed)
    assert torch.equal(full, gathered)


def test_as_float_is_to_float() -> None:
    mask = torch.rand(7, 9) > 0.4
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(core.as_float(mask, dtype), mask.to(dtype))
    assert torch.equal(core.as_float(mask.T), mask.T.to(torch.float32))


def test_swap_polish_finds_a_local_optimum_of_a_tiny_row() -> None:
    # 1 row, 6 inputs, keep 3: after the polish no single swap improves.
    layer = _layer(23, d_out=1, d_in=6, pattern="row")
    weight, gram = layer.weight, layer.gram
    start = layer.feasible_set().mask(weight.abs())
    polished = swap_polish(weight, gram, start, 50).mask
    value = float(_row_objective(layer, weight * polished).sum())
    for out in polished[0].nonzero()[:, 0].tolist():
        for into in (~polished[0]).nonzero()[:, 0].tolist():
            other = polished.clone()
            other[0, out], other[0, into] = False, True
            assert value <= float(_row_objective(layer, weight * other).sum()) + 1e-6 * value


def test_metrics_and_trace() -> None:
    layer = _layer(1, pattern="nm")
    result = FWSolver(FWConfig.from_values({"iterations": 7, "trace_every": 3})).prune(layer)
    for key in ("fw/iterations", "fw/objective_start", "fw/objective_relaxed", "fw/objective_rounded", "fw/gap_last"):
        assert key in result.metrics
    assert result.metrics["fw/iterations"] == 7
    assert [entry["iteration"] for entry in result.trace] == [0, 3, 6]
    assert all(set(entry) == {"iteration", "objective", "gap"} for entry in result.trace)
    assert result.metrics["fw/lower_bound"] <= result.metrics["fw/objective_relaxed"] + 1e-6
    # the values, against an independent computation: the final objective is the layer error of the returned weight,
    # the search after rounding never worsens it, and the Frank-Wolfe bound (the hull's minimum) is below every mask
    final = float(_row_objective(layer, result.weight).sum())
    assert result.metrics["fw/objective_final"] == pytest.approx(final, rel=1e-5)
    assert result.metrics["fw/lower_bound"] <= final <= result.metrics["fw/objective_rounded"] * (1 + 1e-6)


def test_registered_and_structured_rejected() -> None:
    assert solver_class("fw") is FWSolver
    layer = _layer(0)
    layer.target = SparsityConfig(0.5, "structured")
    with pytest.raises(ValueError, match="fw supports the row, unstructured and nm patterns, got 'structured'"):
        FWSolver().prune(layer)


def test_input_not_modified() -> None:
    layer = _layer(4)
    weight, gram = layer.weight.clone(), layer.gram.clone()
    FWSolver(FWConfig.from_values({"iterations": 3, "reconstruct": True})).prune(layer)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.gram, gram)


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


# The keys, types, order and defaults of the flat config (the search and reconstruction groups' keys
# in place; relax_rows, swap_steps and swap_tenure came with the swap tabu search, when iterations went
# from 20 to 10 and tabu_steps from 150 to 100).
FLAT_DEFAULTS = {
    "alpha": (float, 0.5),
    "iterations": (int, 10),
    "relax_rows": (bool, False),
    "step": (str, "line_search"),
    "polish_steps": (int, 60),
    "swap_steps": (int, 80),
    "swap_tenure": (int, 4),
    "polish_sweeps": (int, 0),
    "tabu_steps": (int, 100),
    "tabu_tenure": (int, 20),
    "reconstruct": (bool, False),
    "damp": (float, 0.01),
    "reconstruct_iterations": (int, 30),
    "reconstruct_sweeps": (int, 2),
    "trace_every": (int, 1),
    "refresh_every": (int, 50),
    "product_dtype": (str, "float32"),
}


def test_nested_config_keeps_the_flat_keys() -> None:
    types = FWConfig.field_types()
    assert list(types) == list(FLAT_DEFAULTS)
    assert types == {key: kind for key, (kind, _) in FLAT_DEFAULTS.items()}
    assert config_field_types(FWConfig) == types  # what --set parses text into
    assert FWSolver().config.values() == {key: default for key, (_, default) in FLAT_DEFAULTS.items()}
    config = FWConfig.from_values({"tabu_steps": 3, "reconstruct": True, "damp": 0.05, "alpha": 0.25})
    assert config.search.tabu_steps == 3 and config.reconstruction.reconstruct is True
    assert config.reconstruction.damp == 0.05 and config.alpha == 0.25
    assert config.values() == {
        **FWSolver().config.values(),
        "tabu_steps": 3,
        "reconstruct": True,
        "damp": 0.05,
        "alpha": 0.25,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha": 1.0}, r"fw: alpha must be in \[0, 1\), got 1.0"),
        ({"alpha": -0.1}, r"fw: alpha must be in \[0, 1\), got -0.1"),
        ({"alpha": float("nan")}, r"fw: alpha must be in \[0, 1\), got nan"),
        ({"iterations": 0}, r"fw: iterations must be an integer >= 1, got 0"),
        ({"iterations": 2.5}, r"fw: iterations must be an integer >= 1, got 2.5"),
        ({"step": "armijo"}, r"fw: step must be one of line_search, open_loop, got 'armijo'"),
        ({"product_dtype": "float16"}, r"fw: product_dtype must be one of float32, bfloat16, got 'float16'"),
        ({"polish_steps": -1}, r"fw: polish_steps must be an integer >= 0, got -1"),
        ({"polish_sweeps": -2}, r"fw: polish_sweeps must be an integer >= 0, got -2"),
        ({"tabu_steps": -1}, r"fw: tabu_steps must be an integer >= 0, got -1"),
        ({"tabu_tenure": 0}, r"fw: tabu_tenure must be an integer >= 1, got 0"),
        ({"swap_steps": -1}, r"fw: swap_steps must be an integer >= 0, got -1"),
        ({"swap_tenure": 0}, r"fw: swap_tenure must be an integer >= 1, got 0"),
        ({"relax_rows": "maybe"}, r"fw: relax_rows must be true or false, got 'maybe'"),
        ({"damp": 0.0}, r"fw: damp must be a finite number > 0, got 0.0"),
        ({"reconstruct_iterations": 0}, r"fw: reconstruct_iterations must be an integer >= 1, got 0"),
        ({"reconstruct": "yes"}, r"fw: reconstruct must be true or false, got 'yes'"),
        ({"reconstruct_sweeps": -1}, r"fw: reconstruct_sweeps must be an integer >= 0, got -1"),
        ({"trace_every": 0}, r"fw: trace_every must be an integer >= 1, got 0"),
    ],
)
def test_bad_config(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FWSolver(FWConfig.from_values(overrides))


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------


def test_reconstruct_matches_direct_least_squares() -> None:
    layer = _layer(29, d_out=4, d_in=8, pattern="row")
    weight, gram = layer.weight.double(), layer.gram.double()
    mask = layer.feasible_set().mask(wanda_scores(layer.weight, layer.gram))
    damp = 0.01
    lam = damp * float(gram.diagonal().mean())
    solved = reconstruct_rows(weight, gram, mask, damp, iterations=40)
    for i in range(weight.shape[0]):
        support = mask[i].nonzero()[:, 0]
        system = gram[support][:, support] + lam * torch.eye(len(support), dtype=torch.float64)
        rhs = (gram @ weight[i])[support] + lam * weight[i, support]
        expected = torch.zeros_like(weight[i])
        expected[support] = torch.linalg.solve(system, rhs)
        assert torch.allclose(solved[i], expected, rtol=1e-6, atol=1e-8)
    # No damping: the plain least-squares normal equations on the support.
    exact = reconstruct_rows(weight, gram, mask, 0.0, iterations=40)
    for i in range(weight.shape[0]):
        support = mask[i].nonzero()[:, 0]
        expected = torch.linalg.solve(gram[support][:, support], (gram @ weight[i])[support])
        assert torch.allclose(exact[i, support], expected, rtol=1e-5, atol=1e-7)


@FAST
@given(
    seed=st.integers(0, 10_000),
    pattern=st.sampled_from(sorted(PATTERNS)),
    iterations=st.sampled_from([1, 3, 30]),
    damp=st.sampled_from([0.0, 0.01, 1.0]),
)
def test_reconstruct_never_increases_error(seed: int, pattern: str, iterations: int, damp: float) -> None:
    layer = _layer(seed, d_out=5, d_in=16, pattern=pattern)
    mask = layer.feasible_set().mask(wanda_scores(layer.weight, layer.gram))
    rebuilt = reconstruct_rows(layer.weight, layer.gram, mask, damp, iterations)
    assert bool((rebuilt[~mask] == 0).all())
    masked_rows, rebuilt_rows = _row_objective(layer, layer.weight * mask), _row_objective(layer, rebuilt)
    assert bool((rebuilt_rows <= masked_rows * (1 + 1e-5) + 1e-6).all())


def test_solver_reconstruct_beats_mask_only() -> None:
    layer = _layer(31, d_out=8, d_in=32, pattern="row60")
    plain = FWSolver(FWConfig.from_values({"iterations": 5})).prune(layer)
    rebuilt = FWSolver(FWConfig.from_values({"iterations": 5, "reconstruct": True, "reconstruct_sweeps": 0})).prune(
        layer
    )
    assert torch.equal(plain.mask, rebuilt.mask)  # least squares on the fw mask
    assert layer.error(rebuilt.weight) < layer.error(plain.weight)
    assert bool((rebuilt.weight[~rebuilt.mask] == 0).all())
    joint = FWSolver(FWConfig.from_values({"iterations": 5, "reconstruct": True})).prune(layer)
    assert layer.error(joint.weight) <= layer.error(rebuilt.weight) * (1 + 1e-5)
    assert joint.metrics["fw/objective_reconstructed"] == pytest.approx(layer.error(joint.weight), rel=1e-4)
    assert joint.metrics["fw/objective_reconstructed"] <= joint.metrics["fw/objective_final"]
    assert "fw/objective_reconstructed" not in plain.metrics


def _damped(layer: LayerProblem, damp: float = 0.01) -> torch.Tensor:
    gram = layer.gram
    return gram + damp * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)


def _assert_lowers_the_damped_objective(
    layer: LayerProblem, damped: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor, rows
) -> None:
    """A joint search result: zeros off the mask, reported rows exact, no row worse, the sum lower."""
    assert bool((kept[~mask] == 0).all())
    damped_layer = LayerProblem(layer.name, layer.weight, damped, layer.target)
    before, after = _row_objective(damped_layer, values), _row_objective(damped_layer, kept)
    assert torch.allclose(rows, after, rtol=1e-4, atol=1e-6 * float(before.abs().max()))
    assert bool((after <= before * (1 + 1e-5)).all())
    assert float(after.sum()) < float(before.sum())


@pytest.mark.parametrize("pattern", ["nm", "nm14"])
def test_joint_group_sweep_keeps_counts_and_lowers_the_damped_objective(pattern: str) -> None:
    layer = _layer(41, d_out=10, d_in=24, pattern=pattern)
    weight, damped = layer.weight, _damped(layer)
    start = layer.feasible_set().mask(weight.abs())
    values = reconstruct_rows(weight, layer.gram, start, 0.01, 30)
    result = group_sweep_polish(weight, damped, start, 4, 5, values=values, block=8)
    mask, kept, rows, sweeps, changes = result.mask, result.kept, result.row_errors, result.steps, result.moves
    assert changes > 0 and sweeps >= 1
    assert torch.equal(mask.reshape(10, 6, 4).sum(dim=2), start.reshape(10, 6, 4).sum(dim=2))
    _assert_lowers_the_damped_objective(layer, damped, values, mask, kept, rows)


def test_joint_group_sweep_reaches_a_groupwise_optimum_over_masks_and_weights() -> None:
    # After sweeps that change nothing, no group can take another kept set, or other values on
    # its own kept set, that lowers the objective with the other groups fixed (brute force).
    layer = _layer(43, d_out=3, d_in=12, pattern="nm")
    weight, damped = layer.weight.double(), _damped(layer).double()
    start = layer.feasible_set().mask(weight.abs())
    result = group_sweep_polish(weight, damped, start, 4, 50, values=weight * start, block=4)
    kept, sweeps = result.kept, result.steps
    assert sweeps < 50
    residual = weight - kept
    value = ((residual @ damped) * residual).sum(dim=1)
    for row in range(3):
        for group in range(3):
            cols = list(range(4 * group, 4 * group + 4))
            for chosen in itertools.combinations(range(4), 2):
                free = [cols[i] for i in chosen]
                # Best values on `free` with every other weight of the row fixed: a 2x2 solve.
                other = kept[row].clone()
                other[cols] = 0.0
                rest = weight[row] - other
                rest[free] = 0.0
                best = torch.linalg.solve(damped[free][:, free], (rest @ damped)[free])
                candidate = other.clone()
                candidate[free] = best
                diff = weight[row] - candidate
                assert float(value[row]) <= float(diff @ damped @ diff) + 1e-9 * float(value[row])


@pytest.mark.parametrize("pattern", ["row", "row60", "unstructured"])
def test_joint_swaps_keep_counts_and_lower_the_damped_objective(pattern: str) -> None:
    layer = _layer(59, d_out=10, d_in=24, pattern=pattern)
    weight, damped = layer.weight, _damped(layer)
    start = layer.feasible_set().mask(weight.abs())
    values = reconstruct_rows(weight, layer.gram, start, 0.01, 30)
    result = joint_swap_polish(weight, damped, start, values, 100)
    mask, kept, rows, steps, swaps = result.mask, result.kept, result.row_errors, result.steps, result.moves
    assert swaps > 0 and steps >= 1
    assert torch.equal(mask.sum(dim=1), start.sum(dim=1))
    _assert_lowers_the_damped_objective(layer, damped, values, mask, kept, rows)


def test_joint_swaps_stop_at_a_swap_optimum_of_a_tiny_row() -> None:
    # 1 row, 6 inputs, keep 3: afterwards no swap with the restored weight at its best value improves.
    layer = _layer(61, d_out=1, d_in=6, pattern="row")
    weight, damped = layer.weight.double(), _damped(layer).double()
    start = layer.feasible_set().mask(weight.abs())
    result = joint_swap_polish(weight, damped, start, weight * start, 50)
    mask, kept, steps = result.mask, result.kept, result.steps
    assert steps < 50
    residual = weight[0] - kept[0]
    value = float(residual @ damped @ residual)
    for out in mask[0].nonzero()[:, 0].tolist():
        for into in (~mask[0]).nonzero()[:, 0].tolist():
            other = kept[0].clone()
            other[out] = 0.0
            rest = weight[0] - other
            rest[into] = 0.0
            other[into] = float((rest @ damped)[into] / damped[into, into])
            diff = weight[0] - other
            assert value <= float(diff @ damped @ diff) + 2e-6 * value


def test_reconstruct_from_a_start_never_increases_its_error() -> None:
    layer = _layer(47, d_out=6, d_in=16, pattern="nm")
    mask = layer.feasible_set().mask(wanda_scores(layer.weight, layer.gram))
    start = reconstruct_rows(layer.weight, layer.gram, mask, 0.01, 2)
    for iterations in (1, 3, 30):
        rebuilt = reconstruct_rows(layer.weight, layer.gram, mask, 0.01, iterations, start=start)
        assert bool((rebuilt[~mask] == 0).all())
        assert bool((_row_objective(layer, rebuilt) <= _row_objective(layer, start) * (1 + 1e-5) + 1e-6).all())
    # Warm and cold starts converge to the same least-squares solution.
    cold = reconstruct_rows(layer.weight.double(), layer.gram.double(), mask, 0.01, 40)
    warm = reconstruct_rows(layer.weight.double(), layer.gram.double(), mask, 0.01, 40, start=start.double())
    assert torch.allclose(cold, warm, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pattern", ["nm", "row60", "unstructured"])
def test_reconstruct_sweeps_never_worse_than_least_squares_on_the_fw_mask(pattern: str) -> None:
    layer = _layer(53, d_out=12, d_in=32, pattern=pattern)
    plain = FWSolver(FWConfig.from_values({"iterations": 5, "reconstruct": True, "reconstruct_sweeps": 0})).prune(layer)
    joint = FWSolver(FWConfig.from_values({"iterations": 5, "reconstruct": True, "reconstruct_sweeps": 3})).prune(layer)
    assert plain.metrics["fw/joint_changes"] == 0
    assert joint.metrics["fw/joint_changes"] > 0
    assert _counts_ok(joint.mask, layer.target)
    assert bool((joint.weight[~joint.mask] == 0).all())
    plain_rows, joint_rows = _row_objective(layer, plain.weight), _row_objective(layer, joint.weight)
    assert bool((joint_rows <= plain_rows * (1 + 1e-5) + 1e-6).all())
    assert float(joint_rows.sum()) < float(plain_rows.sum())


def test_group_search_is_skipped_for_large_nm_patterns() -> None:
    # 8:16 has 12870 kept sets per group: the sweeps would enumerate them all, so they are skipped.
    gen = torch.Generator().manual_seed(67)
    x = torch.randn(32, 48, generator=gen)
    large = LayerProblem("w", torch.randn(4, 32, generator=gen), x @ x.T, SparsityConfig.from_pattern("8:16"))
    result = FWSolver(FWConfig.from_values({"iterations": 4, "reconstruct": True})).prune(large)
    assert result.metrics["fw/group_search_skipped"] == 1.0
    assert result.metrics["fw/swaps"] == 0 and result.metrics["fw/joint_changes"] == 0
    assert bool((result.mask.reshape(4, 2, 16).sum(dim=2) == 8).all())
    small = FWSolver(FWConfig.from_values({"iterations": 4})).prune(_layer(67, pattern="nm"))
    assert small.metrics["fw/group_search_skipped"] == 0.0


def test_non_contiguous_weight_gives_the_same_mask() -> None:
    layer = _layer(37, d_out=8, d_in=16, pattern="row")
    transposed = LayerProblem(layer.name, layer.weight.T.contiguous().T, layer.gram, layer.target)
    assert not transposed.weight.is_contiguous()
    config = FWConfig.from_values({"iterations": 4})
    assert torch.equal(FWSolver(config).prune(layer).mask, FWSolver(config).prune(transposed).mask)


@pytest.mark.parametrize(
    ("values", "pattern", "idle"),
    [
        ({}, None, set()),
        ({"iterations": 3, "alpha": 0.2, "product_dtype": "bfloat16"}, None, {"iterations", "alpha", "product_dtype"}),
        ({"iterations": 3, "relax_rows": True}, None, set()),
        ({"iterations": 3, "tabu_steps": 10}, "2:4", set()),
        (
            {"swap_steps": 10, "polish_steps": 5, "relax_rows": True},
            "2:4",
            {"swap_steps", "polish_steps", "relax_rows"},
        ),
        ({"tabu_steps": 10, "polish_sweeps": 2}, None, {"tabu_steps", "polish_sweeps"}),
        ({"polish_steps": 5}, None, {"polish_steps"}),
        ({"polish_steps": 5, "swap_steps": 0}, None, set()),
        ({"polish_steps": 5, "reconstruct": True}, None, set()),  # the joint swaps of reconstruct_sweeps read it
        ({"damp": 0.1, "reconstruct_sweeps": 0}, "2:4", {"damp", "reconstruct_sweeps"}),
        ({"damp": 0.1, "reconstruct": True}, "2:4", set()),
        ({"tabu_steps": 0, "tabu_tenure": 5}, "2:4", {"tabu_tenure"}),
    ],
)
def test_fw_names_the_settings_a_pattern_never_reads(values, pattern, idle):
    solver = solver_class("fw")(FWConfig.from_values(values))
    target = SparsityConfig.from_pattern(pattern) if pattern else SparsityConfig(0.5)
    assert set(solver.idle_settings(target)) == idle
