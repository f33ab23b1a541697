"""The convolutional bundled problems: cifar10-resnet18 (on a tiny CIFAR-10 in the real format) and mnist1d-cnn."""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import fails_with_one_line

from constrainedsparse import RunConfig, run
from constrainedsparse.cli import main
from constrainedsparse.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from constrainedsparse.spec import load_problem
from constrainedsparse.targets import SparsityConfig

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
RAW_PIXEL = (17, 200, 99)
"""Hand-set raw values of pixel (0, 0) of the first image of every batch, per channel."""


def _write_cifar10(folder: Path, per_file: int = 8) -> Path:
    """A tiny CIFAR-10 in the real on-disk format: pickled dicts with b"data" (uint8, n x 3072) and b"labels"."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, name in enumerate(CIFAR_FILES):
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        for channel, value in enumerate(RAW_PIXEL):
            data[0, channel * 1024] = value  # channel-major: R plane, G plane, B plane of 32x32
        labels = [(index + i) % 10 for i in range(per_file)]
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_file}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_load_cifar10_round_trip(tmp_path):
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py")
    (x_train, y_train), (x_test, y_test) = load_cifar10(folder)
    assert x_train.shape == (40, 3, 32, 32) and x_test.shape == (8, 3, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_train[:8].tolist() == [i % 10 for i in range(8)]
    assert y_train[8:16].tolist() == [(1 + i) % 10 for i in range(8)]
    assert y_test.tolist() == [(5 + i) % 10 for i in range(8)]
    for channel, raw in enumerate(RAW_PIXEL):
        expected = (raw / 255 - CIFAR10_MEAN[channel]) / CIFAR10_STD[channel]
        assert x_train[0, channel, 0, 0].item() == pytest.approx(expected, abs=1e-5)
        assert x_test[0, channel, 0, 0].item() == pytest.approx(expected, abs=1e-5)
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][3].reshape(3, 32, 32)
    restored = x_train[3] * torch.tensor(CIFAR10_STD).view(3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    assert torch.allclose(restored * 255, torch.from_numpy(raw).float(), atol=1e-3)

    (parent_train, _), (parent_test, _) = load_cifar10(tmp_path, train_subset=10, test_subset=3)
    assert torch.equal(parent_train, x_train[:10]) and torch.equal(parent_test, x_test[:3])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "data_batch_3").unlink(), "data_batch_3' is missing"),
        (lambda d: (d / "test_batch").write_bytes(b"not a pickle"), "test_batch' is corrupt"),
        (lambda d: (d / "data_batch_2").write_bytes(pickle.dumps([1, 2])), "data_batch_2' is corrupt"),
    ],
    ids=["missing", "garbage", "not-a-dict"],
)
def test_load_cifar10_names_the_bad_file(tmp_path, damage, message):
    folder = _write_cifar10(tmp_path / "cifar")
    damage(folder)
    with pytest.raises(ValueError, match=message):
        load_cifar10(folder)


def test_cifar10_resnet18_cli_end_to_end(tmp_path):
    # Only magnitude here: an slr run on ResNet-18 (11M weights) adds ~5 s of coordination, checkpoints and plots.
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "run"
    code = main(
        ["run", "cifar10-resnet18", "--set", f"data_dir={folder}", "--set", "train_subset=16",
         "--pretrain-epochs", "1", "--epochs", "1", "--sparsity", "0.9", "--out", str(out),
         "--wandb", "disabled", "--no-progress", "--formulation", "magnitude"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem"] == "cifar10-resnet18" and summary["formulation"] == "magnitude"
    assert summary["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    layers = summary["layer_sparsity"]
    assert "conv1.weight" not in layers and "fc.weight" not in layers
    assert "layer1.0.conv1.weight" in layers and "layer2.0.downsample.0.weight" in layers
    assert len(layers) == 19


def test_cifar10_resnet18_without_data_dir_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    line = fails_with_one_line(
        ["run", "cifar10-resnet18", "--out", str(out), "--wandb", "disabled", "--no-progress"], capsys
    )
    assert line == (
        "error: cifar10-resnet18 needs --set data_dir=PATH (the cifar-10-batches-py folder with data_batch_1..5 "
        "and test_batch)"
    )
    assert not out.exists()


def test_cifar10_resnet18_without_torchvision_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    """torchvision is the optional ``vision`` extra: without it the run stops before any work."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what find_spec reports for a missing package
    line = _cifar_run_error(_write_cifar10(tmp_path / "cifar-10-batches-py"), tmp_path / "run", capsys)
    assert line == (
        "error: cifar10-resnet18 (its ResNet-18) needs torchvision, which is not installed: "
        'pip install "constrainedsparse[vision]"'
    )


def test_cifar10_resnet18_folder_without_files_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _cifar_run_error(empty, tmp_path / "run", capsys)
    assert "CIFAR-10 batch file" in line and str(empty / "data_batch_1") in line and "is missing" in line


def _cifar_run_error(data_dir: Path, out: Path, capsys) -> str:
    """The one error line of ``run cifar10-resnet18`` on ``data_dir``; nothing may be written to ``out``."""
    line = fails_with_one_line(
        ["run", "cifar10-resnet18", "--set", f"data_dir={data_dir}", "--out", str(out), "--wandb", "disabled",
         "--no-progress"],
        capsys,
    )  # fmt: skip
    assert not out.exists()
    return line


def test_mnist1d_cnn_model_and_targets():
    problem = load_problem("mnist1d-cnn")
    model = problem.model(problem.options)
    assert model(torch.randn(5, 40)).shape == (5, 10)
    names = [t.name for t in problem.targets.resolve(model, SparsityConfig(sparsity=0.5))]
    assert names == ["conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight"]


def test_mnist1d_cnn_magnitude_run(tmp_path):
    config = RunConfig(
        problem="mnist1d-cnn",
        formulation="magnitude",
        sparsity=0.5,
        epochs=1,
        pretrain_epochs=1,
        out=tmp_path / "run",
        progress=False,
        wandb="disabled",
    )
    summary = run(config)
    assert summary["problem"] == "mnist1d-cnn"
    assert summary["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "conv1.weight" not in summary["layer_sparsity"]
    assert summary["dense_accuracy"] > 0.1


def test_load_cifar10_rejects_bad_arguments(tmp_path):
    folder = _write_cifar10(tmp_path / "cifar")
    with pytest.raises(ValueError, match=r"train_subset must be an integer >= 0 \(0 = all\), got -1"):
        load_cifar10(folder, train_subset=-1)
    with pytest.raises(ValueError, match="is not a directory"):
        load_cifar10(tmp_path / "nowhere")


def test_cifar10_resnet18_folder_is_checked_by_prepare_before_any_work(tmp_path):
    from constrainedsparse.engine import RunConfig, prepare

    with pytest.raises(ValueError, match=r"cifar10-resnet18 needs --set data_dir=PATH"):
        prepare(RunConfig(problem="cifar10-resnet18", out=tmp_path / "run"))
    with pytest.raises(ValueError, match=r"CIFAR-10 batch file .*data_batch_1' is missing"):
        prepare(RunConfig(problem="cifar10-resnet18", out=tmp_path / "run", settings={"data_dir": str(tmp_path)}))
    assert not (tmp_path / "run").exists()
