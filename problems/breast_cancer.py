"""A problem file of your own: scikit-learn's breast-cancer data, your own model, your own constraint.

Run it like a bundled problem::

    constrainedsparse run problems/breast_cancer.py --formulation slr --sparsity 0.9
    constrainedsparse run problems/breast_cancer.py --formulation l0 --sparsity 0.8 --set miss_budget=0.03

The custom constraint keeps the model from missing malignant tumours while it is pruned: on every
batch, the expected share of malignant samples classified benign, mean(1 - p(malignant)) over the
malignant samples, must stay at or below ``miss_budget``. It takes the batch, so it is measured on
the same data as the loss, and it gets its own Cooper multiplier (``multiplier/miss_rate`` in the
metrics). A problem file is Python code that runs, like any script.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse import Problem, Targets, UserConstraint
from constrainedsparse.data import stratified_split

MALIGNANT = 0  # scikit-learn's label of a malignant tumour


class TumourNet(nn.Module):
    """30 measurements -> 2 classes, with a hidden layer of ``width`` units."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(30, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def data(options):
    from sklearn.datasets import load_breast_cancer

    cancer = load_breast_cancer()
    x = (cancer.data - cancer.data.mean(0)) / cancer.data.std(0)  # standardised measurements
    (x_train, y_train), (x_test, y_test) = stratified_split(x, cancer.target, 0.25)
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def miss_rate(net, batch):
    """Expected share of malignant samples in the batch classified benign, minus the budget (<= 0 holds)."""
    x, y = batch
    malignant = y == MALIGNANT
    p_malignant = torch.softmax(net(x), dim=-1)[:, MALIGNANT]
    missed = ((1 - p_malignant) * malignant).sum() / malignant.sum().clamp_min(1)
    return missed - net.miss_budget


def model(options):
    net = TumourNet(options["width"])
    net.miss_budget = float(options["miss_budget"])  # read by the constraint
    return net


problem = Problem(
    name="breast-cancer",
    description="scikit-learn breast cancer (569 samples), MLP 30-64-2, constraint: malignant miss rate <= budget",
    model=model,
    data=data,
    targets=Targets(),  # every Linear weight
    constraints={"miss_rate": UserConstraint(miss_rate, "<=")},
    pretrain_epochs=30,
    epochs=20,
    batch_size=64,
    lr=3e-3,
    dual_lr=0.5,
    options={"width": 64, "miss_budget": 0.05},
)
