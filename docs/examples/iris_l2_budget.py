"""iris-l2-budget: iris MLP whose first-layer weights must keep ||W_1||_2 <= 3 while being pruned."""

import torch
from sklearn.datasets import load_iris
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse import Problem, UserConstraint


def model(options):
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def data(options):
    iris = load_iris()
    x = torch.tensor(iris.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(iris.target, dtype=torch.long)
    test = torch.arange(len(y)) % 5 == 0
    return TensorDataset(x[~test], y[~test]), TensorDataset(x[test], y[test])


def l2_budget(model):
    return model[0].weight.norm() - 3.0  # <= 0  <=>  ||W_1||_2 <= 3


problem = Problem(
    name="iris-l2-budget",
    description="sklearn iris, MLP 4-16-3, with the constraint ||W_1||_2 <= 3",
    model=model,
    data=data,
    constraints={"l2_budget": UserConstraint(l2_budget, "<=")},
    pretrain_epochs=50,
    epochs=10,
    batch_size=16,
    lr=1e-2,
    dual_lr=0.1,
)
