"""The layer-wise ``admm`` solver: its exact W-step, patterns, quality against SparseGPT and Wanda, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrainedsparse import prune_layerwise
from constrainedsparse.layerwise import LayerProblem, solver_class
from constrainedsparse.layerwise.admm import (
    RHO_MAX,
    ADMMLayerConfig,
    ADMMLayerSolver,
    EigenGram,
    admm_support,
    penalised_solve,
)
from constrainedsparse.layerwise.fw.core import residual_row_errors
from constrainedsparse.layerwise.solvers import SparseGPT, Wanda
from constrainedsparse.targets import SparsityConfig


def _problem(seed: int, target: SparsityConfig, d_out: int = 12, d_in: int = 32, tokens: int = 96) -> LayerProblem:
    """Correlated inputs (rank-6 signal plus noise, unequal scales), Gaussian weights."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(d_in, 6, generator=gen, dtype=torch.float64)
    scales = torch.exp(0.5 * torch.randn(d_in, generator=gen, dtype=torch.float64))
    x = scales[:, None] * (basis @ torch.randn(6, tokens, generator=gen, dtype=torch.float64))
    x += 0.3 * scales[:, None] * torch.randn(d_in, tokens, generator=gen, dtype=torch.float64)
    return LayerProblem("layer.weight", torch.randn(d_out, d_in, generator=gen), (x @ x.T).float(), target, tokens)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 10),
    rows=st.integers(1, 5),
    rank=st.integers(0, 10),
    rho=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_penalised_solve_solves_the_penalised_normal_equations(n, rows, rank, rho, seed):
    """X (G + rho I) = rhs for any PSD G (rank-deficient included) and rho > 0."""
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    gram = factor @ factor.T
    rhs = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    x = penalised_solve(rhs, EigenGram.of(gram, torch.float64), rho)
    back = x @ (gram + rho * torch.eye(n, dtype=torch.float64))
    assert torch.allclose(back, rhs, rtol=1e-8, atol=1e-8 * (1 + float(rhs.abs().max())))


@pytest.mark.parametrize(
    "target",
    [SparsityConfig.from_pattern("2:4"), SparsityConfig(0.5, "row"), SparsityConfig(0.6, "unstructured")],
    ids=lambda t: f"{t.pattern}-{t.describe()}",
)
def test_beats_sparsegpt_and_no_row_is_worse_than_wanda(target):
    layer = _problem(0, target)
    before = layer.weight.clone()
    result = ADMMLayerSolver().prune(layer)
    assert torch.equal(layer.weight, before)
    assert layer.feasible_set().contains(result.mask) and not bool(result.weight[~result.mask].ne(0).any())
    wanda = Wanda().prune(layer)
    rows = residual_row_errors(layer.weight, layer.gram, result.weight)
    wanda_rows = residual_row_errors(layer.weight, layer.gram, wanda.weight)
    assert bool((rows <= wanda_rows * (1 + 1e-6)).all())
    assert layer.relative_error(result.weight) < layer.relative_error(SparseGPT().prune(layer).weight)


def test_the_iterates_meet_and_the_support_settles():
    layer = _problem(1, SparsityConfig.from_pattern("2:4"))
    run = admm_support(layer.weight, layer.gram, layer.feasible_set(), ADMMLayerConfig(iterations=40))
    assert len(run.support_changes) == len(run.residuals) == 40
    assert run.residuals[-1] < 1e-2 * run.residuals[0]
    assert run.support_changes[-1] == 0.0
    assert torch.equal(run.z != 0, run.mask & (run.z != 0)) and layer.feasible_set().contains(run.mask)
    assert run.rho == pytest.approx(0.03 * 1.2**39)


def test_a_penalty_grown_past_float32_stops_at_its_ceiling():
    # 500 iterations at x1.2 would take rho to 1e38 * mean(diag G) and overflow float32 (a RuntimeError inside)
    layer = _problem(1, SparsityConfig.from_pattern("2:4"))
    run = admm_support(layer.weight, layer.gram, layer.feasible_set(), ADMMLayerConfig(iterations=500))
    scale = float(layer.gram.diagonal().mean())
    assert run.rho == pytest.approx(RHO_MAX / scale) and layer.feasible_set().contains(run.mask)
    assert all(math.isfinite(r) for r in run.residuals)


def test_metrics_and_trace():
    result = ADMMLayerSolver(ADMMLayerConfig(iterations=5)).prune(_problem(2, SparsityConfig(0.5, "row")))
    assert {"admm/iterations", "admm/rho_final", "admm/fallback_rows", "admm/objective_final"} <= set(result.metrics)
    assert result.metrics["admm/iterations"] == 5.0
    assert [row["iteration"] for row in result.trace] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(0.0 <= row["support_change"] <= 1.0 for row in result.trace)


def test_an_all_zero_gram_keeps_a_feasible_mask():
    layer = _problem(3, SparsityConfig.from_pattern("2:4"))
    layer = LayerProblem(layer.name, layer.weight, torch.zeros_like(layer.gram), layer.target)
    result = ADMMLayerSolver().prune(layer)
    assert layer.feasible_set().contains(result.mask) and bool(torch.isfinite(result.weight).all())


class _Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def test_public_api_by_name_with_hyperparameters():
    torch.manual_seed(0)
    model = _Blocks()
    batches = [torch.randn(48, 16) for _ in range(3)]
    report = prune_layerwise(model, batches, "admm", pattern="2:4", iterations=8, reconstruct_iterations=5)
    assert set(report.layer_sparsity) == {f"blocks.{i}.{j}.weight" for i in range(2) for j in (0, 2)}
    for block in model.blocks:
        for layer in (block[0], block[2]):
            groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(dim=2)
            assert bool((groups == 2).all())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"iterations": 0}, "admm: iterations must be an integer >= 1, got 0"),
        ({"rho": 0.0}, "admm: rho must be a finite number > 0, got 0.0"),
        ({"rho": math.inf}, "admm: rho must be a finite number > 0, got inf"),
        ({"rho_growth": 0.5}, "admm: rho_growth must be a finite number >= 1, got 0.5"),
        ({"damp": 0.0}, "admm: damp must be a finite number > 0, got 0.0"),
        ({"reconstruct_iterations": 0}, "admm: reconstruct_iterations must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_are_one_precise_error(values, message):
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        solver_class("admm")(ADMMLayerConfig(**values))
