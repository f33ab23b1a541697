"""A user problem whose loss turns NaN after a number of steps (``--set nan_after=N``)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse.spec import Problem

_state = {"calls": 0, "nan_after": 6}


def model(options):
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def data(options):
    _state["nan_after"] = options["nan_after"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def loss(output, y):
    _state["calls"] += 1
    value = F.cross_entropy(output, y)
    return value * float("nan") if _state["calls"] > _state["nan_after"] else value


problem = Problem(
    name="nan-after",
    description="tiny synthetic problem whose loss becomes NaN after nan_after steps",
    model=model,
    data=data,
    loss=loss,
    pretrain_epochs=0,
    epochs=4,
    batch_size=16,
    options={"nan_after": 6},
)
