"""End-to-end runs through the engine and the CLI on real data (digits)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from constrainedsparse import RunConfig, run
from constrainedsparse.cli import main
from constrainedsparse.engine import NonFiniteLossError

PROBLEMS = Path(__file__).parent / "problems"
FAST = {"pretrain_epochs": 3, "progress": False, "wandb": "disabled"}


def _zero_masks(path: Path) -> dict[str, torch.Tensor]:
    weights = load_file(path)
    return {k: v != 0 for k, v in weights.items() if k.endswith("weight")}


def test_cli_magnitude_end_to_end(tmp_path, capsys):
    out = tmp_path / "a"
    code = main(
        ["run", "digits-mlp", "--formulation", "magnitude", "--sparsity", "0.9", "--epochs", "3",
         "--retrain-epochs", "2", "--pretrain-epochs", "3", "--out", str(out), "--wandb", "disabled",
         "--no-progress"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem"] == "digits-mlp" and summary["formulation"] == "magnitude"
    assert summary["target_sparsity"] == 0.9
    assert summary["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert set(summary["layer_sparsity"]) == {"0.weight", "2.weight", "4.weight"}
    for value in summary["layer_sparsity"].values():
        assert value == pytest.approx(0.9, abs=1e-3)
    for key in ("dense_accuracy", "hardprune_accuracy", "retrain_accuracy", "seconds", "epochs"):
        assert key in summary
    assert summary["dense_accuracy"] > 0.8
    weights = load_file(out / "model.safetensors")
    for name in summary["layer_sparsity"]:
        zeros = (weights[name] == 0).float().mean().item()
        assert zeros == pytest.approx(summary["layer_sparsity"][name])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/train" in r for r in rows) and any("density/0.weight" in r for r in rows)
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "hardprune accuracy" in printed and "retrain accuracy" in printed


def test_dense_model_is_cached(tmp_path):
    from constrainedsparse.engine import cache_dir

    config = RunConfig(formulation="magnitude", sparsity=0.5, epochs=0, seed=7, out=tmp_path / "a", **FAST)
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    try:  # the run that trains the cached model on other threads than the run that loads it
        torch.set_num_threads(other)
        run(config)
    finally:
        torch.set_num_threads(threads)
    cached = list((cache_dir() / "dense").glob("digits-mlp-*-seed7-pre3.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert first["dense_cache"] == {"file": str(cached[0]), "loaded": False, "threads": other, "processes": 1}
    run(RunConfig(formulation="magnitude", sparsity=0.5, epochs=0, seed=7, out=tmp_path / "b", **FAST))
    assert cached[0].stat().st_mtime_ns == stamp
    second = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert first["dense_accuracy"] == second["dense_accuracy"]
    # the threads that trained the dense model, which this run's own threads do not tell (its last digits)
    assert second["dense_cache"] == {"file": str(cached[0]), "loaded": True, "threads": other, "processes": 1}
    # What reproduces the run: every setting in effect (defaults too), the versions and threads it ran with.
    assert second["effective_settings"]["lr"] == "0.001" and second["effective_settings"]["schedule"] == "cubic"
    assert second["versions"]["torch"] == torch.__version__ and second["threads"] == torch.get_num_threads()
    assert second["processes"] == 1


def test_the_dense_cache_key_is_the_same_on_other_threads():
    # A run resumed on other threads (or with another --nproc, which sets each worker's) finds its dense model.
    from constrainedsparse.dense import DenseRecipe, dense_cache_path
    from constrainedsparse.spec import load_problem

    problem = load_problem("digits-mlp")
    recipe = DenseRecipe(problem, dict(problem.options), 1e-3, 64, "cpu", 0, 3, False)
    threads = torch.get_num_threads()
    try:
        paths = set()
        for count in (1, 2):
            torch.set_num_threads(count)
            paths.add(dense_cache_path(recipe))
    finally:
        torch.set_num_threads(threads)
    assert len(paths) == 1


def test_every_field_that_shapes_the_dense_model_changes_its_cache_file():
    # A problem option (a width, a data subset), the batch size, lr, the device kind, the seed or the epochs
    # trained each give another dense model: a stale cache file must never be read for it.
    import dataclasses

    from constrainedsparse.dense import DenseRecipe, dense_cache_path
    from constrainedsparse.spec import load_problem

    problem = load_problem("digits-mlp")
    recipe = DenseRecipe(problem, dict(problem.options), 1e-3, 64, "cpu", 0, 3, False)
    changes = {
        "options": {**problem.options, "hidden": 128},
        "lr": 2e-3,
        "batch_size": 32,
        "device": "meta",
        "seed": 1,
        "pretrain_epochs": 4,
    }
    base = dense_cache_path(recipe)
    for field, value in changes.items():
        assert dense_cache_path(dataclasses.replace(recipe, **{field: value})) != base, field
    assert dense_cache_path(dataclasses.replace(recipe, progress=True)) == base


def test_version_flag_prints_the_version(capsys):
    from constrainedsparse import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"constrainedsparse {__version__}\n"


def test_one_shot_magnitude_matches_projection_of_dense_weights(tmp_path):
    from constrainedsparse.engine import cache_dir

    run(RunConfig(formulation="magnitude", sparsity=0.8, epochs=0, seed=3, out=tmp_path / "a", **FAST))
    dense = load_file(next((cache_dir() / "dense").glob("digits-mlp-*-seed3-pre3.safetensors")))
    pruned = load_file(tmp_path / "a" / "model.safetensors")
    for name in ("0.weight", "2.weight", "4.weight"):
        w = dense[name]
        k = round(0.2 * w.numel())
        threshold = w.abs().flatten().kthvalue(w.numel() - k + 1).values
        assert torch.equal(pruned[name], w * (w.abs() >= threshold))


@pytest.mark.parametrize("stop_phase_epochs", [1, 4])
def test_resume_matches_uninterrupted_run(tmp_path, stop_phase_epochs):
    common = dict(formulation="magnitude", sparsity=0.9, epochs=3, retrain_epochs=2, seed=1, **FAST)
    full = run(RunConfig(out=tmp_path / "full", **common))
    assert run(RunConfig(out=tmp_path / "cut", stop_after_epochs=stop_phase_epochs, **common)) is None
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run(RunConfig(out=tmp_path / "cut", resume=True, **common))
    for key in ("achieved_sparsity", "layer_sparsity", "dense_accuracy", "hardprune_accuracy", "retrain_accuracy"):
        assert resumed[key] == full[key], key
    full_masks = _zero_masks(tmp_path / "full" / "model.safetensors")
    cut_masks = _zero_masks(tmp_path / "cut" / "model.safetensors")
    assert full_masks.keys() == cut_masks.keys()
    for name in full_masks:
        assert torch.equal(full_masks[name], cut_masks[name])
    full_steps = [json.loads(x)["step"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut_steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert full_steps == cut_steps


def test_resume_after_metrics_jsonl_was_deleted_warns(tmp_path):
    common = dict(formulation="magnitude", sparsity=0.9, epochs=2, retrain_epochs=0, seed=1, **FAST)
    assert run(RunConfig(out=tmp_path / "cut", stop_after_epochs=1, **common)) is None
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    with pytest.warns(UserWarning, match=r"metrics.jsonl is empty, but it held rows up to step \d+"):
        run(RunConfig(out=tmp_path / "cut", resume=True, **common))


def test_resume_rejects_a_checkpoint_of_another_run(tmp_path):
    common = dict(formulation="magnitude", epochs=2, seed=1, **FAST)
    run(RunConfig(out=tmp_path / "a", sparsity=0.9, stop_after_epochs=1, **common))
    with pytest.raises(
        ValueError,
        match=r"^--resume: the run in .* was started with other options: sparsity \(0\.5, stored 0\.9\); give",
    ):
        run(RunConfig(out=tmp_path / "a", sparsity=0.5, resume=True, **common))
    # a value bad in itself is named as such, before the comparison (it read 'started with other options')
    with pytest.raises(ValueError, match=r"^--set lr='abc' must be a float$"):
        run(RunConfig(out=tmp_path / "a", sparsity=0.9, resume=True, settings={"lr": "abc"}, **common))
    # another formulation or problem is the difference itself: the stored keys are not its to check
    run(RunConfig(out=tmp_path / "b", sparsity=0.9, settings={"schedule": "oneshot"}, stop_after_epochs=1, **common))
    for other, message in (
        ({"formulation": "admm"}, r"formulation \('admm', stored 'magnitude'\)"),
        ({"problem": "smollm2-wiki"}, r"problem \('smollm2-wiki', stored 'digits-mlp'\)"),
    ):
        with pytest.raises(ValueError, match=rf"^--resume: the run in .* was started with other options: {message}"):
            run(RunConfig(out=tmp_path / "b", sparsity=0.9, resume=True, **{**common, **other}))


def test_a_python_resume_needs_only_the_folder(tmp_path):
    """As --resume alone on the command line: the options at their defaults are the checkpoint's (they used to be
    compared with it, so every option of the run had to be given again)."""
    common = dict(formulation="magnitude", sparsity=0.8, epochs=2, seed=1, **FAST)
    full = run(RunConfig(out=tmp_path / "full", **common))
    assert run(RunConfig(out=tmp_path / "cut", stop_after_epochs=1, **common)) is None
    resumed = run(RunConfig(out=tmp_path / "cut", resume=True))
    for key in ("achieved_sparsity", "layer_sparsity", "dense_accuracy", "hardprune_accuracy", "effective_settings"):
        assert resumed[key] == full[key], key


def test_user_problem_file_by_path_and_nan_loss_keeps_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    problem_file = str(PROBLEMS / "nan_after.py")
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 7 \(prune epoch 2\)"):
        run(
            RunConfig(
                problem=problem_file, formulation="magnitude", sparsity=0.5, out=out, **{**FAST, "pretrain_epochs": 0}
            )
        )
    assert (out / "checkpoint.pt").is_file()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 4
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("param", ["bias", "weight"])
def test_parameters_a_last_step_made_non_finite_stop_the_run_before_its_checkpoint(tmp_path, param):
    """The loss is computed before the update: a NaN gradient on an epoch's last step (a bias, not a target, or a
    target's weight) went into the checkpoint called 'last good', and on the last epoch into the saved model, with
    exit 0. A target is named as the run names it, with the checkpoint kept and the epoch counted from 1."""
    out = tmp_path / "nan"
    config = RunConfig(problem=str(PROBLEMS / "nan_grad_bias.py"), formulation="magnitude", sparsity=0.5, out=out,
                       settings={"param": param}, **{**FAST, "pretrain_epochs": 0})  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=rf"^2\.{param} became NaN or inf by the end of prune epoch 2 \(step "
                       r"8\); training stopped, the last good checkpoint is .*checkpoint\.pt$"):  # fmt: skip
        run(config)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_cli_run_with_offline_wandb_logs_the_same_rows_as_the_jsonl(tmp_path, monkeypatch):
    from wandb_records import history_rows, wait_for_complete_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "w"
    code = main(
        ["run", "digits-mlp", "--sparsity", "0.5", "--epochs", "1", "--pretrain-epochs", "3", "--out", str(out),
         "--wandb", "offline", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = history_rows(wait_for_complete_run(out))
    assert [row["_step"] for row in history] == [row["step"] for row in jsonl]
    for logged, recorded in zip(jsonl, history):
        keys = {k for k in logged if k != "step"}
        assert keys == {k for k in recorded if not k.startswith("_")}
        for key in keys:
            assert recorded[key] == pytest.approx(logged[key])


def test_dense_cache_key_includes_training_settings(tmp_path):
    from constrainedsparse.engine import cache_dir

    for lr in ("1e-3", "2e-3"):
        run(RunConfig(formulation="magnitude", sparsity=0.5, epochs=0, seed=11, settings={"lr": lr},
                      out=tmp_path / lr, **FAST))  # fmt: skip
    assert len(list((cache_dir() / "dense").glob("digits-mlp-*-seed11-pre3.safetensors"))) == 2


RANDOM_DROPOUT = str(Path(__file__).parent / "problems" / "random_dropout.py")


def test_seed_reaches_a_problems_random_data_and_a_resumed_slr_run_with_dropout_matches(tmp_path):
    # The file draws its data from the global generator and its model has dropout: --seed must fix the data,
    # and a resumed run must continue the same dropout stream (slr's reference batch took a draw from it).
    common = dict(problem=RANDOM_DROPOUT, formulation="slr", sparsity=0.5, seed=3, progress=False, wandb="disabled")
    run(RunConfig(out=tmp_path / "full", **common))
    run(RunConfig(out=tmp_path / "again", **common))
    assert run(RunConfig(out=tmp_path / "cut", stop_after_epochs=1, **common)) is None
    run(RunConfig(out=tmp_path / "cut", resume=True, **common))
    full = load_file(tmp_path / "full" / "model.safetensors")
    for other in ("again", "cut"):
        weights = load_file(tmp_path / other / "model.safetensors")
        assert all(torch.equal(full[name], weights[name]) for name in full), other


def test_a_resumed_run_reports_the_dense_metric_it_started_from(tmp_path):
    # The cache may hold another dense model by then (trained on other threads, or replaced): the summary's
    # dense figure is the checkpoint's, the model the run pruned.
    from safetensors.torch import save_file

    from constrainedsparse.engine import cache_dir

    common = dict(formulation="magnitude", sparsity=0.5, epochs=2, seed=23, **FAST)
    full = run(RunConfig(out=tmp_path / "full", **common))
    assert run(RunConfig(out=tmp_path / "cut", stop_after_epochs=1, **common)) is None
    cached = next((cache_dir() / "dense").glob("digits-mlp-*-seed23-pre3.safetensors"))
    save_file({name: torch.zeros_like(value) for name, value in load_file(cached).items()}, cached)
    resumed = run(RunConfig(out=tmp_path / "cut", resume=True, **common))
    assert resumed["dense_accuracy"] == full["dense_accuracy"]
