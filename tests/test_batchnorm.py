"""BatchNorm statistics of a pruned model, re-estimated (library function and the training runner's stage)."""

import json
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import constrainedsparse as cs
from constrainedsparse.cli import main


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


def test_it_is_torch_update_bn_for_pairs_and_takes_dict_batches():
    data = TensorDataset(torch.randn(64, 1, 8, 8) * 3 + 1, torch.randint(0, 10, (64,)))
    reference, ours, keyed = _cnn(), _cnn(), _cnn()
    torch.optim.swa_utils.update_bn(DataLoader(data, batch_size=16), reference)
    reference.eval(), ours.eval()
    assert cs.recalibrate_batchnorm(ours, DataLoader(data, batch_size=16)) == 4
    assert not ours.training and not any(p.grad is not None for p in ours.parameters())
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(ours[1], name), getattr(reference[1], name))
    assert ours[1].momentum == reference[1].momentum == 0.1  # restored
    batches = [{"input": x} for x, _ in DataLoader(data, batch_size=16)]
    seen = cs.recalibrate_batchnorm(keyed, batches, forward=lambda m, b: m(b["input"]), max_batches=2)
    assert seen == 2 and not torch.allclose(keyed[1].running_mean, ours[1].running_mean)


def test_other_modules_run_as_evaluated_and_keep_their_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    model[1].train()  # a mode of the user's own, restored afterwards
    model[2].eval()
    batches = [torch.randn(16, 4) for _ in range(3)]
    cs.recalibrate_batchnorm(model, batches)
    first = model[2].running_mean.clone()
    cs.recalibrate_batchnorm(model, batches)
    assert torch.equal(first, model[2].running_mean)  # dropout was off: the same statistics twice
    assert model[0].training and model[1].training and not model[2].training  # as they were


def test_an_empty_batch_adds_nothing_to_the_statistics():
    """A batch of no sample used to count as one: the statistics of [x, empty] differed from those of [x]."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    assert cs.recalibrate_batchnorm(model, [x]) == 1
    alone = model[1].running_mean.clone(), model[1].running_var.clone()
    assert cs.recalibrate_batchnorm(model, [x, torch.empty(0, 4)]) == 1
    assert torch.equal(model[1].running_mean, alone[0]) and torch.equal(model[1].running_var, alone[1])
    with pytest.raises(ValueError, match=r"^recalibrate_batchnorm got no batch \(or empty ones only\): the Batch"):
        cs.recalibrate_batchnorm(model, [torch.empty(0, 4)])
    assert torch.equal(model[1].running_mean, alone[0])  # left as they were


def test_a_model_without_batchnorm_is_left_alone_and_bad_inputs_are_one_line():
    mlp = nn.Sequential(nn.Linear(4, 4))
    assert cs.recalibrate_batchnorm(mlp, []) == 0
    with pytest.raises(ValueError, match=r"^recalibrate_batchnorm got no batch"):
        cs.recalibrate_batchnorm(_cnn(), [])
    with pytest.raises(ValueError, match=r"^recalibrate_batchnorm cannot feed a str batch to the model"):
        cs.recalibrate_batchnorm(_cnn(), ["text"])
    with pytest.raises(ValueError, match=r"^max_batches must be an integer >= 1 or None, got 0$"):
        cs.recalibrate_batchnorm(_cnn(), [torch.zeros(1, 1, 8, 8)], max_batches=0)


PROBLEM_FILE = """
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse import Problem


def data(options):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


problem = Problem(
    name="digits-bn-cnn",
    description="a small BatchNorm CNN on sklearn digits",
    model=lambda options: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)
    ),
    data=data,
    loss=nn.functional.cross_entropy,
    pretrain_epochs=3,
)
"""


def test_the_training_runner_re_estimates_them_after_the_hard_prune(tmp_path):
    path = tmp_path / "digits_bn_cnn.py"
    path.write_text(textwrap.dedent(PROBLEM_FILE))
    common = ["run", str(path), "--formulation", "admm", "--sparsity", "0.9", "--epochs", "2", "--wandb", "disabled",
              "--no-progress"]  # fmt: skip
    summaries = {}
    for batches in (0, 20):
        out = tmp_path / f"run{batches}"
        assert main([*common, "--set", f"batchnorm_batches={batches}", "--out", str(out)]) == 0
        summaries[batches] = json.loads((out / "summary.json").read_text())
    assert "batchnorm_batches" not in summaries[0] and summaries[20]["batchnorm_batches"] == 20
    stale, fresh = summaries[0]["hardprune_accuracy"], summaries[20]["hardprune_accuracy"]
    assert fresh > stale + 0.05, (stale, fresh)


def test_batchnorm_batches_on_a_model_without_batchnorm_warns_before_pruning(tmp_path):
    from constrainedsparse import RunConfig, run

    config = RunConfig(problem="digits-mlp", formulation="magnitude", sparsity=0.5, epochs=1, pretrain_epochs=1,
                       out=tmp_path / "o", wandb="disabled", progress=False,
                       settings={"batchnorm_batches": "2"})  # fmt: skip
    message = r"^--set batchnorm_batches=2 has no effect: the model of problem 'digits-mlp' has no BatchNorm layer "
    with pytest.warns(UserWarning, match=message + r"with running statistics$"):
        summary = run(config)
    assert "batchnorm_batches" not in summary
