"""A regression problem file: scikit-learn's diabetes data, mean squared error, reported as R².

    constrainedsparse run problems/diabetes.py --formulation slr --sparsity 0.8

The metric is declared with its name and direction, and computed once over the whole test set
(a mean of per-batch R² values would not be the test set's R²); the summary then says
``dense_r2``, ``hardprune_r2`` (and ``retrain_r2``), the printed table ``dense r2``.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse import Problem
from constrainedsparse.metrics import R2


def model(options):
    return nn.Sequential(nn.Linear(10, options["width"]), nn.ReLU(), nn.Linear(options["width"], 1))


def data(options):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()  # standardised target: the loss is on a unit scale
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    x, y = torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y, dtype=torch.float32)[order]
    return TensorDataset(x[:342], y[:342]), TensorDataset(x[342:], y[342:])


def loss(output, y):
    return nn.functional.mse_loss(output.squeeze(-1), y)


problem = Problem(
    name="diabetes",
    description="scikit-learn diabetes (442 patients, 10 features), MLP 10-64-1, MSE, R²",
    model=model,
    data=data,
    loss=loss,
    metric=R2,
    pretrain_epochs=60,
    epochs=20,
    batch_size=32,
    lr=3e-3,
    options={"width": 64},
)
