"""mnist1d-mlp: MNIST-1D generated locally (4,000 train / 1,000 test, 40 features), MLP 40-256-256-10."""

from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse.data import load_mnist1d
from constrainedsparse.spec import Problem


def model(options):
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def data(options):
    """MNIST-1D's default dataset, generated locally (never downloaded)."""
    train, test = load_mnist1d()
    return TensorDataset(*train), TensorDataset(*test)


problem = Problem(
    name="mnist1d-mlp",
    description="MNIST-1D generated locally (4,000/1,000, 40 features), MLP 40-256-256-10, accuracy",
    model=model,
    data=data,
    pretrain_epochs=40,
    epochs=10,
    batch_size=100,
    lr=1e-3,
)
