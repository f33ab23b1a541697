"""Random data drawn in data() without a seed of its own, and a model with dropout: what --seed and --resume
must make reproducible (the global generators are the only source of randomness here)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse.spec import Problem


def data(options):
    x = torch.randn(96, 8)
    y = (x[:, :4].sum(1) > 0).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def model(options):
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))


problem = Problem(
    name="random-dropout",
    description="random data from the global generator, dropout in the model",
    model=model,
    data=data,
    pretrain_epochs=2,
    epochs=2,
    batch_size=16,
)
