"""digits-mlp: scikit-learn's 1,797 real 8x8 handwritten digits, MLP 64-256-128-10."""

from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse.data import stratified_split
from constrainedsparse.spec import Problem


def model(options):
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def data(options):
    from sklearn.datasets import load_digits

    digits = load_digits()
    (x_train, y_train), (x_test, y_test) = stratified_split(digits.data / 16.0, digits.target, 0.2)
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


problem = Problem(
    name="digits-mlp",
    description="sklearn digits (1,797 real 8x8 images), MLP 64-256-128-10, accuracy",
    model=model,
    data=data,
    pretrain_epochs=30,
    epochs=20,
    batch_size=64,
    lr=1e-3,
)
