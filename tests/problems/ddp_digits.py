"""A small digits problem for the multi-process tests.

512 training / 256 test images (global batch 64, so 8 steps per epoch and no padding with 2
ranks), an MLP 64-32-10, and a *data-dependent* user constraint (the mean squared logit on the
batch <= ``logit_budget``) whose multiplier must stay identical on every rank.
``--set fail_rank=R --set fail_step=S`` makes rank R's loss raise ``ValueError`` at its S-th call.
"""

import os

import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse.data import as_tensors
from constrainedsparse.problem import UserConstraint
from constrainedsparse.spec import Problem

_state = {"calls": 0, "fail_rank": -1, "fail_step": 0}


def model(options):
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def data(options):
    _state.update(fail_rank=options["fail_rank"], fail_step=options["fail_step"])
    digits = load_digits()
    x, y = as_tensors(digits.data / 16.0, digits.target)
    return TensorDataset(x[:512], y[:512]), TensorDataset(x[512:768], y[512:768])


def loss(output, y):
    _state["calls"] += 1
    if int(os.environ.get("RANK", "0")) == _state["fail_rank"] and _state["calls"] >= _state["fail_step"]:
        raise ValueError(f"rank {_state['fail_rank']} refuses its batch at loss call {_state['calls']}")
    return F.cross_entropy(output, y)


def logit_budget(model, batch):
    return model(batch[0]).pow(2).mean() - 2.0


problem = Problem(
    name="ddp-digits",
    description="digits subset (512/256), MLP 64-32-10, a data-dependent logit budget",
    model=model,
    data=data,
    loss=loss,
    constraints={"logit_budget": UserConstraint(logit_budget, "<=")},
    pretrain_epochs=5,
    epochs=2,
    batch_size=64,
    lr=1e-2,
    dual_lr=0.05,
    options={"fail_rank": -1, "fail_step": 0},
)
