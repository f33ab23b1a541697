"""A user problem whose last training step of epoch 2 gives a finite loss but a NaN gradient on the last layer's
bias (``--set param=weight``: its weight, a pruning target)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse.spec import Problem


class Net(nn.Sequential):
    def __init__(self, after, param):
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.after, self.param, self.calls = after, param, 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls == self.after:  # sqrt at 0: value 0, gradient NaN (for that one tensor only)
                out = out + (getattr(self[2], self.param).abs().min() * 0).sqrt()
        return out


def data(options):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


problem = Problem(
    name="nan-grad-bias",
    description="tiny synthetic problem whose step nan_after takes a NaN gradient on its last bias",
    model=lambda options: Net(options["nan_after"], options["param"]),
    data=data,
    pretrain_epochs=0,
    epochs=4,
    batch_size=16,
    options={"nan_after": 8, "param": "bias"},
)
