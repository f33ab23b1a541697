"""Results a person can trust: whole-model figures, constraints reported and guarded, metrics by name, plots, wandb."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import fails_with_one_line
from safetensors.torch import load_file
from torch import nn

from constrainedsparse import RunConfig, run
from constrainedsparse.cli import main
from constrainedsparse.logger import read_metrics
from constrainedsparse.plots import figure_for
from constrainedsparse.report import model_figures
from constrainedsparse.spec import load_problem

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = Path(__file__).parent / "problems"


def test_model_figures_of_a_hand_set_model():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]]))
        model[0].bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
        model[1].weight.copy_(torch.tensor([[0.0, 5, 0], [0, 0, 6]]))
    figures = model_figures(model, ["0.weight", "1.weight"])
    assert figures["parameters"] == {"total": 12 + 3 + 6, "nonzero": 3 + 2 + 2}
    assert figures["model_sparsity"] == pytest.approx(1 - 7 / 21)
    # dense: 21 float32; sparse: pruned tensors as nonzero values + one bit per entry, the bias dense
    assert figures["bytes"] == {"dense": 21 * 4, "sparse": (3 * 4 + 2) + 3 * 4 + (2 * 4 + 1)}


def test_summary_reports_whole_model_figures_and_the_constraint_as_measured_on_the_final_model(tmp_path, capsys):
    out = tmp_path / "cancer"
    args = ["run", str(ROOT / "problems" / "breast_cancer.py"), "--formulation", "slr", "--sparsity", "0.8",
            "--pretrain-epochs", "5", "--epochs", "2", "--retrain-epochs", "1", "--out", str(out), "--wandb",
            "disabled", "--no-progress", "--verbose"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "model sparsity" in printed and "constraint miss_rate" in printed and "hidden.weight" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["total"] == 30 * 64 + 64 + 64 * 2 + 2
    assert summary["model_sparsity"] < summary["achieved_sparsity"]
    entry = summary["constraints"]["miss_rate"]
    assert set(entry) == {"value", "satisfied", "multiplier", "sense"}
    # The value is the constraint on the final model over the whole test set, evaluated anew here.
    problem = load_problem(str(ROOT / "problems" / "breast_cancer.py"))
    model = problem.model(problem.options)
    model.load_state_dict(load_file(out / "model.safetensors"))
    model.eval()
    _, test = problem.data(problem.options)
    with torch.no_grad():
        direct = float(problem.constraints["miss_rate"].fn(model, test[:]))
    assert entry["value"] == pytest.approx(direct, abs=1e-6)
    assert entry["satisfied"] == (direct <= 0)
    # The plot's constraint row marks that value at the end: the training line follows slr's dense W.
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["final_violation/miss_rate"] == entry["value"] and "accuracy/final" in last
    from constrainedsparse.plots import figure_for, metrics_rows

    panel = next(a for a in figure_for(metrics_rows(out)[1]).axes if a.get_title().startswith("miss_rate: violation"))
    (star,) = [line for line in panel.get_lines() if line.get_label().startswith("final model")]
    assert list(star.get_ydata()) == [entry["value"]] and star.get_label() == f"final model {entry['value']:.4g}"
    assert {k: last[f"final_density/{k}"] for k in summary["layer_sparsity"]} == {
        k: 1.0 - v for k, v in summary["layer_sparsity"].items()
    }
    density = next(a for a in figure_for(metrics_rows(out)[1]).axes if a.get_title() == "density per pruned tensor")
    stars = [line for line in density.get_lines() if line.get_marker() == "*" and len(line.get_xdata())]
    assert sorted(float(s.get_ydata()[0]) for s in stars) == sorted(1.0 - v for v in summary["layer_sparsity"].values())
    assert "saved model" in [t.get_text() for t in density.get_legend().get_texts()]
    rows = (out / "layers.csv").read_text().splitlines()
    assert rows[0] == "name,shape,parameters,nonzero,sparsity" and rows[1].startswith("hidden.weight,64x30,1920,")


def test_the_printed_summary_formats_metrics_sizes_and_the_layer_table_as_asked(tmp_path, capsys):
    from constrainedsparse.summary_text import print_summary, summary_rows

    run = {"problem": "p", "formulation": "slr", "achieved_sparsity": 0.5, "seconds": 1.0,
           "parameters": {"total": 10, "nonzero": 5}, "model_sparsity": 0.5,
           "bytes": {"dense": 2**20, "sparse": 1023}, "metric": {"name": "accuracy"}, "dense_accuracy": 0.9,
           "expected_density": 0.515, "target_density": 0.5}  # fmt: skip
    rows = dict(summary_rows(run))
    assert rows["dense accuracy"] == "90.00 %"
    assert rows["size"] == "1.00 MiB dense, 1.0 KiB stored sparse (values + bitmask)"
    assert rows["l0 gates"] == "expected density 0.5150, target 0.5000"  # within 0.02: no note
    far = dict(summary_rows({**run, "expected_density": 0.53}))["l0 gates"]
    assert far.endswith("(more than 0.02 apart: the hard prune set the level)")
    r2 = dict(summary_rows({**run, "metric": {"name": "r2"}, "dense_r2": 0.9}))
    assert r2["dense r2"] == "0.9000"
    (tmp_path / "layers.csv").write_text("name,shape,parameters,nonzero,sparsity\nfc.weight,4x4,16,8,0.5\n")
    print_summary(run, tmp_path, verbose=False)
    assert "fc.weight" not in capsys.readouterr().out
    print_summary(run, tmp_path, verbose=True)
    printed = capsys.readouterr().out
    assert "  layer" in printed and "fc.weight" in printed and "0.5000" in printed


def test_the_final_violation_plotted_is_reduced_as_the_training_line_is():
    from constrainedsparse.report import final_violations

    report = {
        "eq": {"value": [-0.5, 0.2], "sense": "=="},
        "nan": {"value": None, "sense": "<="},
        "le": {"value": [-1.0, -3.0], "sense": "<="},
        "one": {"value": 0.25, "sense": "<="},
    }
    assert final_violations(report) == {"eq": pytest.approx(math.sqrt(0.29)), "le": -1.0, "one": 0.25}


def test_the_printed_constraint_line_shows_the_deciding_entry_and_a_vectors_multipliers():
    from constrainedsparse.summary_text import summary_rows

    def line(value, sense, multiplier, satisfied):
        entry = {"value": value, "sense": sense, "multiplier": multiplier, "satisfied": satisfied}
        run = {"problem": "p", "formulation": "slr", "pattern": "unstructured", "achieved_sparsity": 0.5}
        return dict(summary_rows({**run, "constraints": {"c": entry}, "seconds": 1.0}))["constraint c"]

    assert line(0.5, "<=", 2.0, False) == "0.5 <= 0: VIOLATED (multiplier 2)"
    assert line([-0.5, -2.0], "<=", [0.0, 0.0], True) == "max -0.5 <= 0: holds (multipliers' norm 0)"
    # an equality's deciding entry is the largest in size, whatever its sign
    assert line([-0.5, -2e-5], "==", [3.0, 4.0], False) == "max |entry| 0.5 == 0: VIOLATED (multipliers' norm 5)"


def test_an_emptied_layer_stops_the_run_and_can_be_allowed(tmp_path, capsys):
    out = tmp_path / "empty"
    args = ["run", str(PROBLEMS / "zero_layer.py"), "--formulation", "magnitude", "--sparsity", "0.5", "--epochs",
            "1", "--pretrain-epochs", "0", "--retrain-epochs", "1", "--wandb", "disabled", "--no-progress"]  # fmt: skip
    line = fails_with_one_line([*args, "--out", str(out)], capsys)
    assert line.startswith("error: hard pruning left 0.weight without a single weight")
    assert "--set allow_empty_layers=true" in line and (out / "checkpoint.pt").is_file()
    assert not (out / "summary.json").exists()
    assert main([*args, "--out", str(tmp_path / "allowed"), "--set", "allow_empty_layers=true"]) == 0
    assert json.loads((tmp_path / "allowed" / "summary.json").read_text())["layer_sparsity"]["0.weight"] == 1.0


def test_a_level_that_keeps_no_weight_is_refused_before_any_work(tmp_path, capsys):
    line = fails_with_one_line(["run", "--sparsity", "0.99999999", "--out", str(tmp_path / "x")], capsys)
    assert line.startswith("error: --sparsity 0.99999999 keeps no weight of 0.weight (16384 weights)")
    assert not (tmp_path / "x").exists()


def test_r2_of_targets_that_do_not_vary_is_refused_not_nan():
    """A one-sample test set gave R² = nan, printed and written to summary.json as a figure."""
    from constrainedsparse.errors import UserInputError
    from constrainedsparse.metrics import R2

    with pytest.raises(UserInputError, match=r"^metric 'r2': the 1 test targets do not vary, so R² is undefined"):
        R2(torch.tensor([[0.3]]), torch.tensor([1.0]))
    assert R2(torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 3.0])) == pytest.approx(0.5)


def test_a_regression_problem_reports_r2_equal_to_sklearn(tmp_path):
    from sklearn.metrics import r2_score

    problem_file = str(ROOT / "problems" / "diabetes.py")
    summary = run(RunConfig(problem=problem_file, formulation="magnitude", sparsity=0.5, epochs=2, pretrain_epochs=5,
                            out=tmp_path / "r2", progress=False))  # fmt: skip
    assert summary["metric"] == {"name": "r2", "higher_is_better": True}
    assert "dense_accuracy" not in summary and {"dense_r2", "hardprune_r2"} <= set(summary)
    problem = load_problem(problem_file)
    model = problem.model(problem.options)
    model.load_state_dict(load_file(tmp_path / "r2" / "model.safetensors"))
    _, test = problem.data(problem.options)
    x, y = test[:]
    with torch.no_grad():
        prediction = model(x).squeeze(-1)
    assert summary["hardprune_r2"] == pytest.approx(r2_score(y.numpy(), prediction.numpy()), abs=1e-6)


def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.axison]


def test_training_plot_lays_one_row_per_constraint_and_step_sizes_on_a_log_axis(tmp_path):
    summary = run(RunConfig(problem=str(PROBLEMS / "digits_budget.py"), formulation="slr", sparsity=0.8, epochs=2,
                            pretrain_epochs=3, out=tmp_path / "p", progress=False))  # fmt: skip
    assert summary is not None
    fig = figure_for(read_metrics(tmp_path / "p" / "metrics.jsonl"))
    titles = _titles(fig)
    assert titles[:2] == ["test accuracy", "training loss"]
    violation = "budget: violation\n(<= 0 holds; an equality: = 0)"
    assert titles[2:4] == [violation, "budget: multiplier"]
    steps = next(ax for ax in fig.axes if ax.get_title() == "dual step sizes s, s' (log scale)")
    assert steps.get_yscale() == "log" and "alpha^k" in titles
    violation = fig.axes[[ax.get_title() for ax in fig.axes].index(titles[2])]
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in violation.get_lines())  # the zero line
    metric = fig.axes[0]
    labels = [line.get_label() for line in metric.get_lines()]
    assert any(label.startswith("dense ") for label in labels)
    marks = [line for line in metric.get_lines() if line.get_linestyle() == ":" and line.get_color() == "tab:red"]
    assert len(marks) == 1  # the hard prune's dotted line
    assert fig._suptitle.get_text().endswith("dotted lines: green: pruning starts, red: hard prune")  # one legend
    assert (tmp_path / "p" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_layerwise_plot_has_bars_per_layer_labelled_by_name(tmp_path, tiny_llama):
    run(RunConfig(problem="hf-causal-lm", formulation="wanda", sparsity=0.5, out=tmp_path / "lw", progress=False,
                  settings={"model": str(tiny_llama), "calibration_samples": "4", "seq_len": "16",
                            "held_out_samples": "2"}))  # fmt: skip
    fig = figure_for(read_metrics(tmp_path / "lw" / "metrics.jsonl"))
    assert _titles(fig)[0].startswith("relative layer error") and _titles(fig)[1] == "layer sparsity"
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "self_attn.q_proj" in ticks and len(ticks) == 14
    assert not any(title.startswith("relative block error") for title in _titles(fig))  # no block steps ran


def test_layerwise_plot_shows_the_block_errors_of_the_block_steps(tmp_path, tiny_llama):
    run(RunConfig(problem="hf-causal-lm", formulation="wanda", sparsity=0.5, out=tmp_path / "lw", progress=False,
                  settings={"model": str(tiny_llama), "calibration_samples": "4", "seq_len": "16",
                            "held_out_samples": "2", "block_mask_rounds": "1", "block_fit_epochs": "2"}))  # fmt: skip
    fig = figure_for(read_metrics(tmp_path / "lw" / "metrics.jsonl"))
    panel = fig.axes[-1]
    assert panel.get_title().startswith("relative block error")
    lines = {line.get_label(): list(line.get_ydata()) for line in panel.get_lines()}
    assert set(lines) == {"pruned", "after the mask search", "after the refit"}
    assert all(len(values) == 2 for values in lines.values())  # the tiny LLaMA's two blocks
    assert all(a > b for a, b in zip(lines["after the mask search"], lines["after the refit"]))


def test_wandb_offline_run_carries_the_summary_and_the_cli_says_where(tmp_path, capsys, monkeypatch):
    from wandb_records import summary_values, wait_for_complete_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "w"
    args = ["run", "digits-mlp", "--formulation", "magnitude", "--sparsity", "0.5", "--epochs", "1",
            "--pretrain-epochs", "3", "--out", str(out), "--wandb", "offline", "--wandb-project", "mine",
            "--wandb-name", "first", "--wandb-tags", "a,b", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wandb offline run" in printed and "wandb sync" in printed
    values = summary_values(wait_for_complete_run(out))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("achieved_sparsity", "model_sparsity", "hardprune_accuracy", "dense_accuracy"):
        assert values[key] == pytest.approx(summary[key]), key
    assert values["layer_sparsity"] == summary["layer_sparsity"]
    assert sys.modules.get("wandb") is not None


def test_the_wandb_config_holds_the_problems_options_with_the_run_settings(tmp_path):
    """A problem's options (a constraint's budget, ...) are what a user groups and filters wandb runs by."""
    from wandb_records import read_records, wait_for_complete_run

    out = tmp_path / "w"
    problem = Path(__file__).parent / "problems" / "nan_after.py"
    assert main(["run", str(problem), "--formulation", "magnitude", "--set", "nan_after=100000", "--epochs", "1",
                 "--pretrain-epochs", "0", "--out", str(out), "--wandb", "offline", "--no-progress"]) == 0  # fmt: skip
    (run,) = [r.run for r in read_records(wait_for_complete_run(out)) if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["options"] == {"nan_after": 100000}  # nested: an option named like a run field stays apart
    assert config["formulation"] == "magnitude" and config["schedule"] == "cubic"


def test_a_plot_says_which_run_it_is_and_counts_steps_in_whole_numbers(tmp_path):
    from matplotlib.ticker import MaxNLocator

    from constrainedsparse.plots import run_title

    rows = [{"step": 0, "accuracy/dense": 0.9}, {"step": 1, "loss/train": 0.5, "accuracy/test": 0.8},
            {"step": 3, "loss/train": 0.4, "accuracy/hardprune": 0.7}]  # fmt: skip
    title = run_title({"problem": "digits-mlp", "formulation": "slr", "target_sparsity": 0.9})
    fig = figure_for(rows, title)
    assert fig._suptitle.get_text().splitlines()[0] == "digits-mlp / slr / sparsity 0.9"
    locators = [ax.xaxis.get_major_locator() for ax in fig.axes if ax.axison]
    assert all(isinstance(locator, MaxNLocator) and locator._integer for locator in locators)  # no 2.5 steps
    assert run_title({"problem": "minilm-layerwise", "formulation": "fw", "pattern": "2:4"}) == (
        "minilm-layerwise / fw / pattern 2:4"
    )
    assert run_title(None) is None and run_title({}) is None


def test_an_llms_layerwise_plot_draws_a_line_per_layer_kind_over_the_blocks():
    """30 blocks of 7 layers: a bar per layer would be 6 px wide (a 5880 px figure); lines per kind stay readable."""
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj", "o", "v"]
    rows = [
        {
            **{f"layer_error/model.layers.{b}.{k}.weight": 0.01 * (i + 1) + 0.001 * b for b in range(30)
               for i, k in enumerate(kinds)},
            **{f"layer_sparsity/model.layers.{b}.{k}.weight": 0.5 + 1e-5 * (b % 3) for b in range(30) for k in kinds},
            "layer_error/lm_head.weight": 0.2,
            "layer_sparsity/lm_head.weight": 0.5,
        }
    ]  # fmt: skip
    fig = figure_for(rows)
    errors, sparsity = fig.axes[0], fig.axes[1]
    lines = {line.get_label(): list(line.get_ydata()) for line in errors.get_lines()}
    assert list(lines) == kinds and all(len(values) == 30 for values in lines.values())
    assert lines["mlp.down_proj"][4] == pytest.approx(0.03 + 0.004)
    assert errors.get_title().endswith("; not in a block: lm_head")
    assert len(errors.get_xticklabels()) <= 30 and errors.get_xlabel().startswith("block")
    assert sparsity.get_ylim() == (0.0, 1.0)  # 0.50001 is not drawn as a jump
    assert fig.get_figwidth() == 14
    few = figure_for([{k: v for k, v in rows[0].items() if ".layers.0." in k or ".layers.1." in k}])
    assert [t.get_text() for t in few.axes[0].get_xticklabels()][:2] == ["self_attn.q_proj", "self_attn.k_proj"]


def test_the_fw_trace_panel_draws_each_layers_objective_relative_to_its_start():
    rows = _layer_rows(["blocks.0.fc.weight", "blocks.1.fc.weight"])
    rows += [{"trace/layer": layer, "trace/objective": value} for layer, values in ((0, [4.0, 2.0, 1.0]),
             (1, [10.0, 5.0])) for value in values]  # fmt: skip
    panel = figure_for(rows).axes[2]
    assert panel.get_ylabel() == "objective / start"
    assert [list(line.get_ydata()) for line in panel.get_lines()] == [[1.0, 0.5, 0.25], [1.0, 0.5]]


def _layer_rows(names):
    return [
        {**{f"layer_error/{n}": 0.01 * i for i, n in enumerate(names)}, **{f"layer_sparsity/{n}": 0.5 for n in names}}
    ]


def test_the_line_view_keeps_block_order_breaks_between_stacks_and_falls_back_to_bars():
    # Sorted names (0, 1, 10, 11, 2, ...) are drawn in block order; an encoder and a decoder are two stacks.
    names = sorted(f"{stack}.layer.{b}.{k}.weight" for stack in ("encoder", "decoder") for b in range(12)
                   for k in ("attn.q", "attn.k", "mlp.fc"))  # fmt: skip
    ax = figure_for(_layer_rows(names)).axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[:3] == ["decoder.0", "decoder.1", "decoder.2"] and ticks[12:14] == ["encoder.0", "encoder.1"]
    segments = [list(line.get_xdata()) for line in ax.get_lines()]
    assert len(segments) == 6 and sorted(len(s) for s in segments) == [12] * 6  # three kinds x two stacks
    assert [line.get_label() for line in ax.get_lines()].count("attn.q") == 1  # one legend entry a kind
    # No numbered blocks, or one block of many kinds (experts): bars, as for few layers.
    flat = figure_for(_layer_rows([f"layer_{i}.weight" for i in range(70)])).axes[0]
    experts = figure_for(_layer_rows([f"blocks.0.expert{e}.w{j}.weight" for e in range(24) for j in range(3)])).axes[0]
    bart = sorted(f"model.{stack}.layers.{b}.{k}.weight" for stack in ("encoder", "decoder") for b in range(12)
                  for k in ("q", "k", "fc"))  # fmt: skip
    labels = [t.get_text() for t in figure_for(_layer_rows(bart)).axes[0].get_xticklabels()]
    assert labels[0] == "decoder.0" and labels[12] == "encoder.0"  # not "model.0" twice
    for ax in (flat, experts):
        assert ax.get_title().endswith("(blocks alternate)") and len(ax.patches) in (70, 72)
