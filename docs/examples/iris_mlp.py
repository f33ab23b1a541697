"""iris-mlp: scikit-learn's 150 real iris flowers (4 features, 3 classes), MLP 4-H-3."""

import torch
from sklearn.datasets import load_iris
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse import Problem, Targets


def model(options):
    hidden = options["hidden"]
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def data(options):
    iris = load_iris()
    x = torch.tensor(iris.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)  # standardise the four measurements
    y = torch.tensor(iris.target, dtype=torch.long)
    test = torch.arange(len(y)) % 5 == 0  # every fifth flower is held out (30 of 150)
    return TensorDataset(x[~test], y[~test]), TensorDataset(x[test], y[test])


problem = Problem(
    name="iris-mlp",
    description="sklearn iris (150 real flowers), MLP 4-H-3, accuracy",
    model=model,
    data=data,
    targets=Targets(module_types=(nn.Linear,)),  # both Linear weights; biases are never pruned
    pretrain_epochs=50,
    epochs=5,
    batch_size=16,
    lr=1e-2,
    options={"hidden": 16},  # `--set hidden=32` changes it (type taken from the default)
)
