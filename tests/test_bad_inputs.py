"""The table of bad inputs every change keeps: one ``error:`` line, exit 2, nothing left behind.

Each CLI row runs ``constrainedsparse ARGS`` in process and asserts exit code 2, a single stderr line
starting with ``error:`` that matches the row's pattern, no traceback, and the run directory exactly
as it was before (absent if it was absent). Each Python row asserts the precise ``ValueError``. A new
option joins by one row.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import fails_with_one_line
from torch import nn

from constrainedsparse import (
    RunConfig,
    SLRConfig,
    SparsityConfig,
    SparsityProblem,
    Targets,
    UserConstraint,
    achieved_sparsity,
    describe,
    hard_prune,
    layer_sparsity,
    load_problem,
    make,
    plot_metrics,
    prune_layerwise,
    read_metrics,
    recalibrate_batchnorm,
    run,
)
from constrainedsparse.metrics import Metric

PROBLEMS = Path(__file__).parent / "problems"
RUN = ["run", "digits-mlp", "--out", "{out}", "--wandb", "disabled", "--no-progress"]
FAST = ["--pretrain-epochs", "0", "--epochs", "1"]
LLAMA = ["run", "hf-causal-lm", "--out", "{out}", "--wandb", "disabled", "--no-progress", "--set", "model={llama}",
         "--set", "calibration_samples=2", "--set", "seq_len=8", "--set", "held_out_samples=1"]  # fmt: skip
BASE = "import dataclasses\nfrom constrainedsparse.spec import load_problem\nbase = load_problem('digits-mlp')\n"


@dataclasses.dataclass
class Row:
    """One bad input: the command line, the pattern its one line must match, and what to set up first."""

    name: str
    argv: list[str]
    pattern: str
    setup: Callable[[dict[str, Any]], None] | None = None


def _problem(body: str) -> Callable[[dict[str, Any]], None]:
    def write(ctx: dict[str, Any]) -> None:
        (ctx["tmp"] / "bad.py").write_text(BASE + body)

    return write


def _interrupted(ctx: dict[str, Any]) -> None:
    run(RunConfig(problem="digits-mlp", formulation="magnitude", sparsity=0.5, epochs=2, pretrain_epochs=2,
                  out=ctx["out"], stop_after_epochs=1, progress=False))  # fmt: skip


def _checkpoint(content: bytes | Callable[[Path], None]) -> Callable[[dict[str, Any]], None]:
    def write(ctx: dict[str, Any]) -> None:
        ctx["out"].mkdir()
        target = ctx["out"] / "checkpoint.pt"
        if callable(content):
            content(target)
        else:
            target.write_bytes(content)

    return write


def _truncated(ctx: dict[str, Any]) -> None:
    _interrupted(ctx)
    path = ctx["out"] / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])


def _finished(ctx: dict[str, Any]) -> None:
    run(RunConfig(problem="digits-mlp", formulation="magnitude", sparsity=0.5, epochs=1, pretrain_epochs=2,
                  out=ctx["out"], progress=False))  # fmt: skip


def _changed_model(ctx: dict[str, Any]) -> None:
    """A run of a problem file stopped after an epoch, then the file's hidden layer widened."""
    body = "from torch import nn\nproblem = dataclasses.replace(base, name='bad', model=lambda o: nn.Sequential("
    (ctx["tmp"] / "bad.py").write_text(BASE + body + "nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)))\n")
    run(RunConfig(problem=str(ctx["tmp"] / "bad.py"), formulation="magnitude", sparsity=0.5, epochs=2,
                  pretrain_epochs=0, out=ctx["out"], stop_after_epochs=1, progress=False))  # fmt: skip
    (ctx["tmp"] / "bad.py").write_text(BASE + body + "nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))\n")


def _file(name: str, text: str = "x") -> Callable[[dict[str, Any]], None]:
    def write(ctx: dict[str, Any]) -> None:
        (ctx["tmp"] / name).write_text(text)

    return write


def _readonly(ctx: dict[str, Any]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder; the read-only mount row covers root")
    folder = ctx["tmp"] / "ro"
    folder.mkdir()
    folder.chmod(0o500)


ROWS: list[Row] = [
    # --- levels and patterns ---------------------------------------------------------------------
    Row("sparsity 1", [*RUN, "--sparsity", "1.0"], r"--sparsity must be in \[0, 1\), got 1.0$"),
    Row("sparsity negative", [*RUN, "--sparsity", "-0.1"], r"--sparsity must be in \[0, 1\), got -0.1$"),
    Row("sparsity nan", [*RUN, "--sparsity", "nan"], r"--sparsity must be in \[0, 1\), got nan$"),
    Row("sparsity inf", [*RUN, "--sparsity", "inf"], r"--sparsity must be in \[0, 1\), got inf$"),
    Row("sparsity text", [*RUN, "--sparsity", "abc"], r"argument --sparsity: invalid float value: 'abc'"),
    Row("sparsity keeps nothing", [*RUN, "--sparsity", "0.99999999"], r"--sparsity 0.99999999 keeps no weight of"),
    Row("nm width", [*RUN, "--pattern", "2:3"], r"0.weight: N:M pattern 2:3 needs the input width divisible by 3"),
    Row("nm dash", [*RUN, "--pattern", "2-4"], r"pattern must look like N:M with integers 0 < N <= M"),
    Row("nm reversed", [*RUN, "--pattern", "4:2"], r"pattern must look like N:M with integers 0 < N <= M"),
    Row("nm zero", [*RUN, "--pattern", "0:4"], r"pattern must look like N:M"),
    Row("nm with sparsity", [*RUN, "--pattern", "2:4", "--sparsity", "0.5"], r"not allowed with argument --sparsity"),
    Row("unknown pattern", [*RUN, "--pattern", "diag"], r"unknown pattern 'diag'; patterns: unstructured, row, 2:4"),
    Row("structured side", [*RUN, "--pattern", "structured:diag"], r"structured takes :rows or :columns"),
    Row("block size", [*RUN, "--pattern", "block:0x4"], r"block takes RxC with positive integers"),
    Row("block shape", [*RUN, "--pattern", "block:3x3"], r"0.weight: block pattern 3x3 needs dims 0 and 1 divisible"),
    # --- formulations and --set ------------------------------------------------------------------
    Row("unknown formulation", [*RUN, "--formulation", "nope"], r"unknown formulation 'nope'; available: admm, l0"),
    Row(
        "unknown formulation, --set help",  # the training ones only (it listed fw, sparsegpt, wanda too)
        [*RUN, "--formulation", "nope", "--set", "help"],
        r"unknown formulation 'nope'; available: admm, l0, l0-penalty, magnitude, slr$",
    ),
    Row("layer-wise on training", [*RUN, "--formulation", "wanda"], r"formulation 'wanda' is layer-wise"),
    Row("unknown key", [*RUN, "--set", "foo=1"], r"unknown --set key 'foo' for formulation 'slr'"),
    Row("no value", [*RUN, "--set", "novalue"], r"--set expects KEY=VALUE, got 'novalue'"),
    Row("lr text", [*RUN, "--set", "lr=abc"], r"--set lr='abc' must be a float"),
    Row("lr negative", [*RUN, "--set", "lr=-1"], r"--set lr must be > 0, got -1.0"),
    Row("lr inf", [*RUN, "--set", "lr=inf"], r"--set lr must be a finite number > 0, got inf"),
    Row("lr nan", [*RUN, "--set", "lr=nan"], r"--set lr must be a finite number > 0, got nan"),
    Row(
        "lr beyond float32",
        [*RUN, "--set", "lr=1e39"],
        r"--set lr must be at most 3\.4e\+38 in size \(float32's largest\), got 1e\+39$",
    ),
    Row("s0 beyond float32", [*RUN, "--set", "s0=1e39"], r"s0 must be at most 3\.4e\+38 in size"),
    Row("dual_lr zero", [*RUN, "--set", "dual_lr=0"], r"--set dual_lr must be > 0, got 0.0"),
    Row("batch float", [*RUN, "--set", "batch_size=1.5"], r"--set batch_size='1.5' must be an int"),
    Row("batch zero", [*RUN, "--set", "batch_size=0"], r"--set batch_size must be >= 1, got 0"),
    Row("log_every zero", [*RUN, "--set", "log_every=0"], r"--set log_every must be >= 1, got 0"),
    Row("device tpu", [*RUN, "--set", "device=tpu"], r"--set device must be cpu, cuda, cuda:N or auto, got 'tpu'"),
    Row("allow_empty text", [*RUN, "--set", "allow_empty_layers=maybe"], r"allow_empty_layers='maybe' must be a bool"),
    Row(
        "macs budget",
        [
            "run",
            "mnist1d-mlp-macs",
            "--out",
            "{out}",
            "--wandb",
            "disabled",
            "--no-progress",
            "--set",
            "macs_fraction=-1",
        ],
        r"--set macs_fraction=-1\.0 must be in \(0, 1\]: the share of the dense MACs to keep",
    ),
    Row("rho zero", [*RUN, "--set", "rho=0"], r"rho must be > 0, got 0.0"),
    Row("rho nan", [*RUN, "--set", "rho=nan"], r"rho must be a finite number > 0, got nan"),
    Row("rho inf", [*RUN, "--set", "rho=inf"], r"rho must be a finite number > 0, got inf"),
    Row("admm rho", [*RUN, "--formulation", "admm", "--set", "rho=-1"], r"rho must be > 0, got -1.0"),
    Row("s0 zero", [*RUN, "--set", "s0=0"], r"s0 must be > 0, got 0.0"),
    Row("s0 inf", [*RUN, "--set", "s0=inf"], r"s0 must be a finite number > 0, got inf"),
    Row("M one", [*RUN, "--set", "M=1"], r"M must be > 1, got 1.0"),
    Row("r one", [*RUN, "--set", "r=1"], r"r must be in \(0, 1\), got 1.0"),
    Row("r zero", [*RUN, "--set", "r=0"], r"r must be in \(0, 1\), got 0.0"),
    Row("interval zero", [*RUN, "--set", "interval=0"], r"interval must be an integer >= 1, got 0"),
    Row("interval float", [*RUN, "--set", "interval=1.5"], r"--set interval='1.5' must be an int"),
    Row("interval unit", [*RUN, "--set", "interval_unit=batch"], r"interval_unit must be one of epoch, step"),
    Row("rho growth", [*RUN, "--set", "rho_growth=0.5"], r"rho_growth must be >= 1, got 0.5"),
    Row("rho max", [*RUN, "--set", "rho_max=0.01"], r"rho_max must be >= rho \(0.03\), got 0.01"),
    Row(
        "schedule end without the cubic schedule",
        [*RUN, "--set", "schedule_end=0.8"],
        r"schedule_end=0.8 applies only with sparsity_schedule=cubic",
    ),
    Row("mask from", [*RUN, "--set", "mask_from=q"], r"mask_from must be one of w, z, got 'q'"),
    Row("reference samples", [*RUN, "--set", "reference_samples=0"], r"reference_samples must be an integer >= 1"),
    Row(
        "schedule",
        [*RUN, "--formulation", "magnitude", "--set", "schedule=linear"],
        r"schedule must be 'cubic' or 'oneshot', got 'linear'",
    ),  # fmt: skip
    Row("l0 scope", [*RUN, "--formulation", "l0", "--set", "scope=net"], r"scope must be one of model, layer"),
    Row("l0 grouping", [*RUN, "--formulation", "l0", "--set", "grouping=rows"], r"grouping must be one of"),
    Row(
        "l0 structured gates, other groups",
        [
            *RUN,
            "--formulation",
            "l0",
            "--set",
            "grouping=structured",
            "--pattern",
            "structured:rows",
            "--sparsity",
            "0.5",
        ],
        r"grouping=structured gates whole input neurons / output channels under a --sparsity budget; 0\.weight has "
        r"the pattern 0\.5 structured:rows, whose groups differ",
    ),
    Row(
        "l0 structured layer scope empties a layer",
        [*RUN, "--formulation", "l0", "--set", "grouping=structured", "--set", "scope=layer", "--sparsity", "0.995"],
        r"scope=layer with grouping=structured keeps none of the 64 input columns of 0\.weight at sparsity 0\.995",
    ),
    Row(
        "l0 purged with a pattern",
        [*RUN, "--formulation", "l0", "--set", "grouping=structured", "--set", "density_of=purged", "--pattern", "2:4"],
        r"density_of=purged needs a sparsity level without a pattern, a top-k budget \(--sparsity without --pattern; "
        r"SparsityConfig\(sparsity=\.\.\.\)\); 0\.weight has the pattern 2:4",
    ),
    Row("l0 droprate", [*RUN, "--formulation", "l0", "--set", "droprate_init=0"], r"droprate_init must be in \(0, 1\)"),
    Row("l0 gate lr", [*RUN, "--formulation", "l0", "--set", "gate_lr=0"], r"gate_lr must be > 0, got 0.0"),
    Row("l0 momentum", [*RUN, "--formulation", "l0", "--set", "gate_momentum=1"], r"gate_momentum must be in \[0, 1\)"),
    Row("l0 decay", [*RUN, "--formulation", "l0", "--set", "weight_decay=-1"], r"weight_decay must be >= 0"),
    Row("l0 kind", [*RUN, "--formulation", "l0", "--set", "density_constraint=exact"], r"density_constraint must be"),
    Row("l0 dual lr", [*RUN, "--formulation", "l0", "--set", "density_dual_lr=0"], r"density_dual_lr must be > 0"),
    Row(
        "l0 kp inf",
        [*RUN, "--formulation", "l0", "--set", "density_dual_kp=inf"],
        r"density_dual_kp must be a finite number >= 0, got inf",
    ),  # fmt: skip
    Row("l0 density of", [*RUN, "--formulation", "l0", "--set", "density_of=outputs"], r"density_of must be one of"),
    Row(
        "l0 purged unstructured",
        [*RUN, "--formulation", "l0", "--set", "density_of=purged"],
        r"density_of=purged needs grouping=structured",
    ),  # fmt: skip
    Row(
        "l0 purged cnn",
        [
            "run",
            "mnist1d-cnn",
            "--out",
            "{out}",
            "--formulation",
            "l0",
            "--set",
            "grouping=structured",
            "--set",
            "density_of=purged",
            "--wandb",
            "disabled",
            "--no-progress",
        ],
        r"density_of=purged: .*Conv",
    ),  # fmt: skip
    Row("l0 log interval", [*RUN, "--formulation", "l0", "--set", "log_interval=0"], r"log_interval must be >= 1"),
    Row("l0 restarts", [*RUN, "--formulation", "l0", "--set", "dual_restarts=maybe"], r"must be a bool"),
    Row("penalty lmbda", [*RUN, "--formulation", "l0-penalty", "--set", "lmbda=-1"], r"lmbda must be a finite number"),
    # --- counts, seeds, processes, wandb ----------------------------------------------------------
    Row("epochs", [*RUN, "--epochs", "-1"], r"--epochs must be an integer >= 0, got -1"),
    Row("pretrain epochs", [*RUN, "--pretrain-epochs", "-2"], r"--pretrain-epochs must be an integer >= 0, got -2"),
    Row("retrain epochs", [*RUN, "--retrain-epochs", "-1"], r"--retrain-epochs must be an integer >= 0, got -1"),
    Row("seed negative", [*RUN, "--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*32\)"),
    Row("seed huge", [*RUN, "--seed", str(2**40)], r"--seed must be an integer in \[0, 2\*\*32\)"),
    Row("epochs text", [*RUN, "--epochs", "two"], r"argument --epochs: invalid int value: 'two'"),
    Row("nproc zero", [*RUN, "--nproc", "0"], r"--nproc must be an integer >= 1, got 0"),
    Row("wandb mode", [*RUN, "--wandb", "maybe"], r"argument --wandb: invalid choice: 'maybe'"),
    # --- the run directory ------------------------------------------------------------------------
    Row("out is a file", ["run", "--out", "{tmp}/file"], r"--out .*/file is a file, not a directory", _file("file")),
    Row(
        "out under a file",
        ["run", "--out", "{tmp}/file/run"],
        r"--out .*/file/run: .*/file is a file, not a directory",
        _file("file"),
    ),  # fmt: skip
    Row("out read-only", ["run", "--out", "{tmp}/ro/run"], r"--out .*/ro/run: .*/ro is not writable", _readonly),
    Row("out on a read-only mount", ["run", "--out", "/proc/cs-run"], r"--out /proc/cs-run: /proc is not writable"),
    Row("out dev null", ["run", "--out", "/dev/null"], r"--out /dev/null is a file, not a directory"),
    Row("out too long", ["run", "--out", "{tmp}/" + "x" * 300], r"is longer than the filesystem allows"),
    Row("out empty", ["run", "--out", ""], r"--out must name a run directory, got the current directory"),
    Row(
        "out holds a run",
        ["run", "--out", "{out}", "--wandb", "disabled"],
        r"already holds a finished run; replace the run's files with --overwrite",
        _finished,
    ),  # fmt: skip
    Row(
        "resume and overwrite",
        ["run", "--out", "{out}", "--resume", "--overwrite"],
        r"give either --resume or --overwrite, not both",
        _interrupted,
    ),  # fmt: skip
    # --- resuming ---------------------------------------------------------------------------------
    Row("resume missing", [*RUN, "--resume"], r"--resume needs .*checkpoint.pt, which does not exist"),
    Row("resume and overwrite", [*RUN, "--resume", "--overwrite"], r"give either --resume or --overwrite, not both$"),
    Row("resume truncated", ["run", "--out", "{out}", "--resume"], r"is not a readable checkpoint", _truncated),
    Row(
        "resume random",
        ["run", "--out", "{out}", "--resume"],
        r"is not a (readable|constrainedsparse) checkpoint",
        _checkpoint(os.urandom(4096)),
    ),  # fmt: skip
    Row("resume empty", ["run", "--out", "{out}", "--resume"], r"is not a readable checkpoint", _checkpoint(b"")),
    Row(
        "resume dict",
        ["run", "--out", "{out}", "--resume"],
        r"is not a constrainedsparse checkpoint",
        _checkpoint(lambda p: torch.save({}, p)),
    ),  # fmt: skip
    Row(
        "resume list",
        ["run", "--out", "{out}", "--resume"],
        r"is not a constrainedsparse checkpoint",
        _checkpoint(lambda p: torch.save([1, 2], p)),
    ),  # fmt: skip
    Row(
        "resume pickle",
        ["run", "--out", "{out}", "--resume"],
        r"is not a (readable|constrainedsparse) checkpoint",
        _checkpoint(pickle.dumps({"a": 1})),
    ),  # fmt: skip
    Row(
        "resume directory",
        ["run", "--out", "{out}", "--resume"],
        r"checkpoint.pt is a directory, not a checkpoint",
        _checkpoint(lambda p: p.mkdir()),
    ),  # fmt: skip
    Row(
        "resume other options",
        ["run", "--out", "{out}", "--resume", "--sparsity", "0.7"],
        r"was started with other options: sparsity \(0.7, stored 0.5\)",
        _interrupted,
    ),  # fmt: skip
    Row(
        "resume other key",
        ["run", "--out", "{out}", "--resume", "--set", "schedule=oneshot"],
        r"was started with other options: --set schedule",
        _interrupted,
    ),  # fmt: skip
    # a value bad in itself is reported as such (it was 'started with other options: --set lr (abc, ...)')
    Row(
        "resume bad value",
        ["run", "--out", "{out}", "--resume", "--set", "lr=abc"],
        r"--set lr='abc' must be a float$",
        _interrupted,
    ),  # fmt: skip
    Row(
        "resume bad epochs",
        ["run", "--out", "{out}", "--resume", "--epochs", "-1"],
        r"--epochs must be an integer >= 0, got -1$",
        _interrupted,
    ),  # fmt: skip
    Row(
        "resume out a file",
        ["run", "--out", "{tmp}/notes.txt", "--resume"],
        r"--out .*notes.txt is a file, not a directory$",
        _file("notes.txt"),
    ),  # fmt: skip
    # --- problem files: the user's code -----------------------------------------------------------
    Row("unknown problem", ["run", "no-such-problem", "--out", "{out}"], r"unknown problem 'no-such-problem'"),
    Row(
        "plot a text value",
        ["plot", "{tmp}/m.jsonl"],
        r"values are numbers or null; step 0 has accuracy/dense='abc'\)$",
        _file("m.jsonl", '{"step": 0, "accuracy/dense": "abc"}\n'),
    ),  # fmt: skip
    Row(
        "export a file",
        ["export", "{tmp}/notes.txt"],
        r"run directory '.*notes.txt' is a file, not a run",
        _file("notes.txt"),
    ),
    Row(
        "missing problem file",
        ["run", "{tmp}/nowhere.py", "--out", "{out}"],
        r"problem file .*nowhere\.py does not exist \(bundled problems: ",
    ),  # fmt: skip
    Row(
        "not a python file",
        ["run", "{tmp}/notes.txt", "--out", "{out}"],
        r"unknown problem '.*notes.txt'",
        _file("notes.txt"),
    ),  # fmt: skip
    Row(
        "import fails",
        ["run", "{tmp}/bad.py", "--out", "{out}"],
        r"failed to load at line 1: ModuleNotFoundError",
        _file("bad.py", "import no_such_module_here\n"),
    ),  # fmt: skip
    Row(
        "no problem",
        ["run", "{tmp}/bad.py", "--out", "{out}"],
        r"must define `problem = Problem\(...\)` or `LayerwiseProblem\(...\)`$",
        _file("bad.py", "x = 1\n"),
    ),  # fmt: skip
    Row(
        "problem of a wrong type",
        ["run", "{tmp}/bad.py", "--out", "{out}"],
        r"must define `problem = Problem\(\.\.\.\)` or `LayerwiseProblem\(\.\.\.\)`, its `problem` is a int$",
        _file("bad.py", "problem = 42\n"),
    ),  # fmt: skip
    Row(
        "sys.exit at load",
        ["run", "{tmp}/bad.py", "--out", "{out}"],
        r"failed to load: sys.exit\(3\)",
        _file("bad.py", "import sys\nsys.exit(3)\n"),
    ),  # fmt: skip
    Row(
        "model raises",
        ["run", "{tmp}/bad.py", "--out", "{out}", *FAST],
        r"problem 'bad': model\(options\) failed: RuntimeError: no model here",
        _problem(
            "def model(o):\n    raise RuntimeError('no model here')\n"
            "problem = dataclasses.replace(base, name='bad', model=model)\n"
        ),
    ),  # fmt: skip
    Row(
        "data raises",
        ["run", "{tmp}/bad.py", "--out", "{out}", *FAST],
        r"problem 'bad': data\(options\) failed: FileNotFoundError: .*no/such/file.csv",
        _problem(
            "def data(o):\n    return open('/no/such/file.csv')\n"
            "problem = dataclasses.replace(base, name='bad', data=data)\n"
        ),
    ),  # fmt: skip
    Row(
        "data exits",
        ["run", "{tmp}/bad.py", "--out", "{out}", *FAST],
        r"data\(options\) failed: sys.exit\(0\)",
        _problem(
            "import sys\ndef data(o):\n    sys.exit(0)\nproblem = dataclasses.replace(base, name='bad', data=data)\n"
        ),
    ),  # fmt: skip
    Row(
        "empty training set",
        ["run", "{tmp}/bad.py", "--out", "{out}", *FAST],
        r"data\(options\) returned an empty training set",
        _problem(
            "from torch.utils.data import TensorDataset\nimport torch\n"
            "def data(o):\n    return TensorDataset(torch.zeros(0, 64), torch.zeros(0)), base.data(o)[1]\n"
            "problem = dataclasses.replace(base, name='bad', data=data)\n"
        ),
    ),  # fmt: skip
    Row(
        "empty test set",
        ["run", "{tmp}/bad.py", "--out", "{out}", *FAST],
        r"data\(options\) returned an empty test set",
        _problem(
            "from torch.utils.data import TensorDataset\nimport torch\n"
            "def data(o):\n    return base.data(o)[0], TensorDataset(torch.zeros(0, 64), torch.zeros(0))\n"
            "problem = dataclasses.replace(base, name='bad', data=data)\n"
        ),
    ),  # fmt: skip
    Row(
        "model fails while pruning",
        ["run", "{tmp}/bad.py", "--out", "{out}", "--formulation", "magnitude", *FAST],
        r"^error: problem 'bad': the model on a training batch, model\(x\) failed: RuntimeError: boom \(--debug",
        _problem(
            "from torch import nn\nclass M(nn.Sequential):\n    def forward(self, x):\n        if self.training:\n"
            "            raise RuntimeError('boom')\n        return super().forward(x)\n"
            "problem = dataclasses.replace(base, name='bad', model=lambda o: M(nn.Linear(64, 16), nn.ReLU(), "
            "nn.Linear(16, 10)))\n"
        ),
    ),  # fmt: skip
    Row(
        "option name",
        ["run", "{tmp}/bad.py", "--out", "{out}"],
        r"option 3: an option's name is a str without '=' or surrounding spaces",
        _problem("problem = dataclasses.replace(base, name='bad', options={3: 1})\n"),
    ),  # fmt: skip
    Row(
        "resume after the model changed",
        ["run", "--out", "{out}", "--resume"],
        r"^error: --resume: .*checkpoint\.pt does not fit this run \(.*\): did the problem file or its model change",
        _changed_model,
    ),  # fmt: skip
    Row(
        "loss raises",
        ["run", "{tmp}/bad.py", "--out", "{out}", "--formulation", "magnitude", *FAST],
        r"problem 'bad': loss\(output, y\) failed: ZeroDivisionError",
        _problem("def loss(o, y):\n    return 1 / 0\nproblem = dataclasses.replace(base, name='bad', loss=loss)\n"),
    ),  # fmt: skip
    Row(
        "check refuses",
        ["run", "{tmp}/bad.py", "--out", "{out}"],
        r"^error: my option is wrong$",
        _problem(
            "def check(o):\n    raise ValueError('my option is wrong')\n"
            "problem = dataclasses.replace(base, name='bad', check=check)\n"
        ),
    ),  # fmt: skip
    Row(
        "constraint float",
        ["run", "{tmp}/bad.py", "--out", "{out}", "--formulation", "magnitude", *FAST],
        r"constraint 'c' must return a tensor differentiable in the model's parameters, got float",
        _problem(
            "from constrainedsparse import UserConstraint\n"
            "c = UserConstraint(lambda m: float(m[0].weight.norm()) - 1)\n"
            "problem = dataclasses.replace(base, name='bad', constraints={'c': c})\n"
        ),
    ),  # fmt: skip
    Row(
        "constraint detached",
        ["run", "{tmp}/bad.py", "--out", "{out}", "--formulation", "magnitude", *FAST],
        r"constraint 'c' has no gradient path to the model's parameters",
        _problem(
            "from constrainedsparse import UserConstraint\n"
            "c = UserConstraint(lambda m: m[0].weight.detach().norm() - 1)\n"
            "problem = dataclasses.replace(base, name='bad', constraints={'c': c})\n"
        ),
    ),  # fmt: skip
    Row(
        "selects nothing",
        ["run", str(PROBLEMS / "selects_nothing.py"), "--out", "{out}"],
        r"include 'encoder\.\*' matches no parameter; the candidates are 0\.weight, 2\.weight",
    ),  # fmt: skip
    Row("cifar without data dir", ["run", "cifar10-resnet18", "--out", "{out}"], r"data_dir"),
    Row(
        "cifar missing folder",
        ["run", "cifar10-resnet18", "--out", "{out}", "--set", "data_dir={tmp}/none"],
        r"CIFAR-10 data_dir .* is not a directory",
    ),  # fmt: skip
    # --- layer-wise problems ----------------------------------------------------------------------
    Row("hf without model", ["run", "hf-causal-lm", "--out", "{out}"], r"hf-causal-lm needs --set model=PATH"),
    Row(
        "hf missing folder",
        ["run", "hf-causal-lm", "--out", "{out}", "--set", "model={tmp}/none"],
        r"the directory does not exist",
    ),  # fmt: skip
    Row(
        "hf not a model",
        ["run", "hf-causal-lm", "--out", "{out}", "--set", "model={tmp}"],
        r"is not a transformers model directory \(no config.json\)",
    ),  # fmt: skip
    Row(
        "hf sequence above context",
        [*LLAMA, "--set", "seq_len=4096"],
        r"--set seq_len=4096 is above the model's context of 64 tokens",
    ),  # fmt: skip
    Row("hf no calibration", [*LLAMA, "--set", "calibration_samples=0"], r"--set calibration_samples must be >= 1"),
    Row("hf no held-out", [*LLAMA, "--set", "held_out_samples=-1"], r"^error: --set held_out_samples must be >= 1"),
    Row("training formulation layer-wise", [*LLAMA, "--formulation", "slr"], r"formulation 'slr' trains the model"),
    Row(
        "unknown layer-wise formulation",
        [*LLAMA, "--formulation", "nope"],
        r"unknown formulation 'nope'; problem 'hf-causal-lm' is layer-wise: choose one of admm, fw, magnitude",
    ),  # fmt: skip
    Row(
        "retrain layer-wise", [*LLAMA, "--retrain-epochs", "1"], r"--retrain-epochs is not available for the layer-wise"
    ),
    Row(
        "fw block",
        [*LLAMA, "--formulation", "fw", "--pattern", "block:4x4", "--sparsity", "0.5"],
        r"fw supports the unstructured, row, N:M patterns, got block:4x4",
    ),  # fmt: skip
    Row(
        "sparsegpt columns",
        [*LLAMA, "--formulation", "sparsegpt", "--pattern", "structured:columns"],
        r"sparsegpt supports the unstructured, row, N:M, structured:rows patterns",
    ),  # fmt: skip
    Row("mask scope", [*LLAMA, "--set", "mask_scope=column"], r"--set mask_scope must be one of row, layer"),
    Row(
        "mask scope and pattern",
        [*LLAMA, "--pattern", "row", "--set", "mask_scope=layer"],
        r"give either --pattern or --set mask_scope",
    ),  # fmt: skip
    Row("gram dtype", [*LLAMA, "--set", "gram_dtype=float16"], r"--set gram_dtype must be one of float32, float64"),
    Row("fw alpha", [*LLAMA, "--set", "alpha=1"], r"fw: alpha must be in \[0, 1\), got 1.0"),
    Row("fw iterations", [*LLAMA, "--set", "iterations=0"], r"fw: iterations must be an integer >= 1, got 0"),
    Row("fw damp", [*LLAMA, "--set", "damp=0"], r"fw: damp must be a finite number > 0, got 0.0"),
    Row(
        "sparsegpt damp",
        [*LLAMA, "--formulation", "sparsegpt", "--set", "damp=0"],
        r"sparsegpt: damp must be a finite number > 0, got 0.0",
    ),  # fmt: skip
    Row("nm width layer-wise", [*LLAMA, "--pattern", "3:5"], r"model\.layers\.0\.\S+\.weight: N:M pattern 3:5"),
    Row(
        "allocation kind",
        [*LLAMA, "--set", "allocation=owls"],
        r"--set allocation must be one of uniform, lagrangian, owl",
    ),
    Row(
        "allocation with N:M",
        [*LLAMA, "--pattern", "2:4", "--set", "allocation=lagrangian"],
        r"allocation=lagrangian shares out a --sparsity level; the N:M pattern 2:4",
    ),  # fmt: skip
    Row(
        "allocation bounds",
        [*LLAMA, "--set", "allocation=lagrangian", "--set", "allocation_min=0.6", "--set", "allocation_max=0.4"],
        r"--set allocation_min=0.6 is above allocation_max=0.4",
    ),  # fmt: skip
    Row(
        "allocation budget",
        [*LLAMA, "--set", "allocation=lagrangian", "--set", "allocation_max=0.3"],
        r"--sparsity 0.5 is outside the allocation bounds \[0.0, 0.3\]",
    ),  # fmt: skip
    Row("allocation max 1", [*LLAMA, "--set", "allocation_max=1"], r"allocation_max must be in \[0, 1\), got 1.0"),
    Row("dtype", [*LLAMA, "--set", "dtype=int8"], r"--set dtype must be one of float32, bfloat16, float16"),
    Row("activations", [*LLAMA, "--set", "activations=disk"], r"--set activations must be one of device, cpu"),
    # --- other commands ---------------------------------------------------------------------------
    Row("plot missing", ["plot", "{tmp}/none.jsonl"], r"metrics file '.*none.jsonl' does not exist"),
    Row(
        "plot not jsonl",
        ["plot", "{tmp}/notes.txt"],
        r"is not a metrics.jsonl written by a run",
        _file("notes.txt", "hello\n"),
    ),  # fmt: skip
    Row(
        "plot rows without step",
        ["plot", "{tmp}/m.jsonl"],
        r"is not a metrics.jsonl written by a run \(rows need",
        _file("m.jsonl", '{"a": 1}\n'),
    ),  # fmt: skip
    Row(
        "plot into missing folder",
        ["plot", "{tmp}/m.jsonl", "--png", "{tmp}/no/such/m.png"],
        r"--png .*m.png': the directory .* does not exist",
        _file("m.jsonl", '{"step": 1, "a": 1}\n'),
    ),  # fmt: skip
    Row(
        "plot into a folder",
        ["plot", "{tmp}/m.jsonl", "--png", "{tmp}"],
        r"^error: --png '.*' is a directory: give a file name ending in \.png$",
        _file("m.jsonl", '{"step": 1, "a": 1}\n'),
    ),  # fmt: skip
    Row(
        "plot as svg",
        ["plot", "{tmp}/m.jsonl", "--png", "{tmp}/m.svg"],
        r"--png '.*m.svg': the plot is a PNG image, give a file name ending in \.png$",
        _file("m.jsonl", '{"step": 1, "a": 1}\n'),
    ),  # fmt: skip
    Row("export missing", ["export", "{tmp}/none"], r"none"),
    Row(
        "export summary not json",
        ["export", "{tmp}/folder"],
        r"^error: '.*/folder/summary\.json' is not a run's summary \(not JSON: Expecting value",
        lambda ctx: (ctx["tmp"] / "folder").mkdir() or (ctx["tmp"] / "folder" / "summary.json").write_text("x"),
    ),  # fmt: skip
    Row("export a training run", ["export", "{out}"], r"is a training run \(its model is model\.safet", _finished),
    Row("describe unknown", ["formulations", "nope"], r"unknown formulation 'nope'; available:"),
]


def _snapshot(path: Path) -> Any:
    try:
        if not path.exists():
            return None
    except OSError:  # a name too long for the filesystem
        return None
    if path.is_file():
        return ("file", path.stat().st_size)
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_cli_input(row, tmp_path, capsys, tiny_llama):
    ctx = {"out": tmp_path / "run", "tmp": tmp_path, "llama": tiny_llama}
    if row.setup is not None:
        row.setup(ctx)
        capsys.readouterr()
    argv = [arg.format(**ctx) for arg in row.argv]
    before = _snapshot(ctx["out"])
    try:
        line = fails_with_one_line(argv, capsys)
    finally:
        (tmp_path / "ro").chmod(0o700) if (tmp_path / "ro").exists() else None
    assert re.search(row.pattern, line), line
    assert "Traceback" not in line
    assert _snapshot(ctx["out"]) == before


def _problem_object():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    return model, SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))


PYTHON_ROWS: list[tuple[str, Callable[[], Any], str]] = [
    ("make unknown key", lambda: make("slr", _problem_object()[1], rhoo=1), r"^unknown hyperparameter 'rhoo'"),
    ("make wrong type", lambda: make("slr", _problem_object()[1], rho="x"), r"^rho='x' must be a float$"),
    ("make unknown name", lambda: make("nope", _problem_object()[1]), r"^unknown formulation 'nope'"),
    (  # SLRConfig is a DuplicateConfig: admm took it and ignored its M
        "make another formulation's config",
        lambda: make("admm", _problem_object()[1], SLRConfig(M=5.0)),
        r"^admm: config must be a DuplicateConfig, got SLRConfig, whose M, r, reference_samples, s0 mean nothing",
    ),
    ("make not a problem", lambda: make("slr", object()), r"^problem must be a SparsityProblem, got object$"),
    ("make optimizer", lambda: make("slr", _problem_object()[1], optimizer=3), r"^optimizer must be a torch.optim"),
    ("make config and keywords", lambda: make("admm", _problem_object()[1], _cfg(), rho=1), r"give either a config"),
    ("problem no loss", lambda: SparsityProblem(nn.Linear(2, 2), targets=[1]), r"^give exactly one of loss_fn"),
    ("problem no targets", lambda: SparsityProblem(nn.Linear(2, 2), nn.functional.mse_loss), r"^targets is required"),
    ("problem not a module", lambda: SparsityProblem(3, nn.functional.mse_loss), r"^model must be a torch.nn.Module"),
    ("constraint sense", lambda: UserConstraint(lambda m: m, ">="), r"^constraint sense must be '<=' or '=='"),
    (
        "constraint restarts on equality",
        lambda: UserConstraint(lambda m: m, "==", restarts=True),
        r"^restarts apply to inequality constraints",
    ),  # fmt: skip
    ("sparsity config", lambda: SparsityConfig(1.5), r"^sparsity must be in \[0, 1\), got 1.5$"),
    ("override", lambda: Targets(overrides={"a": 2}), r"^override 'a' must be a sparsity in \[0, 1\), got 2$"),
    (
        "layerwise method",
        lambda: prune_layerwise(nn.Sequential(), [torch.zeros(1)], "nope"),
        r"^unknown layer-wise solver 'nope'",
    ),  # fmt: skip
    ("layerwise batches", lambda: prune_layerwise(nn.Linear(2, 2), "text"), r"^batches must be a non-empty list"),
    (
        "layerwise text batches",
        lambda: prune_layerwise(nn.Linear(2, 2), ["hello world"]),
        r"^calibration batch 0 holds no tensor \(got a str\): tokenize text first",
    ),  # fmt: skip
    (
        "layerwise empty batch",
        lambda: prune_layerwise(nn.Linear(2, 2), [{"input_ids": torch.zeros(1, 0, dtype=torch.long)}]),
        r"^calibration batch 0 holds an empty tensor of shape \(1, 0\)$",
    ),  # fmt: skip
    (
        "layerwise one dict batch",
        lambda: prune_layerwise(nn.Linear(2, 2), {"input_ids": torch.ones(1, 3, dtype=torch.long)}),
        r"^batches must be a non-empty list of calibration batches \(dicts, tuples or tensors\), got dict "
        r"\(one batch: pass \[batch\]\)$",
    ),  # fmt: skip
    ("layerwise model", lambda: prune_layerwise("model", [1]), r"^model must be a torch.nn.Module, got str$"),
    ("metric name", lambda: Metric("not a name", len), r"^a metric name must be an identifier"),
    ("describe kind", lambda: describe("slr", kind="other"), r"^kind must be one of training, layerwise"),
    ("sparsity text", lambda: SparsityConfig("0.5"), r"^sparsity must be a number in \[0, 1\), got '0\.5' \(a str\)$"),
    ("nm text", lambda: SparsityConfig(pattern="nm", nm="2:4"), r"^nm must be a pair \(n, m\), got '2:4' \(for text"),
    (
        "nm with a level",
        lambda: SparsityConfig(sparsity=0.9, pattern="nm", nm=(2, 4)),
        r"^pattern 2:4 fixes its own level 0\.5, got sparsity=0\.9: give one or the other$",
    ),
    (
        "nm of row",
        lambda: SparsityConfig(0.5, "row", nm=(2, 4)),
        r"^nm=\(2, 4\) is for pattern='nm', got pattern='row'$",
    ),
    (
        "targets module names",
        lambda: Targets(module_types=["Linear"]),
        r"^module_types must hold nn\.Module classes \(nn\.Linear, \.\.\.\), got 'Linear'$",
    ),
    (
        "layerwise targets config",
        lambda: prune_layerwise(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], targets=SparsityConfig(0.5)),
        r"^targets must be a Targets \(which layers, per-layer levels\), got SparsityConfig$",
    ),
    ("layer sparsity", lambda: layer_sparsity(None), r"^layer_sparsity\(targets\): targets must be the list"),
    ("hard_prune no targets", lambda: hard_prune([], {"w": torch.ones(2, dtype=torch.bool)}), r"targets are none \("),
    ("targets exclude str", lambda: Targets(exclude="4.*"), r"^exclude must be a list, tuple or set, got '4\.\*'"),
    ("targets module class", lambda: Targets(module_types=nn.Linear), r"^module_types must be .*got Linear: wrap"),
    ("targets overrides list", lambda: Targets(overrides=["0.*"]), r"^overrides must be a dict \{glob: sparsity\}"),
    ("targets filter arity", lambda: Targets(filter_fn=lambda m: True), r"^filter_fn must take \(module, fqn\)"),
    ("resolve a float", lambda: Targets().resolve(nn.Linear(2, 2), 0.5), r"^resolve\(model, config\): config must be"),
    (
        "resolve no model",
        lambda: Targets().resolve(None, SparsityConfig(0.5)),
        r"^resolve\(model, config\): model must",
    ),
    (
        "problem unresolved targets",
        lambda: SparsityProblem(nn.Linear(2, 2), nn.functional.mse_loss, Targets()),
        r"^targets must be the list .* got Targets: call \.resolve\(model, config\) on it$",
    ),  # fmt: skip
    (
        "problem constraints list",
        lambda: SparsityProblem(*_model_loss_targets(), [UserConstraint(lambda m: m[0].weight.sum())]),
        r"^constraints must be a dict \{name: UserConstraint\}, got a list$",
    ),  # fmt: skip
    (
        "constraint name taken",
        lambda: SparsityProblem(*_model_loss_targets(), {"loss": UserConstraint(lambda m: m[0].weight.sum())}),
        r"^constraint name 'loss' is taken by SparsityProblem\.loss: choose another$",
    ),  # fmt: skip
    ("constraint sense list", lambda: UserConstraint(lambda m: m, ["<="]), r"^constraint sense must be '<=' or '=='"),
    ("achieved sparsity", lambda: achieved_sparsity(None), r"^achieved_sparsity\(targets\): targets must be the list"),
    ("hard_prune a list", lambda: hard_prune(_model_loss_targets()[2], [torch.ones(4, 8)]), r"^masks must be a dict"),
    (
        "post_step an int",
        lambda: _ready("admm").post_step(42),
        r"^post_step\(\) takes what backward\(\) returned .*got int$",
    ),
    ("post_step empty", lambda: _ready("slr").post_step([]), r"^post_step\(\) takes .* got an empty list$"),
    (
        "start_epoch text",
        lambda: _ready("magnitude").start_epoch("0"),
        r"^start_epoch\(epoch\): epoch must be an integer",
    ),
    ("start_epoch numpy bool", lambda: _ready("magnitude").start_epoch(np.bool_(0)), r"^start_epoch\(epoch\): epoch"),
    (
        "compute_lagrangian dual_scale text",
        lambda: _ready("slr").compute_lagrangian((torch.randn(4, 8), torch.tensor([0, 1, 0, 1])), dual_scale="1"),
        r"^compute_lagrangian\(dual_scale=\.\.\.\) must be a finite number > 0 \(1 / accumulation steps\), got '1'$",
    ),  # fmt: skip
    (
        "frozen target",
        lambda: make("slr", _frozen_problem()),
        r"^slr trains the weights towards Z, but 0\.weight is frozen \(requires_grad=False\)",
    ),  # fmt: skip
    (
        "constraint no arguments",
        lambda: UserConstraint(lambda: 1.0),
        r"^constraint fn must take \(model\) or \(model, ",
    ),
    (
        "constraint three arguments",
        lambda: UserConstraint(lambda m, b, c: 1.0),
        r"^constraint fn must take \(model\) or \(model, batch\), got a function of \(m, b, c\)$",
    ),  # fmt: skip
    ("constraint restarts text", lambda: UserConstraint(lambda m: m, restarts="yes"), r"^restarts must be True or"),
    (
        "constraint nan",
        lambda: SparsityProblem(*_model_loss_targets(), {"c": UserConstraint(lambda m: m[0].weight.sum() * math.nan)}),
        r"^constraint 'c' is not finite on the model as given \(\[nan\]\): a nan or inf violation would make",
    ),  # fmt: skip
    (
        "constraint name with a slash",
        lambda: SparsityProblem(*_model_loss_targets(), {"a/b": UserConstraint(lambda m: m[0].weight.sum())}),
        r"^constraint name 'a/b' has a '/': logged keys are family/name",
    ),  # fmt: skip
    (
        "hard_prune numpy masks",
        lambda: hard_prune(_model_loss_targets()[2], {"0.weight": np.ones((4, 8), dtype=bool)}),
        r"^the mask of 0\.weight is a numpy\.ndarray, not a torch tensor",
    ),  # fmt: skip
    (
        "backward scaler",
        lambda: _ready("slr").backward((torch.randn(4, 8), torch.tensor([0, 1, 0, 1])), scaler=1.0),
        r"^backward\(scaler=\.\.\.\) must be a torch\.amp\.GradScaler \(or None\), got float$",
    ),  # fmt: skip
    (
        "frozen target outside the optimizer",
        lambda: make("magnitude", _frozen_problem(), optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)])),
        r"^the optimizer does not hold 0\.weight, which is frozen \(requires_grad=False\): leave it out",
    ),  # fmt: skip
    (
        "describe the other kind",
        lambda: describe("slr", kind="layerwise"),
        r"^'slr' is a formulation, not a layer-wise solver; layer-wise solvers: admm, fw, magnitude, sparsegpt, wanda",
    ),  # fmt: skip
    # --- run(), RunConfig and the run-folder readers: every type at the boundary --------------------------------
    (
        "RunConfig overwrite text",
        lambda: RunConfig(overwrite="no"),
        r"^RunConfig\(overwrite=\.\.\.\) must be True or False, got 'no'$",
    ),
    ("RunConfig resume text", lambda: RunConfig(resume="no"), r"^RunConfig\(resume=\.\.\.\) must be True or False"),
    ("RunConfig out None", lambda: RunConfig(out=None), r"^RunConfig\(out=\.\.\.\) must be a str or a path, got None$"),
    (
        "RunConfig problem None",
        lambda: RunConfig(problem=None),
        r"^RunConfig\(problem=\.\.\.\) must be a str or a path",
    ),
    (
        "RunConfig settings list",
        lambda: RunConfig(settings=["rho=0.05"]),
        r"^RunConfig\(settings=\.\.\.\) must be a dict like",
    ),
    (
        "run a dict",
        lambda: run({"problem": "digits-mlp"}),
        r"^run\(config\): config must be a RunConfig\(\.\.\.\), got dict$",
    ),
    (
        "run a problem name",
        lambda: run(RunConfig(), problem="digits-mlp"),
        r"^run\(config, problem\): problem must be a loaded",
    ),
    (
        "load_problem None",
        lambda: load_problem(None),
        r"^load_problem: give a problem name or a problem file's path, got None$",
    ),
    (
        "read_metrics missing",
        lambda: read_metrics("/nonexistent/run"),
        r"^metrics file '/nonexistent/run' does not exist$",
    ),
    ("read_metrics number", lambda: read_metrics(3), r"^read_metrics: path must be a metrics\.jsonl or a run folder"),
    ("plot_metrics None", lambda: plot_metrics(None), r"^read_metrics: path must be a metrics\.jsonl or a run folder"),
    (
        "plot_metrics rows text",
        lambda: plot_metrics("m.jsonl", rows="x"),
        r"^plot_metrics\(rows=\.\.\.\) must be the list of dicts",
    ),
    (
        "plot_metrics png number",
        lambda: plot_metrics("m.jsonl", png_path=3),
        r"^plot_metrics\(png_path=\.\.\.\) must be a file path",
    ),
    (
        "empty batch",
        lambda: _ready("slr").backward((torch.randn(0, 8), torch.zeros(0, dtype=torch.long))),
        r"^the batch holds no samples \(its inputs have shape \(0, \.\.\.\)\): the mean loss is NaN$",
    ),
    (
        "blocks by name",
        lambda: prune_layerwise(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], "wanda", blocks=["0"]),
        r"^block 0 must be a sub-module of the model, got str \(blocks takes the modules themselves",
    ),
    (
        "recalibrate no batches",
        lambda: recalibrate_batchnorm(_bn_model(), None),
        r"^recalibrate_batchnorm: batches must be an iterable",
    ),
    (
        "recalibrate max text",
        lambda: recalibrate_batchnorm(_bn_model(), [], max_batches="2"),
        r"^max_batches must be an integer >= 1 or None, got '2'$",
    ),
]


def _bn_model():
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def test_a_failed_batchnorm_recalibration_leaves_the_statistics_as_they_were():
    model = _bn_model()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    before = {name: buffer.clone() for name, buffer in model[1].named_buffers()}
    failures = {  # none, or the model fails on the second (its own error, as it raised it)
        ValueError: ([], r"^recalibrate_batchnorm got no batch \(or empty ones only\)"),
        RuntimeError: ([torch.randn(3, 4), torch.randn(3, 5)], "mat1 and mat2 shapes cannot be multiplied"),
    }
    for error, (batches, message) in failures.items():
        with pytest.raises(error, match=message):
            recalibrate_batchnorm(model, batches)
        assert all(torch.equal(buffer, before[name]) for name, buffer in model[1].named_buffers())
    assert model.training


def test_batchnorm_recalibration_refuses_a_model_that_is_no_module_and_one_batch_given_alone():
    model = _bn_model()
    before = {name: buffer.clone() for name, buffer in model[1].named_buffers()}
    with pytest.raises(ValueError, match=r"^recalibrate_batchnorm: model must be an nn.Module, got NoneType$"):
        recalibrate_batchnorm(None, [torch.randn(3, 4)])
    for one in (torch.randn(3, 4), {"x": torch.randn(3, 4)}):  # iterating gave rows (keys): torch's shape error
        with pytest.raises(ValueError, match=r"got one (Tensor|dict) \(one batch: pass \[batch\]\)$"):
            recalibrate_batchnorm(model, one)
    assert all(torch.equal(buffer, before[name]) for name, buffer in model[1].named_buffers())


def test_batchnorm_recalibration_takes_a_map_style_dataset_and_options_take_any_setable_name():
    from torch.utils.data import TensorDataset

    from constrainedsparse.spec import check_options

    assert recalibrate_batchnorm(_bn_model(), TensorDataset(torch.randn(3, 2, 4))) == 3  # __getitem__ and __len__
    check_options({"train-subset": 0, "budget": float("inf")})  # --set train-subset=5 and --set budget=inf parse
    with pytest.raises(ValueError, match=r"^option 'a=b': an option's name is a str without '='"):
        check_options({"a=b": 1})
    with pytest.raises(ValueError, match=r"^option 'w' has default nan: give a number$"):
        check_options({"w": float("nan")})


def test_metrics_that_are_not_json_name_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(
        ValueError, match=r"^'.*/metrics\.jsonl' is not a metrics\.jsonl written by a run \(line 2: Expecting value"
    ):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"is not a metrics\.jsonl written by a run \(not text: "):
        read_metrics(tmp_path)


def _model_loss_targets():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    return model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5))


def _frozen_problem():
    model, loss, targets = _model_loss_targets()
    model[0].weight.requires_grad_(False)
    return SparsityProblem(model, loss, targets)


def _ready(method):
    """A formulation after setup(), on a fresh model."""
    model, problem = _problem_object()
    formulation = make(method, problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    formulation.setup(1, 1, reference_batch=(torch.randn(4, 8), torch.tensor([0, 1, 0, 1])))
    return formulation


def _cfg():
    from constrainedsparse import DuplicateConfig

    return DuplicateConfig()


@pytest.mark.parametrize(("name", "call", "pattern"), PYTHON_ROWS, ids=[row[0] for row in PYTHON_ROWS])
def test_bad_python_input(name, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_the_table_has_at_least_100_rows():
    assert len(ROWS) + len(PYTHON_ROWS) >= 100


def test_a_prefix_is_not_repeated_on_a_line_that_already_starts_with_it():
    from constrainedsparse.errors import UserInputError, user_input

    with pytest.raises(UserInputError, match=r"^problem 'p': blocks\(model\) failed: boom$"):
        with user_input("problem 'p': "):
            raise UserInputError("problem 'p': blocks(model) failed: boom")  # a guarded call names the problem
    with pytest.raises(UserInputError, match=r"^problem 'p': bad width$"):
        with user_input("problem 'p': "):
            raise ValueError("bad width")
