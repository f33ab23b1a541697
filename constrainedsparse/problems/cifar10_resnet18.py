"""cifar10-resnet18: real CIFAR-10 read from disk, torchvision's ResNet-18 adapted to 32x32 images.

The data are CIFAR-10's python batches (the ``cifar-10-batches-py`` folder), given with
``--set data_dir=PATH``; nothing is downloaded. Images are normalised per channel and not
augmented (kept simple: expect lower dense accuracy than the augmented recipes of the papers).
``--set train_subset=N`` / ``test_subset=N`` keep only the first N images, for quick runs.

The model is ``torchvision.models.resnet18(num_classes=10)`` from random initialisation with the
usual CIFAR stem: a 3x3 stride-1 first convolution and no max-pool. Every Conv2d/Linear weight is
pruned except the first convolution and the classifier (``conv1.weight`` and ``fc.weight``), which
stay dense as in the SLR papers. torchvision is an optional dependency:
``pip install "constrainedsparse[vision]"``.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse.data import check_cifar10, load_cifar10
from constrainedsparse.extras import require
from constrainedsparse.spec import Problem
from constrainedsparse.targets import Targets


def model(options: Mapping[str, Any]) -> nn.Module:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, 10 classes, no pretrained weights."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def check(options: Mapping[str, Any]) -> None:
    """Fails early (before any training) without torchvision or when the CIFAR-10 folder is not given or incomplete."""
    require("torchvision", "cifar10-resnet18 (its ResNet-18)", "vision")
    if not options["data_dir"]:
        raise ValueError(
            "cifar10-resnet18 needs --set data_dir=PATH (the cifar-10-batches-py folder with data_batch_1..5 "
            "and test_batch)"
        )
    check_cifar10(options["data_dir"])


def data(options: Mapping[str, Any]) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 from ``options["data_dir"]`` (see :func:`constrainedsparse.data.load_cifar10`)."""
    check(options)
    train, test = load_cifar10(
        options["data_dir"], train_subset=options["train_subset"], test_subset=options["test_subset"]
    )
    return TensorDataset(*train), TensorDataset(*test)


problem = Problem(
    name="cifar10-resnet18",
    description="CIFAR-10 from disk (--set data_dir=PATH), ResNet-18 for 32x32 (no augmentation), accuracy",
    model=model,
    data=data,
    targets=Targets(module_types=(nn.Conv2d, nn.Linear), exclude=("conv1.weight", "fc.weight")),
    pretrain_epochs=30,
    epochs=20,
    batch_size=128,
    lr=1e-3,
    options={"data_dir": "", "train_subset": 0, "test_subset": 0},
    option_help={
        "data_dir": "required: the `cifar-10-batches-py` folder (or the folder holding it); nothing is downloaded",
        "train_subset": "keep only the first N training images (0: all)",
        "test_subset": "keep only the first N test images (0: all)",
    },
    check=check,
)
