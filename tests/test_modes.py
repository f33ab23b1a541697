"""A layer the user froze in eval mode inside a training model (a BatchNorm whose statistics are kept) stays
frozen through everything the library evaluates in eval mode: it restores every module's own mode, not the model's.
"""

import numpy as np
import pytest
import torch
from torch import nn

from constrainedsparse import SparsityConfig, SparsityProblem, Targets, UserConstraint, make, prune_layerwise
from constrainedsparse.modes import eval_mode
from constrainedsparse.purge import count_params_and_macs
from constrainedsparse.report import constraint_report


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    model.train()
    model[1].eval()  # the user's frozen statistics
    return model


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_restores_every_modules_own_mode_also_when_the_block_raises():
    model = _model()
    before = _modes(model)
    with eval_mode(model):
        assert not any(_modes(model))
    assert _modes(model) == before
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        raise RuntimeError("inside")
    assert _modes(model) == before == [True, True, False, True, True, True]


def test_slrs_coordination_and_the_reports_leave_a_frozen_batchnorm_frozen():
    model = _model()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    norm = {"norm": UserConstraint(lambda m: m[0].weight.norm() - 10.0)}
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)), norm)
    f = make("slr", problem, interval=1, interval_unit="step")
    f.setup(1, 2, reference_batch=(x, y))  # slr's f on its reference batch, in eval mode, at every coordination
    f.start_epoch(0)
    _, metrics = f.training_step((x, y))
    assert "coordination/k" in metrics
    assert _modes(model) == [True, True, False, True, True, True]
    constraint_report(model, norm, {"norm": torch.zeros(1)}, (x, y))
    count_params_and_macs(model, x)
    assert _modes(model) == [True, True, False, True, True, True]


def test_one_shot_calibration_leaves_a_frozen_layer_frozen():
    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model = Blocks().train()
    model.layers[1][1].eval()
    before = _modes(model)
    prune_layerwise(model, [torch.randn(4, 8)], "magnitude", sparsity=0.5)
    assert _modes(model) == before


def test_sizing_a_data_dependent_constraint_moves_no_batchnorm_statistics_and_takes_no_random_draw():
    model = _model()
    model[1].train()
    x, y = torch.randn(32, 8) * 5 + 3, torch.randint(0, 3, (32,))
    per_class = UserConstraint(lambda m, b: m(b[0]).softmax(-1).mean(0) - 0.5 + float(np.random.rand()) * 0)
    statistics = model[1].running_mean.clone()
    torch.manual_seed(123)
    np.random.seed(123)
    SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)),
                    {"per_class": per_class}, example_batch=(x, y))  # fmt: skip
    drawn = torch.rand(1), np.random.rand()
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(drawn[0], torch.rand(1)) and drawn[1] == np.random.rand()  # the streams go on where they were
    assert torch.equal(model[1].running_mean, statistics) and int(model[1].num_batches_tracked) == 0
    assert _modes(model) == [True] * 6
