"""Tests for the baseline layer-wise solvers ``magnitude``, ``wanda`` and ``sparsegpt``.

Golden tests pin masks worked out by hand on 2x4 weights with a hand-set Gram matrix; the OBS
update of ``sparsegpt`` is checked against a direct least-squares solve; pattern tests check exact
keep counts (per row, per layer, per N:M group); a hypothesis property test checks feasibility and
exact zeros outside the mask on random shapes, levels, block sizes and dead inputs.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrainedsparse.layerwise.base import LayerProblem, LayerResult, available_solvers, solver_class
from constrainedsparse.layerwise.solvers import Magnitude, SparseGPT, SparseGPTConfig, Wanda
from constrainedsparse.sets import NMSparse, RowTopK, TopK, keep_count
from constrainedsparse.targets import SparsityConfig

SOLVERS = ("magnitude", "wanda", "sparsegpt", "admm")

# Hand-set case: |W| favours columns 2, 3 in row 0, but input 0 has a 4x larger norm (G_00 = 16).
W_HAND = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
G_HAND = torch.diag(torch.tensor([16.0, 1.0, 1.0, 0.25]))


def _layer(weight: torch.Tensor, gram: torch.Tensor, target: SparsityConfig) -> LayerProblem:
    return LayerProblem("layer.weight", weight, gram, target, tokens=1)


def _correlated_problem(seed: int, d_out: int, d_in: int, tokens: int, target: SparsityConfig) -> LayerProblem:
    """Strongly correlated inputs (rank-8 signal plus noise) with unequal scales; Gaussian weights."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(d_in, 8, generator=gen, dtype=torch.float64)
    scales = torch.exp(0.5 * torch.randn(d_in, generator=gen, dtype=torch.float64))
    signal = basis @ torch.randn(8, tokens, generator=gen, dtype=torch.float64)
    x = scales[:, None] * (signal + 0.3 * torch.randn(d_in, tokens, generator=gen, dtype=torch.float64))
    weight = torch.randn(d_out, d_in, generator=gen)
    return _layer(weight, (x @ x.T).float(), target)


def _check_output(layer: LayerProblem, result: LayerResult) -> None:
    """Feasible bool mask with exact counts, weight exactly zero outside it, dtype kept."""
    mask, weight = result.mask, result.weight
    assert mask.dtype == torch.bool and mask.shape == layer.weight.shape
    assert weight.dtype == layer.weight.dtype and weight.shape == layer.weight.shape
    # StructuredGroups.contains takes abs(), which bool tensors do not support: check it on 0/1 floats.
    assert layer.feasible_set().contains(mask.float() if layer.target.pattern == "structured" else mask)
    assert not bool(weight[~mask].ne(0).any())
    d_out, d_in = layer.weight.shape
    target = layer.target
    if target.pattern == "row":
        assert mask.sum(dim=1).tolist() == [keep_count(d_in, target.sparsity)] * d_out
    elif target.pattern == "unstructured":
        assert int(mask.sum()) == keep_count(d_out * d_in, target.sparsity)
    elif target.pattern == "nm":
        n, m = target.nm
        assert NMSparse(n, m).contains(mask)
        assert mask.reshape(d_out, d_in // m, m).sum(dim=2).eq(n).all()
    else:  # structured: whole output rows
        kept_rows = mask.any(dim=1)
        assert mask[kept_rows].all() and int(kept_rows.sum()) == keep_count(d_out, target.sparsity)


def test_registered_with_descriptions():
    assert set(SOLVERS) <= set(available_solvers())
    for name in SOLVERS:
        description = solver_class(name).description
        assert isinstance(description, str) and description and "\n" not in description
    assert solver_class("sparsegpt").Config is SparseGPTConfig


# ---------------------------------------------------------------------------------------------
# Golden masks on hand-set weights.
# ---------------------------------------------------------------------------------------------

ROW_50 = SparsityConfig(0.5, "row")


@pytest.mark.parametrize(
    ("target", "magnitude", "wanda"),
    [
        # row 0: |W| = 1 2 3 4 -> keep cols 2, 3; Wanda |W|*sqrt(G_jj) = 4 2 3 2 -> keep cols 0, 2.
        # row 1: |W| = 4 3 2 1 -> cols 0, 1; Wanda 16 3 2 0.5 -> cols 0, 1.
        (ROW_50, [[0, 0, 1, 1], [1, 1, 0, 0]], [[1, 0, 1, 0], [1, 1, 0, 0]]),
        # Per layer, keep 4 of 8: |W| 4, 4, 3, 3 (ties: lower flat index) vs Wanda 16, 4, 3, 3.
        (SparsityConfig(0.5, "unstructured"), [[0, 0, 1, 1], [1, 1, 0, 0]], [[1, 0, 1, 0], [1, 1, 0, 0]]),
        # 1:2 groups (0, 1), (2, 3): magnitude row 0 keeps -2 and -4, Wanda keeps 1 (4 > 2) and 3 (3 > 2).
        (SparsityConfig.from_pattern("1:2"), [[0, 1, 0, 1], [1, 0, 1, 0]], [[1, 0, 1, 0], [1, 0, 1, 0]]),
    ],
)
def test_golden_masks_magnitude_and_wanda(target, magnitude, wanda):
    layer = _layer(W_HAND, G_HAND, target)
    for solver, expected in ((Magnitude(), magnitude), (Wanda(), wanda)):
        result = solver.prune(layer)
        expected_mask = torch.tensor(expected, dtype=torch.bool)
        assert torch.equal(result.mask, expected_mask), type(solver).__name__
        assert torch.equal(result.weight, W_HAND * expected_mask)


def test_golden_sparsegpt_diagonal_gram_is_wanda_like_without_updates():
    # G diagonal -> H^{-1} diagonal, U_jj = (G_jj + lam)^{-1/2} with lam = 0.01 * mean(16, 1, 1, 0.25)
    # = 0.045625: saliency w^2 (G_jj + lam), row 0: 16.05, 4.18, 9.41, 4.73 -> cols 0, 2;
    # row 1: 256.7, 9.41, 4.18, 0.30 -> cols 0, 1 (Wanda's choice). No off-diagonal U: no update.
    layer = _layer(W_HAND, G_HAND, ROW_50)
    result = SparseGPT().prune(layer)
    expected = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, W_HAND * expected)
    assert result.metrics["sparsegpt/fallback"] == 0.0 and result.metrics["sparsegpt/damp"] == 0.01


# A non-diagonal SPD Gram; the row's column 0 or 2 is tiny so that it is the one column pruned.
G_FULL = torch.tensor(
    [[4.0, 1.0, 0.5, 0.2], [1.0, 3.0, 0.7, 0.4], [0.5, 0.7, 2.0, 0.6], [0.2, 0.4, 0.6, 1.5]], dtype=torch.float64
)


@pytest.mark.parametrize("pruned", [0, 2])
def test_sparsegpt_obs_update_is_least_squares_over_later_columns(pruned):
    # One row, keep 3 of 4, one block: the sweep prunes column p and re-solves the columns after p
    # (those before p are already fixed): min (w - v) H (w - v)^T s.t. v_p = 0, v_{<p} = w_{<p},
    # i.e. v_L = w_L + H_LL^{-1} H_Lp w_p for L = {p+1, ..}, with the damped H = G + 0.01 mean(diag G) I.
    weight = torch.tensor([[1.0, -0.8, 1.2, 0.9]], dtype=torch.float64)
    weight[0, pruned] = 0.01
    layer = _layer(weight, G_FULL, SparsityConfig(0.25, "row"))
    result = SparseGPT(SparseGPTConfig(blocksize=4)).prune(layer)
    expected_mask = torch.ones(1, 4, dtype=torch.bool)
    expected_mask[0, pruned] = False
    assert torch.equal(result.mask, expected_mask)
    hessian = G_FULL + 0.01 * G_FULL.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    later = list(range(pruned + 1, 4))
    expected = weight.clone()
    expected[0, pruned] = 0.0
    expected[0, later] += torch.linalg.solve(hessian[later][:, later], hessian[later, pruned] * weight[0, pruned])
    assert torch.allclose(result.weight, expected, rtol=1e-12, atol=1e-12), (result.weight, expected)
    assert result.weight.dtype == torch.float64
    # Column 0 pruned: nothing is fixed before it, so this is the full least-squares optimum.
    if pruned == 0:
        gradient = (result.weight - weight) @ hessian
        assert float(gradient[0, 1:].abs().max()) < 1e-12


def _reference_sparsegpt(layer: LayerProblem, blocksize: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column port of the reference ``fasterprune`` (float64, H^-1 via cholesky_inverse)."""
    weight = layer.weight.double().clone()
    hessian = layer.gram.double().clone()
    d_out, d_in = weight.shape
    hessian += damp * hessian.diagonal().mean() * torch.eye(d_in, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    target, keep = layer.target, torch.zeros(d_out, d_in, dtype=torch.bool)
    for c1 in range(0, d_in, blocksize):
        c2 = min(c1 + blocksize, d_in)
        block, block_upper = weight[:, c1:c2].clone(), upper[c1:c2, c1:c2]
        errors = torch.zeros_like(block)
        scores = block.square() / block_upper.diagonal().square()
        if target.pattern == "row":
            count = keep_count(c2, target.sparsity) - keep_count(c1, target.sparsity)
            block_keep = RowTopK(count).mask(scores)
        elif target.pattern == "unstructured":
            count = keep_count(d_out * c2, target.sparsity) - keep_count(d_out * c1, target.sparsity)
            block_keep = TopK(count).mask(scores)
        else:
            block_keep = torch.zeros_like(block, dtype=torch.bool)
        for j in range(c2 - c1):
            if target.pattern == "nm" and j % target.nm[1] == 0:
                group = slice(j, j + target.nm[1])
                group_scores = block[:, group].square() / block_upper.diagonal()[group].square()
                block_keep[:, group] = NMSparse(*target.nm).mask(group_scores)
            w = block[:, j].clone()
            err = torch.where(block_keep[:, j], 0.0, w) / block_upper[j, j]
            block[:, j:] -= torch.outer(err, block_upper[j, j:])
            errors[:, j] = err
        weight[:, c1:c2] = torch.where(block_keep, block, 0.0)
        weight[:, c2:] -= errors @ upper[c1:c2, c2:]
        keep[:, c1:c2] = block_keep
    return keep, weight


@pytest.mark.parametrize(
    "target",
    [SparsityConfig(0.5, "row"), SparsityConfig(0.7, "unstructured"), SparsityConfig.from_pattern("2:4")],
    ids=lambda t: f"{t.pattern}-{t.describe()}",
)
def test_sparsegpt_matches_a_column_by_column_reference(target):
    # d_in = 72 with blocks of 40: two blocks, the first one split into sub-blocks of 16 (+ a ragged 8).
    layer = _correlated_problem(5, d_out=10, d_in=72, tokens=150, target=target)
    result = SparseGPT(SparseGPTConfig(blocksize=40)).prune(layer)
    keep, weight = _reference_sparsegpt(layer, blocksize=40)
    assert torch.equal(result.mask, keep)
    assert torch.allclose(result.weight.double(), weight.float().double(), rtol=1e-6, atol=1e-6)


def test_sparsegpt_damped_error_metric_is_the_damped_reconstruction_error():
    layer = _correlated_problem(3, d_out=8, d_in=24, tokens=64, target=SparsityConfig(0.5, "row"))
    result = SparseGPT(SparseGPTConfig(blocksize=5)).prune(layer)
    gram = layer.gram.double()
    hessian = gram + 0.01 * gram.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    diff = layer.weight.double() - result.weight.double()
    expected = float(((diff @ hessian) * diff).sum())
    assert result.metrics["sparsegpt/damped_error"] == pytest.approx(expected, rel=1e-4)


def test_sparsegpt_dead_inputs_get_zero_weight_and_are_pruned_first():
    gram = G_FULL.clone().float()
    gram[1, :] = 0.0
    gram[:, 1] = 0.0
    weight = torch.tensor([[1.0, 50.0, -1.2, 0.9], [0.3, -70.0, 0.2, 1.0]])
    layer = _layer(weight, gram, SparsityConfig(0.25, "row"))
    result = SparseGPT().prune(layer)
    assert not result.mask[:, 1].any()
    _check_output(layer, result)


def test_sparsegpt_says_when_dead_inputs_make_a_layer_sparser_than_its_target():
    """The authors' rule zeroes the weights of inputs that are zero on every calibration token, even where the
    mask keeps them (sparsity 0 here): the result is theirs, and a warning names what it did."""
    gram = G_FULL.clone().float()
    gram[1, :] = 0.0
    gram[:, 1] = 0.0
    weight = torch.tensor([[1.0, 50.0, -1.2, 0.9], [0.3, -70.0, 0.2, 1.0]])
    layer = _layer(weight, gram, SparsityConfig(0.0, "row"))
    expected = (r"^layer.weight: 1 of its 4 inputs are zero on every calibration token; sparsegpt \(as its authors' "
                r"code\) sets their weights to 0, 2 of them kept by the mask")  # fmt: skip
    with pytest.warns(UserWarning, match=expected):
        result = SparseGPT().prune(layer)
    assert result.mask.all() and torch.equal(result.weight[:, 1], torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dead input: no warning
        SparseGPT().prune(_layer(weight, G_FULL.clone().float(), SparsityConfig(0.0, "row")))


def test_layer_error_is_never_negative_on_a_rank_deficient_gram():
    """tr(D G Dᵀ) is a sum of squares; a rank-deficient Gram matrix rounded slightly indefinite (here on purpose:
    x xᵀ - 1e-6 I, with every row of D orthogonal to x) must not make it negative: reported as 0."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=generator)
    gram = x @ x.T - 1e-6 * torch.eye(64)
    diff = torch.randn(8, 64, generator=generator)
    diff -= (diff @ x) @ x.T / float(x.T @ x)  # D x = 0: the exact error is -1e-6 ||D||², the true one 0
    weight = torch.randn(8, 64, generator=generator)
    assert float(((diff @ gram) * diff).sum()) < 0.0
    layer = LayerProblem("layer", weight, gram, SparsityConfig(0.5, "row"))
    assert layer.error(weight - diff) == 0.0 and layer.relative_error(weight - diff) == 0.0


# ---------------------------------------------------------------------------------------------
# Patterns: exact counts.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize(
    "target",
    [
        SparsityConfig.from_pattern("2:4"),
        SparsityConfig.from_pattern("1:4"),
        SparsityConfig.from_pattern("3:8"),
        SparsityConfig(0.5, "row"),
        SparsityConfig(0.7, "row"),
        SparsityConfig(0.6, "unstructured"),
        SparsityConfig(0.5, "structured"),
    ],
    ids=lambda t: f"{t.pattern}-{t.describe()}",
)
def test_patterns_are_met_exactly(name, target):
    layer = _correlated_problem(0, d_out=6, d_in=40, tokens=80, target=target)
    before = layer.weight.clone()
    cls = solver_class(name)
    # Block size 12 is not a multiple of 8 (nm rounds it) and leaves a ragged last block.
    solver = cls(cls.Config(blocksize=12)) if name == "sparsegpt" else cls()
    result = solver.prune(layer)
    _check_output(layer, result)
    assert torch.equal(layer.weight, before)


def test_sparsegpt_block_keep_counts_add_up_to_the_layer_count():
    # 7 columns per row at 50 %: keep_count(7) = 4 (round half to even of 3.5), but per-block
    # counts of blocks of 3 would give 2 + 2 + 0 or 2 + 2 + 1; telescoping gives exactly 4.
    layer = _correlated_problem(1, d_out=3, d_in=7, tokens=20, target=SparsityConfig(0.5, "row"))
    for blocksize in (1, 2, 3, 7, 128):
        result = SparseGPT(SparseGPTConfig(blocksize=blocksize)).prune(layer)
        _check_output(layer, result)


def test_nm_width_not_divisible_is_rejected():
    layer = _correlated_problem(0, d_out=2, d_in=6, tokens=10, target=SparsityConfig.from_pattern("2:4"))
    for name in SOLVERS:
        with pytest.raises(ValueError, match="divisible by 4"):
            solver_class(name)().prune(layer)


def test_gram_shape_mismatch_is_rejected():
    layer = _layer(W_HAND, torch.eye(3), ROW_50)
    for solver in (Wanda(), SparseGPT()):
        with pytest.raises(ValueError, match=r"Gram matrix must have shape \(4, 4\)"):
            solver.prune(layer)


# ---------------------------------------------------------------------------------------------
# Quality: sparsegpt <= wanda <= magnitude on correlated inputs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [SparsityConfig(0.5, "row"), SparsityConfig(0.6, "unstructured"), SparsityConfig.from_pattern("2:4")],
    ids=lambda t: f"{t.pattern}-{t.describe()}",
)
def test_error_ordering_on_correlated_gram(target):
    layer = _correlated_problem(7, d_out=32, d_in=64, tokens=256, target=target)
    errors = {name: layer.relative_error(solver_class(name)().prune(layer).weight) for name in SOLVERS}
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"], errors
    # Measured over seeds 0-7 of this generator: sparsegpt / wanda <= 0.25, wanda / magnitude <= 0.66.
    assert errors["sparsegpt"] < 0.5 * errors["wanda"], errors


# ---------------------------------------------------------------------------------------------
# Fallback and configuration errors.
# ---------------------------------------------------------------------------------------------

INDEFINITE = torch.tensor([[1.0, 100.0, 0.0, 0.0], [100.0, 1.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
NAN_OFF_DIAGONAL = torch.diag(torch.tensor([16.0, 1.0, 1.0, 0.25]))
NAN_OFF_DIAGONAL[0, 2] = NAN_OFF_DIAGONAL[2, 0] = math.nan


@pytest.mark.parametrize(
    ("gram", "retries", "damp_used"),
    [(INDEFINITE, 3, 10.0), (INDEFINITE, 0, 0.01), (NAN_OFF_DIAGONAL, 3, 10.0)],
    ids=["indefinite", "indefinite-no-retry", "nan"],
)
def test_sparsegpt_falls_back_to_wanda_when_cholesky_fails(gram, retries, damp_used):
    # INDEFINITE has eigenvalue 1 - 100 < 0: damping 0.01, 0.1, 1, 10 x mean diag (2) never fixes it.
    layer = _layer(W_HAND, gram, ROW_50)
    result = SparseGPT(SparseGPTConfig(damp_retries=retries)).prune(layer)
    wanda = Wanda().prune(layer)
    assert result.metrics["sparsegpt/fallback"] == 1.0
    assert result.metrics["sparsegpt/damp"] == pytest.approx(damp_used)
    assert torch.equal(result.mask, wanda.mask) and torch.equal(result.weight, wanda.weight)
    _check_output(layer, result)


def test_sparsegpt_retries_with_more_damping_before_falling_back():
    # Eigenvalues 1 +- 1.5: damping 0.01 * mean diag (1) fails, 0.1 fails, 1.0 succeeds.
    gram = torch.tensor([[1.0, 1.5], [1.5, 1.0]])
    layer = _layer(torch.tensor([[1.0, 2.0]]), gram, SparsityConfig(0.5, "row"))
    result = SparseGPT().prune(layer)
    assert result.metrics["sparsegpt/fallback"] == 0.0
    assert result.metrics["sparsegpt/damp"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"blocksize": 0}, "sparsegpt: blocksize must be an integer >= 1, got 0"),
        ({"blocksize": 2.5}, "sparsegpt: blocksize must be an integer >= 1, got 2.5"),
        ({"blocksize": True}, "sparsegpt: blocksize must be an integer >= 1, got True"),
        ({"damp": 0.0}, "sparsegpt: damp must be a finite number > 0, got 0.0"),
        ({"damp": -0.1}, "sparsegpt: damp must be a finite number > 0, got -0.1"),
        ({"damp": math.nan}, "sparsegpt: damp must be a finite number > 0, got nan"),
        ({"damp": math.inf}, "sparsegpt: damp must be a finite number > 0, got inf"),
        ({"damp_retries": -1}, "sparsegpt: damp_retries must be an integer >= 0, got -1"),
    ],
)
def test_sparsegpt_bad_config(config, message):
    with pytest.raises(ValueError, match=f"^{message.replace('.', '[.]')}$"):
        SparseGPT(SparseGPTConfig(**config))


# ---------------------------------------------------------------------------------------------
# Property test.
# ---------------------------------------------------------------------------------------------


@st.composite
def _problems(draw: st.DrawFn) -> tuple[LayerProblem, int]:
    pattern = draw(st.sampled_from(["row", "unstructured", "nm", "structured"]))
    d_out = draw(st.integers(1, 6))
    if pattern == "nm":
        n, m = draw(st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]))
        d_in = m * draw(st.integers(1, 4))
        target = SparsityConfig(pattern="nm", nm=(n, m))
    else:
        d_in = draw(st.integers(1, 20))
        target = SparsityConfig(draw(st.floats(0.0, 0.95)), pattern)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d_in, draw(st.integers(1, 2 * d_in + 1)), generator=gen)
    dead = torch.rand(d_in, generator=gen) < draw(st.sampled_from([0.0, 0.3]))
    x[dead] = 0.0
    weight = torch.randn(d_out, d_in, generator=gen)
    return _layer(weight, x @ x.T, target), draw(st.integers(1, 9))


@pytest.mark.filterwarnings("ignore:.*inputs are zero on every calibration token")  # drawn dead inputs: tested above
@settings(max_examples=30, deadline=None)
@given(_problems())
def test_outputs_are_feasible_and_zero_outside_mask(problem):
    layer, blocksize = problem
    before = layer.weight.clone()
    for name in SOLVERS:
        cls = solver_class(name)
        solver = cls(cls.Config(blocksize=blocksize)) if name == "sparsegpt" else cls()
        result = solver.prune(layer)
        _check_output(layer, result)
        if name == "sparsegpt":
            assert result.metrics["sparsegpt/fallback"] == 0.0
    assert torch.equal(layer.weight, before)
