"""iris-weighted: the iris MLP with per-sample weights, batches (x, y, w), compute_loss and predict."""

import torch
import torch.nn.functional as F
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
    w = torch.where(y == 2, options["virginica_weight"], 1.0)  # weigh one species more
    test = torch.arange(len(y)) % 5 == 0
    return TensorDataset(x[~test], y[~test], w[~test]), TensorDataset(x[test], y[test], w[test])


def compute_loss(net, batch):  # batch = [x, y, w], as the DataLoader collates the triples
    x, y, w = batch
    return (F.cross_entropy(net(x), y, reduction="none") * w).sum() / w.sum()


def predict(net, batch):  # what the metric (accuracy) compares
    x, y, _ = batch
    return net(x), y


def logit_bound(net, batch):  # takes the batch: gets the same [x, y, w] as compute_loss
    return net(batch[0]).abs().max() - 8.0


problem = Problem(
    name="iris-weighted",
    description="sklearn iris with per-sample weights: compute_loss and predict for (x, y, w) batches",
    model=model,
    data=data,
    compute_loss=compute_loss,
    predict=predict,
    constraints={"logit_bound": UserConstraint(logit_bound, "<=")},
    pretrain_epochs=50,
    epochs=5,
    batch_size=16,
    lr=1e-2,
    dual_lr=0.1,
    options={"virginica_weight": 2.0},
)
