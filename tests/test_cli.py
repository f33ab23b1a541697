"""CLI listing commands and the bad-input contract: one stderr line, exit 2, nothing left on disk."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import fails_with_one_line

from constrainedsparse.cli import main

PROBLEMS = Path(__file__).parent / "problems"


BAD_INPUTS = [
    (["--sparsity", "1.0"], r"--sparsity must be in \[0, 1\), got 1.0"),
    (["--sparsity", "-0.1"], r"--sparsity must be in \[0, 1\), got -0.1"),
    (["--sparsity", "nan"], r"--sparsity must be in \[0, 1\), got nan"),
    (["--sparsity", "abc"], r"argument --sparsity: invalid float value: 'abc'"),
    (["--pattern", "2:3"], r"0.weight: N:M pattern 2:3 needs the input width divisible by 3, got width 64"),
    (["--pattern", "2-4"], r"pattern must look like N:M with integers 0 < N <= M \(e.g. 2:4\), got '2-4'"),
    (["--pattern", "4:2"], r"pattern must look like N:M with integers 0 < N <= M"),
    (["--sparsity", "0.5", "--pattern", "2:4"], r"not allowed with argument"),
    (["--formulation", "nope"], r"unknown formulation 'nope'; available: .*magnitude"),
    (["--set", "foo=1"], r"unknown --set key 'foo' for formulation 'slr' and problem 'digits-mlp'; allowed: M, "),
    (["--set", "lr=abc"], r"--set lr='abc' must be a float"),
    (["--set", "batch_size=1.5"], r"--set batch_size='1.5' must be an int"),
    (["--set", "lr=-1"], r"--set lr must be > 0, got -1.0"),
    (
        ["--formulation", "magnitude", "--set", "schedule=linear"],
        r"schedule must be 'cubic' or 'oneshot', got 'linear'",
    ),
    (["--set", "rho=0"], r"rho must be > 0, got 0.0"),
    (["--formulation", "admm", "--set", "rho=-1"], r"rho must be > 0, got -1.0"),
    (["--set", "s0=0"], r"s0 must be > 0, got 0.0"),
    (["--set", "M=1"], r"M must be > 1, got 1.0"),
    (["--set", "r=1"], r"r must be in \(0, 1\), got 1.0"),
    (["--set", "r=0"], r"r must be in \(0, 1\), got 0.0"),
    (["--set", "interval=0"], r"interval must be an integer >= 1, got 0"),
    (["--formulation", "admm", "--set", "interval=0"], r"interval must be an integer >= 1, got 0"),
    (["--set", "interval_unit=batch"], r"interval_unit must be one of epoch, step, per-epoch, got 'batch'"),
    (["--set", "rho_growth=0.5"], r"rho_growth must be >= 1, got 0.5"),
    (["--set", "device=tpu"], r"--set device must be cpu, cuda, cuda:N or auto, got 'tpu'"),
    (["--set", "novalue"], r"--set expects KEY=VALUE, got 'novalue'"),
    (["--epochs", "-1"], r"--epochs must be an integer >= 0, got -1"),
    (["--wandb", "maybe"], r"argument --wandb: invalid choice: 'maybe'"),
    (["--resume"], r"--resume needs .*checkpoint.pt, which does not exist"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_run_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    line = fails_with_one_line(
        ["run", "digits-mlp", "--out", str(out), "--wandb", "disabled", "--no-progress", *extra], capsys
    )
    assert __import__("re").search(message, line), line
    assert not out.exists()


def test_unknown_problem(tmp_path, capsys):
    line = fails_with_one_line(["run", "no-such-problem", "--out", str(tmp_path / "x")], capsys)
    assert (
        "unknown problem 'no-such-problem'; bundled problems: cifar10-resnet18, digits-mlp, hf-causal-lm, "
        "minilm-layerwise, mnist1d-cnn, mnist1d-mlp, mnist1d-mlp-macs, smollm2-wiki" in line
    )
    assert not (tmp_path / "x").exists()


def test_filter_selecting_nothing(tmp_path, capsys):
    line = fails_with_one_line(["run", str(PROBLEMS / "selects_nothing.py"), "--out", str(tmp_path / "x")], capsys)
    assert "include 'encoder.*' matches no parameter; the candidates are 0.weight, 2.weight" in line
    assert not (tmp_path / "x").exists()


def test_nan_loss_is_one_line_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    line = fails_with_one_line(
        ["run", str(PROBLEMS / "nan_after.py"), "--formulation", "magnitude", "--sparsity", "0.5",
         "--pretrain-epochs", "0", "--out", str(out),
         "--wandb", "disabled", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert "loss became nan at step 7 (prune epoch 2); training stopped, the last good checkpoint is" in line
    assert (out / "checkpoint.pt").is_file()


def test_nan_loss_before_any_checkpoint_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "nan"
    line = fails_with_one_line(
        ["run", str(PROBLEMS / "nan_after.py"), "--formulation", "magnitude", "--set", "nan_after=1",
         "--pretrain-epochs", "0", "--out", str(out),
         "--wandb", "disabled", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert "loss became nan at step 2 (prune epoch 1); training stopped, no checkpoint was written yet" in line
    assert not out.exists()


def test_listings(capsys):
    assert main(["formulations"]) == 0
    text = capsys.readouterr().out
    training, layerwise = text.split("layer-wise (pretrained models, calibration data):")
    training_names = [line.split()[0] for line in training.strip().splitlines()[1:]]
    layerwise_names = [line.split()[0] for line in layerwise.strip().splitlines()]
    assert training_names == ["admm", "l0", "l0-penalty", "magnitude", "slr"]
    assert layerwise_names == ["admm", "fw", "magnitude", "sparsegpt", "wanda"]
    assert main(["problems"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == [
        "cifar10-resnet18",
        "digits-mlp",
        "hf-causal-lm",
        "minilm-layerwise",
        "mnist1d-cnn",
        "mnist1d-mlp",
        "mnist1d-mlp-macs",
        "smollm2-wiki",
    ]


def test_python_dash_m_bad_input_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "constrainedsparse", "run", "--sparsity", "2", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --sparsity must be in [0, 1), got 2.0"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_flags_without_subcommand_mean_run(tmp_path, capsys):
    line = fails_with_one_line(["--sparsity", "1.5", "--out", str(tmp_path / "x")], capsys)
    assert line == "error: --sparsity must be in [0, 1), got 1.5"


def test_problem_file_that_fails_to_import_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_module_here\n")
    line = fails_with_one_line(["run", str(bad), "--out", str(tmp_path / "x")], capsys)
    assert line.endswith(
        "failed to load at line 1: ModuleNotFoundError: No module named 'no_such_module_here' (--debug shows the "
        "traceback)"
    )
    assert not (tmp_path / "x").exists()


def test_debug_holds_for_its_own_call_only(tmp_path, capsys, monkeypatch):
    """--debug set its environment variable for the rest of the process: later calls printed tracebacks."""
    from constrainedsparse.errors import DEBUG_ENV

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_module_here\n")
    argv = ["run", str(bad), "--out", str(tmp_path / "x")]
    with pytest.raises(Exception, match="no_such_module_here"):
        main([*argv, "--debug"])
    assert DEBUG_ENV not in os.environ
    assert "failed to load at line 1: ModuleNotFoundError" in fails_with_one_line(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    line = fails_with_one_line(["run", "--set", "device=cuda", "--out", str(out), "--no-progress"], capsys)
    assert "--set device=cuda but CUDA is not available here; use cpu or auto" in line
    assert not out.exists()


def test_nan_dense_pretraining_is_one_line_and_caches_nothing(tmp_path, capsys):
    from constrainedsparse.engine import cache_dir

    out = tmp_path / "run"
    before = set((cache_dir() / "dense").glob("*")) if (cache_dir() / "dense").exists() else set()
    line = fails_with_one_line(
        ["run", "--formulation", "magnitude", "--set", "lr=1e30", "--pretrain-epochs", "2", "--out", str(out),
         "--wandb", "disabled", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert "dense pre-training loss became nan in epoch 1; nothing was cached" in line
    after = set((cache_dir() / "dense").glob("*")) if (cache_dir() / "dense").exists() else set()
    assert after == before and not out.exists()


def test_problem_file_is_executed_once_per_run(tmp_path):
    # The default formulation, validation and the run all use the one loaded problem.
    source = (PROBLEMS / "nan_after.py").read_text()
    problem_file = tmp_path / "counted.py"
    counter = "\nimport pathlib\npathlib.Path(__file__).with_suffix('.loads').open('a').write('x')\n"
    problem_file.write_text(source + counter)
    code = main(
        ["run", str(problem_file), "--set", "nan_after=1000", "--epochs", "1", "--pretrain-epochs", "0",
         "--out", str(tmp_path / "out"), "--wandb", "disabled", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["formulation"] == "slr"
    assert (tmp_path / "counted.loads").read_text() == "x"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--formulation", "fw"], "error: 'fw' is a layer-wise solver, not a formulation; formulations: "),
        (["minilm-layerwise", "--formulation", "slr"], "error: 'slr' is a formulation, not a layer-wise solver; "),
        (["--formulation", "nosuch"], "error: unknown formulation 'nosuch'; available: "),
    ],
)
def test_set_help_with_a_formulation_of_the_wrong_kind_is_one_line(args, message, capsys):
    assert fails_with_one_line(["run", *args, "--set", "help"], capsys).startswith(message)


def test_resume_of_a_layerwise_problem_without_formulation_looks_in_fws_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = fails_with_one_line(["run", "minilm-layerwise", "--resume"], capsys)
    assert line == "error: --resume needs runs/minilm-layerwise-fw/checkpoint.pt, which does not exist"


def test_resume_messages_name_a_pattern_run_and_a_finished_one_first(tmp_path, capsys):
    from constrainedsparse import RunConfig, run

    out = tmp_path / "nm"
    quick = {"problem": "digits-mlp", "formulation": "magnitude", "pattern": "2:4", "pretrain_epochs": 1}
    run(RunConfig(**quick, epochs=2, out=out, progress=False, stop_after_epochs=1, wandb="disabled"))
    line = fails_with_one_line(["run", "digits-mlp", "--out", str(out), "--resume", "--sparsity", "0.5"], capsys)
    assert "sparsity (0.5, stored none: the run used --pattern 2:4)" in line
    assert main(["run", "--out", str(out), "--resume", "--set", "help"]) == 0  # the stored run's keys
    assert capsys.readouterr().out.startswith("magnitude (formulation)")
    main(["run", "--out", str(out), "--resume", "--no-progress"])
    capsys.readouterr()
    line = fails_with_one_line(["run", "digits-mlp", "--out", str(out), "--resume", "--sparsity", "0.5"], capsys)
    assert line.startswith(f"error: --resume: the run in {out} has finished")


def test_an_interrupt_after_the_run_finished_says_so_instead_of_offering_a_resume(tmp_path, monkeypatch):
    from constrainedsparse import cli

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "summary.json").write_text("{}")  # an earlier run's (--overwrite interrupted before it got there)
    monkeypatch.setitem(cli._STARTED, "main", time.time() + 60)
    assert cli._resume_hint(tmp_path) == f"; continue from the last checkpoint with --resume --out {tmp_path}"
    monkeypatch.setitem(cli._STARTED, "main", time.time() - 60)  # written by this run: the signal came at its end
    assert cli._resume_hint(tmp_path) == f" after the run had finished: its results are in {tmp_path} (summary.json)"
    spaced = tmp_path / "my runs"
    spaced.mkdir()
    (spaced / "checkpoint.pt").write_bytes(b"")  # a command to paste: the folder quoted for the shell
    assert cli._resume_hint(spaced) == f"; continue from the last checkpoint with --resume --out '{spaced}'"


def test_a_path_the_file_system_refuses_is_one_line(tmp_path, capsys):
    long = tmp_path / ("p" * 260)  # a name longer than the file system allows
    line = fails_with_one_line(["plot", str(long)], capsys)
    assert line == f"error: {long}: File name too long (the file system refused it)"


def test_set_help_says_what_a_problem_option_means_and_allows(capsys):
    assert main(["run", "smollm2-wiki", "--formulation", "wanda", "--set", "help"]) == 0
    out = capsys.readouterr().out
    options = out[out.index("problem 'smollm2-wiki' options (--set):") :]
    line = next(line for line in options.splitlines() if line.lstrip().startswith("seq_len"))
    assert "an integer >= 2: tokens per calibration and evaluation window" in line
    assert "problem option" not in options  # every bundled option says what it is


def test_option_help_must_name_options():
    from constrainedsparse.spec import LayerwiseProblem, Problem

    with pytest.raises(ValueError, match=r"^option_help names 'widht', which is not in options$"):
        Problem("p", "d", model=lambda o: None, data=lambda o: None, options={"width": 8}, option_help={"widht": "x"})
    with pytest.raises(ValueError, match=r"^option_help must be a dict \{option: text\}, got"):
        LayerwiseProblem("p", "d", model=lambda o: None, calibration=lambda o, s: [], option_help=["x"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"option_help": None}, r"^option_help must be a dict \{option: text\}, got a NoneType$"),
        (
            {"option_help": {"width": 3}},
            r"^option_help\['width'\] must be a str \(what --set help says of it\), got a int",
        ),
        (
            {"options": [("width", 8)], "option_help": {"width": "w"}},
            r"^options must be a dict \{key: default\}, got a list",
        ),
    ],
)
def test_option_help_errors_name_the_field_and_come_after_the_options(kwargs, message):
    from constrainedsparse.spec import Problem

    with pytest.raises(ValueError, match=message):
        Problem("p", "d", model=lambda o: None, data=lambda o: None, **{"options": {"width": 8}, **kwargs})
