"""Every registered pattern is reachable from the CLI, for training and layer-wise runs alike."""

import json

import pytest
from cli_helpers import fails_with_one_line
from safetensors.torch import load_file

from constrainedsparse.cli import main

FAST = ["--pretrain-epochs", "2", "--epochs", "1", "--wandb", "disabled", "--no-progress"]


@pytest.mark.parametrize(
    ("pattern", "check"),
    [
        ("row", lambda w: bool(((w != 0).sum(1) <= round(0.5 * w.shape[1])).all())),
        ("structured:columns", lambda w: int(((w != 0).sum(0) > 0).sum()) <= round(0.5 * w.shape[1])),
        ("structured:rows", lambda w: int(((w != 0).sum(1) > 0).sum()) <= round(0.5 * w.shape[0])),
        ("block:2x2", lambda w: int((w.reshape(w.shape[0] // 2, 2, -1, 2) != 0).sum((1, 3)).gt(0).sum())
         <= round(0.5 * w.numel() / 4)),
    ],
)  # fmt: skip
def test_training_cli_reaches_every_pattern(tmp_path, pattern, check):
    out = tmp_path / "run"
    args = ["run", "digits-mlp", "--formulation", "slr", "--pattern", pattern, "--sparsity", "0.5", "--out", str(out)]
    assert main([*args, *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pattern"] == pattern and summary["target_sparsity"] == 0.5
    weights = load_file(out / "model.safetensors")
    for name in summary["layer_sparsity"]:
        assert check(weights[name]), (pattern, name)


def test_layerwise_patterns_and_what_a_solver_supports(tmp_path, capsys, tiny_llama):
    base = ["run", "hf-causal-lm", "--set", f"model={tiny_llama}", "--set", "calibration_samples=4",
            "--set", "seq_len=16", "--set", "held_out_samples=2", "--wandb", "disabled", "--no-progress"]  # fmt: skip
    line = fails_with_one_line(
        [*base, "--formulation", "fw", "--pattern", "block:4x4", "--out", str(tmp_path / "a")], capsys
    )
    assert line == "error: fw supports the unstructured, row, N:M patterns, got block:4x4"
    line = fails_with_one_line(
        [*base, "--pattern", "row", "--set", "mask_scope=layer", "--out", str(tmp_path / "b")], capsys
    )
    assert line.startswith("error: give either --pattern or --set mask_scope")
    line = fails_with_one_line([*base, "--pattern", "2:4", "--sparsity", "0.5", "--out", str(tmp_path / "c")], capsys)
    assert "not allowed with argument --sparsity" in line
    out = tmp_path / "d"
    assert (
        main([*base, "--formulation", "wanda", "--pattern", "block:4x4", "--sparsity", "0.5", "--out", str(out)]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pattern"] == "block:4x4" and summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
