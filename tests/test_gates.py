"""Hard-concrete gates: range, closed-form expected L0, the median (by sampling) and Louizos' estimator, grouping,
removal."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse.gates import (
    BETA,
    GAMMA,
    LOG_ALPHA_RANGE,
    ZETA,
    HardConcreteGate,
    apply_gates,
    clamp_log_alpha_,
    log_alpha_from_droprate,
    remove_gates,
)
from constrainedsparse.targets import SparsityConfig, Targets


def _gate(shape=(6, 5), grouping="unstructured", log_alpha=None, module=None):
    module = module if module is not None else nn.Linear(shape[1], shape[0])
    gate = HardConcreteGate(module, module.weight.shape, grouping)
    if log_alpha is not None:
        gate.log_alpha.data.copy_(log_alpha)
    return module, gate


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-12.0, 12.0), min_size=4, max_size=4), st.integers(0, 2**31 - 1))
def test_gates_lie_in_unit_interval_in_train_and_eval(values, seed):
    _, gate = _gate((2, 2), log_alpha=torch.tensor(values).reshape(2, 2))
    torch.manual_seed(seed)
    gate.train()
    z = gate.sample()
    assert torch.all((z >= 0) & (z <= 1))
    gate.eval()
    z = gate(torch.ones(2, 2))
    assert torch.all((z >= 0) & (z <= 1))


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@settings(max_examples=30, deadline=None)
@given(st.floats(-12.0, 12.0))
def test_expected_l0_and_median_rule_closed_forms(log_alpha):
    _, gate = _gate((1, 1), log_alpha=torch.tensor([[log_alpha]]))
    expected = _sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))
    assert float(gate.prob_nonzero().detach()) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    median = min(1.0, max(0.0, _sigmoid(log_alpha / BETA) * (ZETA - GAMMA) + GAMMA))
    assert gate.test_rule == "median"
    assert float(gate.median().detach()) == pytest.approx(median, abs=1e-6)
    assert float(gate.test_gate().detach()) == pytest.approx(median, abs=1e-6)
    louizos = min(1.0, max(0.0, _sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA))
    assert float(gate.louizos_estimate().detach()) == pytest.approx(louizos, abs=1e-6)
    # The median is nonzero exactly when more than half of the draws are: P(z != 0) > 1/2.
    if abs(expected - 0.5) > 1e-6:
        assert (float(gate.median().detach()) > 0) == (expected > 0.5)


@settings(max_examples=40, deadline=None)
@given(st.floats(-6.0, 6.0), st.integers(0, 2**31 - 1))
def test_median_has_half_the_draws_on_each_side(log_alpha, seed):
    """Sampling: P(z <= median) >= 1/2 and P(z >= median) >= 1/2; strictly inside (0, 1) half lie below."""
    draws = 200_000
    _, gate = _gate((draws, 1), log_alpha=torch.full((draws, 1), log_alpha))
    gate.generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = gate.sample()
        median = float(gate.median()[0, 0])
    tol = 5 * 0.5 / math.sqrt(draws)  # five binomial standard deviations
    below, above = float((z < median).float().mean()), float((z > median).float().mean())
    assert float((z <= median).float().mean()) >= 0.5 - tol
    assert float((z >= median).float().mean()) >= 0.5 - tol
    if 0.0 < median < 1.0:  # no atom at an interior median
        assert below == pytest.approx(0.5, abs=tol) and above == pytest.approx(0.5, abs=tol)


def test_louizos_estimate_is_not_the_median():
    """Where Louizos' estimate c = sigma(log alpha)(zeta - gamma) + gamma is interior, the share of draws below it
    is sigma(beta logit(sigma(log alpha)) - log alpha) = sigma(-(1 - beta) log alpha), not 1/2 (0.58 at
    log alpha = -1, 0.42 at 1); and it keeps gates the median drops."""
    draws = 200_000
    tol = 5 * 0.5 / math.sqrt(draws)
    for log_alpha in (-1.0, 1.0, 2.0):
        _, gate = _gate((draws, 1), log_alpha=torch.full((draws, 1), log_alpha))
        gate.generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            share = float((gate.sample() < gate.louizos_estimate()).float().mean())
        assert share == pytest.approx(_sigmoid(-(1.0 - BETA) * log_alpha), abs=tol)
        assert abs(share - 0.5) > 0.08
    # log alpha = -2: P(z != 0) = 0.41 < 1/2, so the median is 0; Louizos' estimate is 0.04.
    _, gate = _gate((1, 1), log_alpha=torch.tensor([[-2.0]]))
    assert float(gate.median().detach()) == 0.0 and float(gate.louizos_estimate().detach()) > 0.0


def test_test_rule_selects_the_eval_gate():
    module = nn.Linear(3, 2)
    gate = HardConcreteGate(module, module.weight.shape, test_rule="louizos")
    gate.log_alpha.data.fill_(-2.0)
    gate.eval()
    torch.testing.assert_close(gate(torch.ones(2, 3)), gate.louizos_estimate().detach())
    assert float(gate.test_density()) == 1.0
    gate.test_rule = "median"
    assert float(gate(torch.ones(2, 3)).detach().abs().sum()) == 0.0 and float(gate.test_density()) == 0.0
    with pytest.raises(ValueError, match=r"test_rule must be one of median, louizos, got 'mean'"):
        HardConcreteGate(module, module.weight.shape, test_rule="mean")


def test_expected_l0_matches_monte_carlo():
    values = torch.linspace(-4.0, 4.0, 9)
    # 20,000 independent gates per value: one sample of each is a Monte-Carlo draw.
    _, gate = _gate((20_000, 9), log_alpha=values.expand(20_000, 9))
    gate.generator = torch.Generator().manual_seed(0)
    empirical = (gate.sample() > 0).float().mean(dim=0)
    # Binomial standard error is at most 0.5 / sqrt(20000) = 0.0035.
    torch.testing.assert_close(empirical, gate.prob_nonzero()[0].detach(), atol=0.015, rtol=0)


def test_sampling_follows_the_generator_and_is_differentiable():
    _, gate = _gate()
    gate.generator = torch.Generator().manual_seed(3)
    first = gate.sample()
    gate.generator.manual_seed(3)
    assert torch.equal(first, gate.sample())
    gate.sample().sum().backward()
    assert gate.log_alpha.grad is not None


def test_droprate_init_and_clamp():
    assert log_alpha_from_droprate(0.01) == pytest.approx(math.log(0.99 / 0.01))
    assert log_alpha_from_droprate(1e-9) == LOG_ALPHA_RANGE[1]
    with pytest.raises(ValueError, match=r"droprate_init must be in \(0, 1\), got 1.0"):
        log_alpha_from_droprate(1.0)
    _, gate = _gate()
    gate.log_alpha.data.fill_(50.0)
    clamp_log_alpha_([gate])
    assert float(gate.log_alpha.detach().max()) == LOG_ALPHA_RANGE[1]


def test_structured_linear_gates_whole_columns():
    module = nn.Linear(4, 3)
    _, gate = _gate(module=module, grouping="structured", log_alpha=torch.tensor([9.0, -9.0, 9.0, -9.0]))
    assert gate.num_gates == 4 and gate.group_size == 3
    gate.eval()
    out = gate(torch.ones(3, 4))
    assert torch.all(out[:, [1, 3]] == 0) and torch.all(out[:, [0, 2]] == 1)
    gate.train()
    z = gate(torch.ones(3, 4))
    assert torch.all(z == z[:1])  # one sample per column, shared by every row


@pytest.mark.parametrize("conv", [nn.Conv1d(2, 4, 3), nn.Conv2d(2, 4, 3), nn.Conv3d(2, 4, 1)])
def test_structured_conv_gates_whole_output_channels(conv):
    _, gate = _gate(module=conv, grouping="structured", log_alpha=torch.tensor([9.0, -9.0, -9.0, 9.0]))
    gate.eval()
    out = gate(torch.ones_like(conv.weight))
    assert torch.all(out[[1, 2]] == 0) and torch.all(out[[0, 3]] == 1)
    gate.train()
    z = gate(torch.ones_like(conv.weight)).reshape(4, -1)
    assert torch.all(z == z[:, :1])


def test_structured_gates_on_a_layer_without_rule():
    module = nn.ConvTranspose2d(2, 3, 3)
    with pytest.raises(
        ValueError, match=r"structured gates have no grouping rule for ConvTranspose2d; allowed: Linear, Conv1d"
    ):
        HardConcreteGate(module, module.weight.shape, "structured")
    with pytest.raises(ValueError, match=r"grouping must be one of unstructured, structured, got 'rows'"):
        HardConcreteGate(module, module.weight.shape, "rows")


def test_apply_names_the_parameter_and_touches_nothing_on_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.ConvTranspose2d(2, 2, 1))
    targets = Targets(module_types=(nn.Linear, nn.ConvTranspose2d)).resolve(model, SparsityConfig(0.5))
    with pytest.raises(ValueError, match=r"^1.weight: structured gates have no grouping rule"):
        apply_gates(targets, "structured")
    assert not parametrize.is_parametrized(model[0])


def test_remove_gates_leaves_plain_weights_with_the_median_rule_baked_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    targets = Targets().resolve(model, SparsityConfig(0.5))
    gates = apply_gates(targets)
    for gate in gates.values():
        gate.log_alpha.data.normal_(0.0, 3.0)
    model.eval()
    x = torch.randn(7, 5)
    expected = model(x)
    model.train()
    remove_gates(targets)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(type(p) is nn.Parameter for p in model.parameters())
    torch.testing.assert_close(model(x), expected)
