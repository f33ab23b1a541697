"""Targets.overrides in layer-wise runs: per-layer levels set by hand, from a problem file on the CLI."""

import json
import re
import textwrap

import pytest
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


LAYERWISE_FILE = (
    """
import torch
from torch import nn

from constrainedsparse import LayerwiseProblem, Targets

"""
    + TWO_RESIDUAL_BLOCKS
    + """


def held_out(model, options):
    return model(torch.ones(4, 8))


FIELDS = dict(model=lambda options: Net().eval(), calibration=lambda options, seed: [{"x": torch.randn(16, 8)}])
problem = LayerwiseProblem(name="mine", description="two residual blocks", **(FIELDS | dict(CHANGE)))
"""
)
LAYERWISE_MISTAKES = [
    ("model returns None", "model=lambda o: None", r"problem 'mine': model\(options\) must return a torch.nn.Module"),
    ("calibration returns text", "calibration=lambda o, s: 'some text'",
     r"calibration\(options, seed\): batches must be a non-empty list of calibration batches .* got str"),
    ("calibration returns a tensor", "calibration=lambda o, s: torch.randn(4, 8)",
     r"calibration\(options, seed\): batches must be a non-empty list .* got Tensor"),
    ("calibration batches of text", "calibration=lambda o, s: [{'text': 'hello'}]",
     r"calibration batch 0 holds no tensor \(got a dict\): tokenize text first"),
    ("blocks returns None", "blocks=lambda m: None", r"problem 'mine': blocks must be a list .* got NoneType"),
    ("blocks returns the model", "blocks=lambda m: m", r"blocks must be a list of the model's blocks .* model itself"),
    ("blocks returns nothing", "blocks=lambda m: []", r"problem 'mine': blocks is empty: there is nothing to prune"),
    ("a block twice", "blocks=lambda m: [m.blocks[0], m.blocks[0]]", r"block 1 \(blocks\.0\) is listed twice"),
    ("blocks in reverse", "blocks=lambda m: list(m.blocks)[::-1]",
     r"blocks must be in execution order: blocks\.0 runs before blocks\.1"),
    ("a score that is a number", "held_out=held_out, score=lambda d, p: 1.0",
     r"score\(dense, pruned\) must return a dict \{name: number\}, got float"),
    ("a score of text", "held_out=held_out, score=lambda d, p: {'ppl': 'abc'}",
     r"score\(dense, pruned\) returned 'ppl': 'abc', not a number"),
    ("a score of a vector", "held_out=held_out, score=lambda d, p: {'gap': (d - p).norm(dim=1)}",
     r"score\(dense, pruned\) returned 'gap': a Tensor of shape \(4,\), not a number$"),
    ("held_out returns nothing", "held_out=lambda m, o: None, score=lambda d, p: {'gap': 0.0}",
     r"problem 'mine': held_out\(model, options\) returned None: it must return the outputs score\(dense, pruned\) "
     r"compares$"),
    ("a score without held_out", "score=lambda d, p: {'gap': 0.0}",
     r"LayerwiseProblem\.score compares the outputs held_out\(model, options\) computes: give held_out too$"),
    ("a model that is text", "model='model'", r"LayerwiseProblem\.model must be a function, got str$"),
    ("blocks that are a list", "blocks=[]", r"LayerwiseProblem\.blocks must be a function or None, got list$"),
    ("targets as a list", "targets=[nn.Linear]", r"LayerwiseProblem\.targets must be a Targets\(\.\.\.\), got a list$"),
    ("options as a list", "options=[('n', 4)]", r"options must be a dict \{key: default\}, got a list$"),
    ("an option without a type", "options={'n': None}", r"option 'n' has default None: give a bool, int, float or str"),
    ("a score named like the summary", "held_out=held_out, score=lambda d, p: {'achieved_sparsity': 0.99}",
     r"score\(dense, pruned\) returned 'achieved_sparsity', a key of the run's own summary: rename it"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "change", "message"), LAYERWISE_MISTAKES, ids=[m[0] for m in LAYERWISE_MISTAKES])
def test_a_mistake_in_a_layerwise_problem_file_is_one_line_before_pruning(name, change, message, tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(LAYERWISE_FILE.replace("dict(CHANGE)", f"dict({change})"))
    out = tmp_path / "run"
    line = fails_with_one_line(["run", str(path), "--out", str(out), *COMMON], capsys)
    assert re.search(message, line), line
    assert not out.exists()


def test_a_layerwise_score_of_tensors_is_read_as_numbers_and_printed(tmp_path, capsys):
    path = tmp_path / "mine.py"
    change = "held_out=held_out, score=lambda d, p: {'output_gap': (d - p).abs().mean()}"
    path.write_text(LAYERWISE_FILE.replace("dict(CHANGE)", f"dict({change})"))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), *COMMON]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert isinstance(summary["output_gap"], float) and summary["score_keys"] == ["output_gap"]
    assert re.search(r"\n  output gap +\d+\.\d{4}\n", capsys.readouterr().out)


def test_a_layerwise_run_leaves_transformers_progress_bars_as_it_found_them(tmp_path):
    """They are off while the run loads and saves (its own progress is the block bar), on again after it: the
    rest of a notebook's or a test session's downloads and loads kept no bars."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        path = _problem(tmp_path, {})
        assert main(["run", path, "--sparsity", "0.5", "--out", str(tmp_path / "run"), *COMMON]) == 0
        assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    finally:
        if not was_on:
            hf_logging.disable_progress_bar()


def test_a_compiled_model_is_pruned_under_its_own_names(tmp_path):
    """torch.compile's wrapper used to leak into the layer names (``_orig_mod.``): overrides written with the model's
    names matched nothing, and the report's names differed from the saved weights'."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    from constrainedsparse import Targets, prune_layerwise

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b(torch.relu(self.a(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = torch.compile(Net(), backend="eager")
    report = prune_layerwise(
        model, [torch.randn(4, 6, 8) for _ in range(2)], "wanda", sparsity=0.5,
        targets=Targets(overrides={"blocks.0.*": 0.25}), out=tmp_path / "run",
    )  # fmt: skip
    assert list(report.layer_error) == [f"blocks.{i}.{x}.weight" for i in (0, 1) for x in "ab"]
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert float((saved["blocks.0.a.weight"] == 0).float().mean()) == 0.25
    assert float((saved["blocks.1.a.weight"] == 0).float().mean()) == 0.5
