"""Nothing a file holds runs code: checkpoints load with weights_only, CIFAR-10 batches through an allow-list."""

import pathlib
import pickle

import pytest
import torch
from cli_helpers import fails_with_one_line

from constrainedsparse import RunConfig, run
from constrainedsparse.data import load_cifar10


class Payload:
    """Loading this object creates a marker file (a harmless stand-in for any code)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _interrupted(out):
    run(RunConfig(problem="digits-mlp", formulation="magnitude", sparsity=0.5, epochs=2, pretrain_epochs=2, out=out,
                  stop_after_epochs=1, progress=False))  # fmt: skip


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_the_object_never_runs(tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted(out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "payload-ran"
    state["extra"] = Payload(marker)
    torch.save(state, out / "checkpoint.pt")
    line = fails_with_one_line(["run", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert line.startswith(f"error: --resume: {out / 'checkpoint.pt'} is not a constrainedsparse checkpoint")
    assert "refused unread" in line
    assert not marker.exists()
    assert not (out / "summary.json").exists()


def test_every_checkpoint_the_project_writes_loads_with_weights_only(tmp_path):
    out = tmp_path / "run"
    _interrupted(out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["format"] == "constrainedsparse-checkpoint" and state["config"]["formulation"] == "magnitude"


def test_a_cifar10_batch_holding_another_object_is_refused(tmp_path):
    import numpy as np

    folder = tmp_path / "cifar"
    folder.mkdir()
    marker = tmp_path / "payload-ran"
    good = {b"labels": [0, 1], b"data": np.zeros((2, 3072), dtype=np.uint8)}
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        entry = {**good, **({b"filenames": Payload(marker)} if name == "data_batch_3" else {})}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3' holds \S+, not only the dicts, lists"):
        load_cifar10(folder)
    assert not marker.exists()
