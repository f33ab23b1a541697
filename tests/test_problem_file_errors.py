"""Mistakes in a problem file of one's own: each is one `error:` line and exit 2, nothing written (or it just works)."""

import json
import re

import pytest
from cli_helpers import fails_with_one_line

from constrainedsparse.cli import main

BASE = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse import Problem, Targets, UserConstraint


def data(options):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


class Dicts(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return {"x": x, "y": y}


class Labelled(Dicts):
    def __getitem__(self, i):
        return super().__getitem__(i)["label"]


class Ragged(Dicts):
    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x[: 7 + i % 2], y


class MaskedThird(nn.Module):  # three logits, the third masked with -inf (a class this data never has)

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x).index_fill(1, torch.tensor([2]), float("-inf"))


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x), x.sum()


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(data({})[0])


def model(options):
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


CALLS = [0]


def fails_late(m):
    CALLS[0] += 1
    if CALLS[0] > 8:  # in the pruning's third epoch or so: a checkpoint was written after its first
        raise RuntimeError("late failure")
    return m[0].weight.norm() - 50


FIELDS = dict()
problem = Problem(name="mine", description="a problem of one's own", **(dict(model=model, data=data) | FIELDS))
"""
FAST = ["--epochs", "1", "--pretrain-epochs", "1", "--wandb", "disabled", "--no-progress"]

MISTAKES = [
    ("model(x) fails", "model=lambda o: nn.Linear(7, 2)",
     r"problem 'mine': the model on a training batch, model\(x\) failed: RuntimeError: mat1 and mat2 shapes"),
    ("dict batches without compute_loss", "data=lambda o: tuple(Dicts(d) for d in data(o))",
     r"loss\(model\(x\), y\) takes \(inputs, targets\) batches, got a dict \(keys x, y\): give the Problem "
     r"compute_loss"),
    ("dict batches with compute_loss but no predict",
     "data=lambda o: tuple(Dicts(d) for d in data(o)), compute_loss=lambda m, b: F.cross_entropy(m(b['x']), b['y'])",
     r"the default predict, \(model\(x\), y\), takes \(inputs, targets\) batches, got a dict \(keys x, y\): give "
     r"the Problem predict\(model, batch\) for other batches$"),
    ("a model returning a tuple with the default loss", "model=lambda o: Pair()",
     r"problem 'mine': the model returned a tuple, which the default loss \(cross-entropy\) cannot take: give the "
     r"Problem loss\(output, y\) or compute_loss\(model, batch\), and predict\(model, batch\)$"),
    ("a loss per sample", "loss=lambda o, y: F.cross_entropy(o, y, reduction='none')",
     r"loss\(output, y\) must return a scalar tensor, got \(64,\)"),
    ("a float loss", "loss=lambda o, y: 1.0", r"loss\(output, y\) must return a scalar tensor, got float"),
    ("a detached loss", "loss=lambda o, y: F.cross_entropy(o, y).detach()",
     r"loss\(output, y\) returned a loss with no gradient"),
    ("data returns one set", "data=lambda o: data(o)[0]",
     r"problem 'mine': data\(options\) must return \(train_dataset, test_dataset\), two datasets with a length, got "
     r"TensorDataset"),
    ("data returns None", "data=lambda o: None", r"data\(options\) must return .* got NoneType$"),
    ("a metric of one number per sample", "metric=lambda o, y: o.argmax(1) == y",
     r"metric 'metric' must return one number over the test set, got a tensor of shape \(64,\)"),
    ("a metric returning text", "metric=lambda o, y: 'good'",
     r"metric 'metric' must return one number over the test set, got 'good'"),
    ("targets as a class", "targets=nn.Linear", r"Problem\.targets must be a Targets\(\.\.\.\), got the class Linear"),
    ("constraints as a list", "constraints=[UserConstraint(lambda m: m[0].weight.sum())]",
     r"Problem\.constraints must be a dict \{name: UserConstraint\(\.\.\.\)\}, got a list"),
    ("epochs as text", "epochs='3'", r"Problem\.epochs must be an integer >= 0, got '3'"),
    ("batch size 0", "batch_size=0", r"Problem\.batch_size must be an integer >= 1, got 0"),
    ("lr negative", "lr=-1.0", r"Problem\.lr must be a finite number > 0, got -1\.0"),
    ("an option without a type", "options={'hidden': None}", r"option 'hidden' has default None: give a bool, int"),
    ("data returns DataLoaders",
     "data=lambda o: tuple(torch.utils.data.DataLoader(d, batch_size=32) for d in data(o))",
     r"problem 'mine': data\(options\) returned a DataLoader as the train set: return the dataset itself"),
    ("data returns array pairs", "data=lambda o: tuple(tuple(d.tensors) for d in data(o))",
     r"returned a \(Tensor, Tensor\) tuple as the train set, not a dataset: wrap the arrays as TensorDataset"),
    ("a constraint that is a bare function", "constraints={'norm': lambda m: m[0].weight.norm() - 1}",
     r"Problem\.constraints\['norm'\] must be a UserConstraint\(\.\.\.\), got a function: wrap it as "
     r"UserConstraint\(<lambda>, '<='\)"),
    ("an unpacking mistake in a constraint",
     "constraints={'c': UserConstraint(lambda m, b: (lambda x, y, w: x.sum())(*b) + m[0].weight.sum())}",
     r"problem 'mine': constraint 'c' failed: .*missing 1 required positional argument"),
    ("a ValueError in a constraint",
     "constraints={'c': UserConstraint(lambda m, b: int('x') + m[0].weight.sum())}",
     r"^error: problem 'mine': constraint 'c' failed: invalid literal for int\(\) with base 10: 'x'"),
    ("a constraint whose length changes",
     "constraints={'c': UserConstraint(lambda m, b: m(b[0]).mean(1)[: 1 + int(b[1].sum()) % 3] - 9)}",
     r"constraint 'c' returned \d entries on this batch, but it was sized with \d \(one multiplier per entry\)"),
    ("a constraint that goes nan",  # finite where it is sized (eval mode), nan in training
     "constraints={'c': UserConstraint(lambda m: m[0].weight.norm() * (float('nan') if m.training else 1.0))}",
     r"loss became nan at step \d+ \(prune epoch 1\); not finite either: constraint 'c' \(its value or multi"),
    ("a constraint that is nan from the start",
     "constraints={'c': UserConstraint(lambda m: m[0].weight.norm() * float('nan'))}",
     r"^error: constraint 'c' is not finite on the model as given \(\[nan\]\): a nan or inf violation would make"),
    ("predict returns the output alone", "predict=lambda m, b: m(b[0])",
     r"problem 'mine': predict\(model, batch\) must return \(output, y\), two tensors the metric compares, got a "
     r"Tensor$"),
    ("model(options) returns None", "model=lambda o: None",
     r"problem 'mine': model\(options\) must return an nn.Module, got a NoneType$"),
    ("data returns an iterable dataset", "data=lambda o: (Stream(), data(o)[1])",
     r"problem 'mine': data\(options\) returned a train set without a length \(Stream\): the runner"),
    ("a constraint name with a slash", "constraints={'a/b': UserConstraint(lambda m: m[0].weight.norm() - 1)}",
     r"^error: problem 'mine': constraint name 'a/b' has a '/'"),
    ("a constraint named like an attribute", "constraints={'model': UserConstraint(lambda m: m[0].weight.norm() - 1)}",
     r"^error: problem 'mine': constraint name 'model' is taken by SparsityProblem.model: choose another$"),
    ("BatchNorm on a last batch of one sample",
     "model=lambda o: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)), batch_size=191",
     r"model\(x\) failed: Expected more than 1 value per channel when training, got input size .* \(a training "
     r"batch of 1 sample: an epoch's last batch holds 1 when the training set is 1 more than a multiple of batch_size"),
    ("a training item that fails", "data=lambda o: (Labelled(data(o)[0]), data(o)[1])",
     r"problem 'mine': reading item \d+ of the training set failed: KeyError: 'label' \(--debug shows the "
     r"traceback\)$"),
    ("a test item that fails", "data=lambda o: (data(o)[0], Labelled(data(o)[1]))",
     r"problem 'mine': reading item 0 of the test set failed: KeyError: 'label' \(--debug shows the traceback\)$"),
    ("samples of different sizes", "data=lambda o: (Ragged(data(o)[0]), data(o)[1])",
     r"problem 'mine': batching samples of the training set \(default_collate\) failed: RuntimeError: stack expects "
     r"each tensor to be equal size"),
    ("a metric of nan", "metric=lambda o, y: float('nan')",
     r"error: metric 'metric' returned nan over the test set: it must be a number$"),
    ("nan in the test inputs", "data=lambda o: (data(o)[0], TensorDataset(torch.full((8, 8), torch.nan), "
     "torch.zeros(8, dtype=torch.long)))",
     r"problem 'mine': 16 of the model's 16 outputs on the test set are nan \(from nan in the test set's inputs, or "
     r"in the model\)$"),
    ("nan in the training inputs", "data=lambda o: (TensorDataset(torch.full((64, 8), torch.nan), "
     "torch.zeros(64, dtype=torch.long)), data(o)[1])",
     r"dense pre-training loss became nan in epoch 1; nothing was cached \(lower --set lr, or check the training "
     r"set for nan/inf\)$"),
    ("an option named like a runner key", "options={'lr': 0.1}",
     r"the problem's option 'lr' has the name of a training --set key for formulation 'slr' and problem 'mine', so"),
]  # fmt: skip


def _file(tmp_path, fields):
    path = tmp_path / "mine.py"
    path.write_text(BASE.replace("FIELDS = dict()", f"FIELDS = dict({fields})"))
    return str(path)


@pytest.mark.parametrize(("name", "fields", "message"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_in_a_problem_file_is_one_line(name, fields, message, tmp_path, capsys):
    out = tmp_path / "run"
    line = fails_with_one_line(["run", _file(tmp_path, fields), "--out", str(out), *FAST], capsys)
    assert re.search(message, line), line
    assert not out.exists() or not any(p.name == "summary.json" for p in out.iterdir())


def test_a_lambda_metric_is_named_metric_and_a_run_directory_plots(tmp_path, capsys):
    out = tmp_path / "run"
    fields = "metric=lambda o, y: float((o.argmax(1) == y).float().mean())"
    assert main(["run", _file(tmp_path, fields), "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["dense_metric"] <= 1 and "hardprune_metric" in summary
    capsys.readouterr()
    (out / "metrics.png").unlink()
    assert main(["plot", str(out)]) == 0  # the run directory stands for its metrics.jsonl
    assert (out / "metrics.png").is_file()


def test_ctrl_c_is_one_line_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import constrainedsparse.cli as cli

    def interrupted(args, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    out = tmp_path / "run"
    assert cli.main(["run", "digits-mlp", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted before the first checkpoint: nothing to resume, start the run again"
    ]
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")  # a checkpoint was written: resume it
    assert cli.main(["run", "digits-mlp", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted; continue from the last checkpoint with --resume --out {out}"
    ]


def test_ctrl_c_without_out_names_the_default_run_directory(tmp_path, capsys, monkeypatch):
    import constrainedsparse.cli as cli

    def interrupted(config, problem):
        (config.out / "checkpoint.pt").parent.mkdir(parents=True)
        (config.out / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "execute", interrupted)
    assert cli.main(["run", "digits-mlp", "--wandb", "disabled"]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "interrupted; continue from the last checkpoint with --resume --out runs/digits-mlp-slr"


def test_plot_of_an_empty_metrics_file_is_one_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    line = fails_with_one_line(["plot", str(tmp_path)], capsys)
    assert (
        line.endswith("metrics.jsonl' holds no rows yet: nothing to plot") and not (tmp_path / "metrics.png").exists()
    )


@pytest.mark.parametrize("name", ["", "../up", "a/b"])
def test_a_problem_name_that_cannot_name_a_cache_file_is_refused_at_load(name, tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(BASE.replace('name="mine"', f"name={name!r}"))
    line = fails_with_one_line(["run", str(path), "--out", str(tmp_path / "run"), *FAST], capsys)
    assert line.endswith(f"Problem.name must be a non-empty name without '/' (it names the run and the dense-model "
                         f"cache file), got {name!r}")  # fmt: skip


def test_a_constraint_with_the_name_of_one_the_formulation_registers_is_one_line_before_pretraining(tmp_path, capsys):
    fields = "constraints={'l0_density': UserConstraint(lambda m: m[0].weight.norm() - 1)}, pretrain_epochs=50"
    args = ["run", _file(tmp_path, fields), "--formulation", "l0", "--out", str(tmp_path / "run"), "--epochs", "1",
            "--wandb", "disabled", "--no-progress"]  # fmt: skip
    assert fails_with_one_line(args, capsys) == (
        "error: problem 'mine': constraint 'l0_density' has the name of one that formulation 'l0' registers: give "
        "yours another name"
    )
    assert not (tmp_path / "run").exists()


def test_predict_may_return_a_list(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", _file(tmp_path, "predict=lambda m, b: [m(b[0]), b[1]]"), "--out", str(out), *FAST]) == 0
    assert "dense_accuracy" in json.loads((out / "summary.json").read_text())


def test_an_error_after_a_checkpoint_says_it_is_kept_and_how_to_go_on(tmp_path, capsys):
    out = tmp_path / "run"
    path = _file(tmp_path, "constraints={'late': UserConstraint(fails_late)}")
    line = fails_with_one_line(["run", path, "--out", str(out), *FAST, "--epochs", "10"], capsys)
    assert line == (
        "error: problem 'mine': constraint 'late' failed: RuntimeError: late failure (--debug shows the traceback) "
        f"(the last checkpoint is kept: once that is fixed, continue with --resume --out {out})"
    )
    assert (out / "checkpoint.pt").is_file()
    refused = fails_with_one_line(["run", "--out", str(out), "--resume", "--set", "rho=0.5", "--no-progress"], capsys)
    assert "checkpoint is kept" not in refused  # a refused option: this command wrote no checkpoint
    line = fails_with_one_line(["run", _file(tmp_path, "metric=lambda o, y: 'good'"), "--out", str(tmp_path / "b"),
                                *FAST], capsys)  # fmt: skip
    assert line.endswith("got 'good'")  # an error before any checkpoint: nothing to say of one


def test_masked_logits_and_an_infinite_metric_are_results_not_errors(tmp_path, capsys):
    # -inf marks a masked class; inf is a perplexity that overflowed: only nan means nothing
    out = tmp_path / "run"
    fields = "model=lambda o: MaskedThird(), metric=lambda o, y: float('inf') if o.shape[1] == 3 else 0.0"
    assert main(["run", _file(tmp_path, fields), "--out", str(out), *FAST]) == 0
    assert json.loads((out / "summary.json").read_text())["dense_metric"] == float("inf")


def test_a_problems_datasets_are_its_own_objects(tmp_path):
    # the runner reads them through GuardedDataset; Problem.datasets gives a user what data(options) returned
    from constrainedsparse.spec import load_problem

    train, test = load_problem(_file(tmp_path, "")).datasets({})
    assert type(train).__name__ == type(test).__name__ == "TensorDataset" and len(test.tensors) == 2


def test_a_syntax_error_in_a_module_the_file_imports_names_the_files_import_line(tmp_path, capsys):
    (tmp_path / "helper_bad.py").write_text("x = 1\n\n\ndef broken(:\n")
    path = tmp_path / "mine.py"
    path.write_text("import sys\nsys.path.insert(0, __file__.rsplit('/', 1)[0])\nimport helper_bad\n")
    line = fails_with_one_line(["run", str(path), "--out", str(tmp_path / "run")], capsys)
    assert "failed to load at line 3: SyntaxError: " in line and "helper_bad.py, line 4" in line
