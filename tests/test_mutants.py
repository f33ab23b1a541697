"""Assertions that catch hand-made mutants the rest of the suite let through (a mutation-testing review):
the W = Z formulations' Z-step, L_rho, step-size rules and epoch coordination; Frank-Wolfe's steps, rounding and
local searches; block and prefix sets; the gates' test-time override; SparseGPT on dead inputs."""

import math  # noqa: F401
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def test_mutant_D4_is_caught():
    from test_duplicate import _tiny

    f, batches = _tiny("admm", rho=0.5)
    for b in batches:
        f.training_step(b)
    f.coordinate()
    lam, w, rho = f.multipliers(), {n: t.clone() for n, t in f.weights().items()}, f.rho
    assert any(float(m.abs().sum()) > 0 for m in lam.values())
    f.z_step(w)
    for t in f.problem.targets:
        torch.testing.assert_close(f.z[t.name], t.feasible_set.project(w[t.name] + lam[t.name] / rho))


def test_mutant_D1_is_caught():
    from test_duplicate import _tiny

    f, _ = _tiny("slr", rho=0.7)
    assert f.augmented_lagrangian(1.0, [2.0, -0.5], [4.0, 2.0]) == pytest.approx(1.0 + 1.5 + 0.5 * f.rho * 6.0)
    assert abs(f.rho - 0.7) < 1e-6


def test_mutant_R1_is_caught():
    from test_duplicate import _tiny

    f, _ = _tiny("admm", rho=1.0, rho_growth=2.0, rho_rule="balance")
    assert f.next_rho({"dual/residual": 5.0, "dual/z_change": 1.0}) == 1.0  # 5 < 10: within the band
    assert f.next_rho({"dual/residual": 1.0, "dual/z_change": 5.0}) == 1.0


def test_mutant_D8_is_caught():
    from test_duplicate import _tiny

    f, batches = _tiny("admm", interval=2, interval_unit="epoch")
    f.setup(num_epochs=4, steps_per_epoch=1)
    done = []
    for epoch in range(4):
        f.start_epoch(epoch)
        f.training_step(batches[0])
        if "coordination/k" in f.end_epoch(epoch):
            done.append(epoch)
    assert done == [1, 3], done


def test_mutant_P4_is_caught():
    from test_duplicate import _tiny

    f, batches = _tiny("admm", rho=0.3)
    f.training_step(batches[0])  # anchors cached
    name = f.problem.targets[0].name
    f.set_rho(0.6)  # in place, Z and Lambda unchanged
    assert abs(f.penalty.anchor(name)[0] - 0.6) < 1e-6
    with torch.no_grad():
        f.constraints[name].multiplier.weight.add_(1.0)  # in-place Lambda change
    rho, value = f.penalty.anchor(name)
    torch.testing.assert_close(value, f.multipliers()[name] - rho * f.z[name])


def test_mutant_L2_is_caught():
    from constrainedsparse.formulations.slr import _ratio_step

    assert _ratio_step(0.9, 0.01, 1.0, 0.0) == 0.01 and _ratio_step(0.9, 0.01, 0.0, 1.0) == 0.01


def test_mutant_F2_is_caught():
    from constrainedsparse.layerwise.fw.core import step_sizes

    g = torch.ones(2, dtype=torch.float64)
    assert step_sizes(g, g, 0, "open_loop").tolist() == [1.0, 1.0]
    assert step_sizes(g, g, 1, "open_loop").tolist() == [2 / 3, 2 / 3]


def test_mutant_F8_is_caught():
    from constrainedsparse.layerwise.fw.core import FrankWolfeRun
    from constrainedsparse.layerwise.fw.solver import round_relaxed
    from constrainedsparse.sets import RowTopK

    run = FrankWolfeRun(torch.tensor([[1.0, 1.0, 0.5]]), None, None, torch.tensor([[False, True, False]]), [], [], 0, 0)
    assert round_relaxed(RowTopK(1), run).tolist() == [[False, True, False]]


def test_mutant_F23_is_caught():
    from constrainedsparse.layerwise.fw import swap_polish

    r = swap_polish(torch.tensor([[1.0, 1.0]]), torch.eye(2), torch.tensor([[True, False]]), 10)
    assert r.moves == 0 and r.mask.tolist() == [[True, False]], (r.moves, r.steps)


def test_mutant_F25_is_caught():
    from constrainedsparse.layerwise.fw import joint_swap_polish

    w, m = torch.tensor([[1.0, 1.0]]), torch.tensor([[True, False]])
    r = joint_swap_polish(w, torch.eye(2), m, w * m, 10)
    assert r.moves == 0 and r.mask.tolist() == [[True, False]], (r.moves, r.steps)


def test_mutant_T15_is_caught():
    from constrainedsparse.sets import BlockSparse

    assert BlockSparse(1, 1, 2).mask(torch.tensor([[3.0, 0.0, 2.0, 2.0]])).tolist() == [[True, True, False, False]]


def test_mutant_T19_is_caught():
    from constrainedsparse.sets import nearest_prefix

    masks = nearest_prefix([torch.tensor([3.0, 2.0, 1.0])], lambda counts: float(sum(counts)), 1.5)
    assert int(masks[0].sum()) == 2  # S(1)=1 and S(2)=2 are equally near 1.5: a tie keeps k


def test_mutant_G9_is_caught():
    from torch import nn

    from constrainedsparse.gates import HardConcreteGate

    lin = nn.Linear(4, 3)
    gate = HardConcreteGate(lin, lin.weight.shape, droprate_init=0.01)
    gate.train()
    gate.redraw()
    assert float(gate(torch.ones(3, 4)).abs().sum()) > 0  # training draws gates
    gate.test_override = torch.zeros(())  # a hard-prune preview: the override in either mode (the pruned model's)
    assert float(gate(torch.ones(3, 4)).abs().sum()) == 0
    gate.eval()
    assert float(gate(torch.ones(3, 4)).abs().sum()) == 0
    gate.test_override = None
    assert float(gate(torch.ones(3, 4)).abs().sum()) > 0  # the test-time gate (droprate 0.01: open)


def test_mutant_F5_is_caught():
    from test_fw import _layer, _run

    layer = _layer(0, d_out=32, d_in=64, pattern="unstructured")
    run, _ = _run(layer, alpha=0.9, iterations=30, refresh_every=1000)
    assert run.sparse_updates > 0  # the setting does update sparsely
    run, _ = _run(layer, alpha=0.9, iterations=30, refresh_every=1)
    assert (run.sparse_updates, run.dense_updates) == (0, 30)  # every iteration refreshes densely


def test_mutant_F26_is_caught():
    import warnings

    from constrainedsparse.layerwise.base import LayerProblem, solver_class
    from constrainedsparse.targets import SparsityConfig

    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    layer = LayerProblem("l.weight", w, torch.zeros(8, 8), SparsityConfig(0.5, "row"), tokens=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = solver_class("sparsegpt")().prune(layer)
    assert r.metrics["sparsegpt/fallback"] == 0.0 and not r.weight.any()


def test_mutant_L10_is_caught():
    from test_duplicate import _lambdas, _tiny

    f, batches = _tiny("slr", rho=0.3)
    for b in batches:
        f.training_step(b)
    f.coordinate()
    before = _lambdas(f)
    w = {n: t.clone() for n, t in f.weights().items()}
    m = f.coordinate()  # no W-step: condition (6) fails
    assert m["condition/6_holds"] == 0.0
    for name, lam in f.multipliers().items():
        expected = before[name] + (m["stepsize/s"] * (w[name] - f.z[name]) if m["condition/11_holds"] else 0)
        torch.testing.assert_close(lam, expected, rtol=1e-5, atol=1e-7)
