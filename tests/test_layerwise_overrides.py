"""Targets.overrides in layer-wise runs: per-layer levels set by hand, from a problem file on the CLI."""

import json
import textwrap

from cli_helpers import TWO_RESIDUAL_BLOCKS, fails_with_one_line

from constrainedsparse.cli import main

PROBLEM_FILE = (
    """
import torch
from torch import nn

from constrainedsparse import LayerwiseProblem, Targets

"""
    + TWO_RESIDUAL_BLOCKS
    + """


problem = LayerwiseProblem(
    name="tiny-overrides",
    description="two residual blocks, the second linear of every block at its own level",
    model=lambda options: Net().eval(),
    calibration=lambda options, seed: [{"x": torch.randn(16, 8)} for _ in range(2)],
    targets=Targets(overrides=OVERRIDES),
)
"""
)
COMMON = ["--wandb", "disabled", "--no-progress", "--formulation", "sparsegpt"]


def _problem(tmp_path, overrides):
    path = tmp_path / "tiny_overrides.py"
    path.write_text(textwrap.dedent(PROBLEM_FILE).replace("OVERRIDES", repr(overrides)))
    return str(path)


def test_overrides_set_the_levels_of_a_cli_run(tmp_path):
    path = _problem(tmp_path, {"blocks.1.2.weight": 0.75, "2.weight": 0.25})
    out = tmp_path / "run"
    assert main(["run", path, "--sparsity", "0.5", "--out", str(out), *COMMON]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer_sparsity"] == {"blocks.0.0.weight": 0.5, "blocks.0.2.weight": 0.25, "blocks.1.0.weight": 0.5,
                      "blocks.1.2.weight": 0.75}  # fmt: skip


def test_overrides_next_to_an_n_m_pattern_or_an_allocation_stop_before_anything_is_written(tmp_path, capsys):
    path = _problem(tmp_path, {"2.weight": 0.25})
    out = tmp_path / "run"
    line = fails_with_one_line(["run", path, "--pattern", "2:4", "--out", str(out), *COMMON], capsys)
    assert line.startswith("error: Targets.overrides set per-layer sparsity levels; the N:M pattern 2:4 fixes")
    line = fails_with_one_line(["run", path, "--set", "allocation=owl", "--out", str(out), *COMMON], capsys)
    assert line.startswith("error: --set allocation=owl sets every layer's level; Targets.overrides set some")
    typo = _problem(tmp_path, {"blocks.7.*": 0.25})
    line = fails_with_one_line(["run", typo, "--out", str(out), *COMMON], capsys)
    assert line.startswith("error: override 'blocks.7.*' matches no targeted parameter; they are 0.weight, 2.weight")
    assert not out.exists()
