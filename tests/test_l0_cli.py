"""The l0 formulations on the CLI's bad-input path: one stderr line, exit code 2, nothing on disk."""

import json
import re

import pytest
from cli_helpers import fails_with_one_line

from constrainedsparse.cli import main

BAD_L0_INPUTS = [
    (["--formulation", "l0", "--set", "scope=net"], r"scope must be one of model, layer, got 'net'"),
    (
        ["--formulation", "l0", "--set", "grouping=rows"],
        r"grouping must be one of unstructured, structured, got 'rows'",
    ),
    (["--formulation", "l0", "--set", "droprate_init=0"], r"droprate_init must be in \(0, 1\), got 0.0"),
    (["--formulation", "l0", "--set", "droprate_init=1.5"], r"droprate_init must be in \(0, 1\), got 1.5"),
    (["--formulation", "l0", "--set", "gate_lr=0"], r"gate_lr must be > 0, got 0.0"),
    (["--formulation", "l0", "--set", "gate_momentum=1"], r"gate_momentum must be in \[0, 1\), got 1.0"),
    (["--formulation", "l0", "--set", "dual_lr=0"], r"--set dual_lr must be > 0, got 0.0"),
    (["--formulation", "l0", "--set", "density_dual_lr=0"], r"density_dual_lr must be > 0, got 0.0"),
    (
        ["--formulation", "l0", "--set", "density_constraint=exact"],
        r"density_constraint must be one of inequality, equality, two-sided, got 'exact'",
    ),
    (
        ["--formulation", "l0", "--set", "density_dual_kp=-1"],
        r"density_dual_kp must be a finite number >= 0, got -1.0",
    ),
    (
        ["--formulation", "l0-penalty", "--set", "density_constraint=equality"],
        r"unknown --set key 'density_constraint' for formulation 'l0-penalty'",
    ),
    (["--formulation", "l0", "--set", "dual_lr=-1"], r"--set dual_lr must be > 0, got -1.0"),
    (["--formulation", "l0", "--set", "dual_restarts=maybe"], r"--set dual_restarts='maybe' must be a bool"),
    (["--formulation", "l0", "--sparsity", "1.0"], r"--sparsity must be in \[0, 1\), got 1.0"),
    (["--formulation", "l0", "--set", "lmbda=1"], r"unknown --set key 'lmbda' for formulation 'l0'"),
    (["--formulation", "l0-penalty", "--set", "lmbda=-1"], r"lmbda must be a finite number >= 0, got -1.0"),
    (
        ["--formulation", "l0-penalty", "--set", "scope=layer"],
        r"unknown --set key 'scope' for formulation 'l0-penalty'",
    ),
    (["--formulation", "l0-penalty", "--set", "gate_lr=-0.1"], r"gate_lr must be > 0, got -0.1"),
    (
        ["--formulation", "l0", "--set", "density_of=outputs"],
        r"density_of must be one of weights, purged, got 'outputs'",
    ),
    (
        ["--formulation", "l0", "--set", "density_of=purged"],
        r"density_of=purged needs grouping=structured \(unstructured gates leave nothing to purge\), "
        r"got grouping='unstructured'",
    ),
    (
        ["--formulation", "l0", "--set", "density_of=purged", "--set", "grouping=structured", "--set", "scope=layer"],
        r"density_of=purged needs scope=model \(a layer's purged size depends on the next layer's kept inputs\), "
        r"got scope='layer'",
    ),
    (
        ["--formulation", "l0-penalty", "--set", "density_of=purged"],
        r"unknown --set key 'density_of' for formulation 'l0-penalty'",
    ),
]


@pytest.mark.parametrize(("extra", "message"), BAD_L0_INPUTS, ids=[" ".join(a) for a, _ in BAD_L0_INPUTS])
def test_bad_l0_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    line = fails_with_one_line(
        ["run", "digits-mlp", "--out", str(out), "--wandb", "disabled", "--no-progress", *extra], capsys
    )
    assert re.search(message, line), line
    assert not out.exists()


def test_l0_formulations_are_listed(capsys):
    assert main(["formulations"]) == 0
    listed = capsys.readouterr().out
    assert "l0" in listed and "l0-penalty" in listed


def test_density_of_purged_on_a_model_it_cannot_size_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    settings = ["--set", "grouping=structured", "--set", "density_of=purged"]
    args = ["run", "mnist1d-cnn", "--formulation", "l0", *settings, "--pretrain-epochs", "0", "--epochs", "1"]
    args += ["--out", str(out), "--wandb", "disabled", "--no-progress"]
    line = fails_with_one_line(args, capsys)
    assert line == (
        "error: density_of=purged: layer 1 is a Conv1d; the purged size is modelled for a chain of Linear layers"
    )
    assert not out.exists()


def test_a_structured_run_prints_its_purge_and_a_skipped_one_why(tmp_path, capsys):
    from constrainedsparse.summary_text import summary_rows

    out = tmp_path / "run"
    args = ["run", "digits-mlp", "--formulation", "l0", "--set", "grouping=structured", "--sparsity", "0.8"]
    args += ["--epochs", "1", "--pretrain-epochs", "1", "--out", str(out), "--wandb", "disabled", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("purged "))
    assert line.split(None, 1)[1] == (
        f"{summary['dense_params']:,} -> {summary['purged_params']:,} parameters, "
        f"{summary['dense_macs']:,} -> {summary['purged_macs']:,} MACs per sample"
    )
    skipped = {k: v for k, v in summary.items() if "purged" not in k} | {
        "purge_skipped": "purge: layer 4 is a Res; ..."
    }
    assert ("purge skipped", "purge: layer 4 is a Res; ...") in summary_rows(skipped)
