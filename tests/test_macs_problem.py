"""mnist1d-mlp-macs: a user MACs budget next to l0's density constraint."""

import pytest
import torch
from torch import nn

from constrainedsparse import RunConfig, make, run
from constrainedsparse.formulations.l0 import L0Config
from constrainedsparse.logger import read_metrics
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.problems.mnist1d_mlp_macs import expected_macs_fraction, macs_violation, model
from constrainedsparse.purge import count_params_and_macs, purge
from constrainedsparse.targets import SparsityConfig, Targets

DENSE = 40 * 256 + 256 * 256 + 256 * 10


def _gated(grouping):
    torch.manual_seed(0)
    net = model({"macs_fraction": 0.3})
    targets = Targets().resolve(net, SparsityConfig(0.5))
    f = make("l0", SparsityProblem(net, nn.functional.cross_entropy, targets), L0Config(grouping=grouping))
    f.setup(1, 1)
    densities = (0.8, 0.5, 0.25)
    for gate, d in zip(f.gates.values(), densities):
        gate.log_alpha.data.fill_(0.0)
        gate.prob_nonzero = lambda d=d: torch.full((1,), d)  # a known expected density per layer
    return net, densities


def test_macs_without_gates_are_the_purged_networks():
    net = model({"macs_fraction": 0.3})
    assert float(expected_macs_fraction(net).detach()) == pytest.approx(1.0)
    with torch.no_grad():
        net[2].weight[:, :128] = 0  # hidden units 0..127 of the first layer are read by no weight: purge drops them
    want = (40 * 128 + 256 * 128 + 256 * 10) / DENSE
    assert float(expected_macs_fraction(net).detach()) == pytest.approx(want)
    assert float(macs_violation(net).detach()) == pytest.approx(want - 0.3)
    with torch.no_grad():
        net[0].weight[200:] = 0  # units 200..255 get no weight in: constants folded into the next bias
        net[4].weight[3, 5] = 0  # and one unstructured zero counts as one MAC less
    want = (40 * 72 + 256 * 128 - 56 * 256 + 256 * 10 - 1) / DENSE
    assert float(expected_macs_fraction(net).detach()) == pytest.approx(want)
    purged = purge(net)
    x = torch.randn(1, 40)
    assert count_params_and_macs(purged, x)[1] >= want * DENSE  # purge's dense MACs bound the sparse count


def test_expected_macs_with_structured_and_unstructured_gates():
    net, (a, b, c) = _gated("structured")
    want = (40 * 256 * a * b + 256 * 256 * b * c + 256 * 10 * c) / DENSE
    assert float(expected_macs_fraction(net)) == pytest.approx(want)
    net, (a, b, c) = _gated("unstructured")
    assert float(expected_macs_fraction(net)) == pytest.approx((40 * 256 * a + 256 * 256 * b + 256 * 10 * c) / DENSE)


def test_l0_run_logs_and_satisfies_the_macs_budget(tmp_path):
    summary = run(
        RunConfig(
            problem="mnist1d-mlp-macs",
            formulation="l0",
            sparsity=0.3,
            epochs=10,
            pretrain_epochs=2,
            out=tmp_path,
            settings={"grouping": "structured"},
            wandb="disabled",
            progress=False,
        )
    )
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "violation/macs" in r]
    assert rows and all("multiplier/macs" in r and r["multiplier/macs"] >= 0 for r in rows)
    assert max(r["violation/macs"] for r in rows) > 0  # the budget binds at first ...
    assert rows[-1]["violation/macs"] <= 0  # ... and holds at the end
    assert rows[-1]["violation/l0_density"] <= 0
    assert summary["purged_macs"] < summary["dense_macs"]
