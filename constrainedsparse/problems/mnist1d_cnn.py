"""mnist1d-cnn: MNIST-1D generated locally (4,000 train / 1,000 test, 40 features), a small 1-D CNN.

The network reads each 40-sample signal as one channel: three convolutions (32, 64 and 64 channels,
the second with stride 2) and two linear layers (1280-128-10), about 188k weights. The first
convolution has only 160 weights and stays dense (as the first layer usually is in pruning papers).
"""

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import nn

from constrainedsparse.problems.mnist1d_mlp import data
from constrainedsparse.spec import Problem
from constrainedsparse.targets import Targets


def model(options: Mapping[str, Any]) -> nn.Module:
    """The 1-D CNN; input ``(N, 40)``, output ``(N, 10)`` logits."""
    return nn.Sequential(
        OrderedDict(
            [
                ("unflatten", nn.Unflatten(1, (1, 40))),
                ("conv1", nn.Conv1d(1, 32, 5, padding=2)),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv1d(32, 64, 5, stride=2, padding=2)),
                ("relu2", nn.ReLU()),
                ("conv3", nn.Conv1d(64, 64, 3, padding=1)),
                ("relu3", nn.ReLU()),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(64 * 20, 128)),
                ("relu4", nn.ReLU()),
                ("fc2", nn.Linear(128, 10)),
            ]
        )
    )


problem = Problem(
    name="mnist1d-cnn",
    description="MNIST-1D generated locally (4,000/1,000, 40 features), 1-D CNN (3 conv + 2 linear), accuracy",
    model=model,
    data=data,
    targets=Targets(exclude=("conv1.weight",)),
    pretrain_epochs=30,
    epochs=10,
    batch_size=100,
    lr=1e-3,
)
