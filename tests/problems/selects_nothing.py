"""A user problem whose target filter matches no parameter (a bad-input case)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse.spec import Problem
from constrainedsparse.targets import Targets


def model(options):
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def data(options):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x[:, 0] > 0).long()), TensorDataset(x, (x[:, 0] > 0).long())


problem = Problem(
    name="selects-nothing",
    description="targets include only 'encoder.*', which this model does not have",
    model=model,
    data=data,
    targets=Targets(include=["encoder.*"]),
    pretrain_epochs=0,
)
