"""Run directories: resume with the stored options, one run per directory, --overwrite, file modes, progress lines."""

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import fails_with_one_line
from safetensors.torch import load_file

from constrainedsparse.cli import main
from constrainedsparse.errors import UserInputError
from constrainedsparse.runs import LOCK, RunDirectory

FAST = ["--pretrain-epochs", "3", "--epochs", "2", "--retrain-epochs", "1", "--wandb", "disabled", "--no-progress"]


def _run(out, *extra):
    return main(["run", "digits-mlp", "--formulation", "admm", "--sparsity", "0.8", "--out", str(out), *FAST, *extra])


def test_resume_with_no_other_flag_uses_the_stored_options_and_equals_a_straight_run(tmp_path):
    assert _run(tmp_path / "full", "--set", "rho=0.2") == 0
    # an interrupted run: stopped after one epoch, with a checkpoint and no summary
    from constrainedsparse import RunConfig, run

    config = RunConfig(problem="digits-mlp", formulation="admm", sparsity=0.8, epochs=2, pretrain_epochs=3,
                       retrain_epochs=1, out=tmp_path / "cut", settings={"rho": "0.2"}, stop_after_epochs=1,
                       progress=False)  # fmt: skip
    assert run(config) is None and not (tmp_path / "cut" / "summary.json").exists()
    assert main(["run", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    for key in ("achieved_sparsity", "layer_sparsity", "hardprune_accuracy", "retrain_accuracy", "settings"):
        assert cut[key] == full[key], key
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_differing_flag_names_the_keys(tmp_path, capsys):
    out = tmp_path / "a"
    from constrainedsparse import RunConfig, run

    run(RunConfig(problem="digits-mlp", formulation="admm", sparsity=0.8, epochs=2, pretrain_epochs=3, out=out,
                  stop_after_epochs=1, progress=False))  # fmt: skip
    before = sorted(p.name for p in out.iterdir())
    line = fails_with_one_line(["run", "--out", str(out), "--resume", "--sparsity", "0.5", "--set", "rho=1"], capsys)
    assert line.startswith(
        f"error: --resume: the run in {out} was started with other options: sparsity (0.5, stored 0.8)"
    )
    assert "--set rho" in line
    assert sorted(p.name for p in out.iterdir()) == before
    # the same options given again are fine
    assert (
        main(["run", "--out", str(out), "--resume", "--sparsity", "0.8", "--formulation", "admm", "--no-progress"]) == 0
    )


def test_resume_takes_some_set_keys_again_by_value_and_keeps_the_others(tmp_path, capsys):
    out = tmp_path / "a"
    from constrainedsparse import RunConfig, run

    run(RunConfig(problem="digits-mlp", formulation="admm", sparsity=0.8, epochs=2, pretrain_epochs=3, out=out,
                  settings={"rho": "0.2", "batch_size": "32"}, stop_after_epochs=1, progress=False))  # fmt: skip
    line = fails_with_one_line(["run", "--out", str(out), "--resume", "--set", "rho=0.3", "--set", "seed_x=1",
                                "--set", "dual_lr=0.5"], capsys)  # fmt: skip
    assert line.startswith(f"error: unknown --set key 'seed_x' for the run in {out} (formulation 'admm'); allowed: ")
    line = fails_with_one_line(["run", "--out", str(out), "--resume", "--set", "rho=0.3", "--set", "dual_lr=0.5"],
                               capsys)  # fmt: skip
    assert line.endswith(
        "other options: --set dual_lr (0.5, not set at the start; in effect 0.01), --set rho (0.3, stored 0.2); "
        "give the stored ones or none"
    )
    # a volatile key alone, a stored value written another way, and a default given as the value in effect
    assert main(["run", "--out", str(out), "--resume", "--set", "device=cpu", "--set", "rho=0.20",
                 "--set", "dual_lr=0.010", "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"] == {"batch_size": "32", "device": "cpu", "rho": "0.2"}


def test_a_resumed_offline_wandb_run_names_both_folders_and_reads_back_whole(tmp_path):
    import importlib.util

    from wandb_records import wait_for_complete_file

    from constrainedsparse import RunConfig, run
    from constrainedsparse.logger import read_metrics

    out = tmp_path / "a"
    config = RunConfig(problem="digits-mlp", formulation="admm", sparsity=0.8, epochs=3, pretrain_epochs=2, out=out,
                       wandb="offline", progress=False)  # fmt: skip
    assert run(dataclasses.replace(config, stop_after_epochs=1)) is None
    summary = run(dataclasses.replace(config, resume=True))
    folders = sorted(out.glob("wandb/offline-run-*"))
    assert len(folders) == 2 and summary["wandb_run"].startswith(f"wandb offline run {folders[0]} {folders[1]} (")
    files = [next(folder.glob("run-*.wandb")) for folder in folders]
    for file in files:
        wait_for_complete_file(file)
    spec = importlib.util.spec_from_file_location(
        "reader", Path(__file__).parents[1] / "docs/examples/read_wandb_offline.py"
    )
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    rows = reader.merged_history([str(f) for f in reversed(files)])  # in any order
    assert [row["_step"] for row in rows] == [row["step"] for row in read_metrics(out / "metrics.jsonl")]


def test_resume_alone_continues_the_wandb_run_in_its_project_under_its_name_and_tags(tmp_path, capsys, monkeypatch):
    """Also when the project and tags came from the environment of the first part, which the later parts lack."""
    from wandb_records import read_records, wait_for_complete_file

    from constrainedsparse import RunConfig, run

    out = tmp_path / "a"
    monkeypatch.setenv("WANDB_PROJECT", "envproj")
    monkeypatch.setenv("WANDB_TAGS", "t1, t2")
    config = RunConfig(problem="digits-mlp", formulation="magnitude", sparsity=0.5, epochs=3, pretrain_epochs=0,
                       out=out, wandb="offline", wandb_name="myname", stop_after_epochs=1, progress=False)  # fmt: skip
    run(config)
    monkeypatch.delenv("WANDB_PROJECT")
    monkeypatch.delenv("WANDB_TAGS")
    with pytest.raises(ValueError, match=r"^--resume: the run in .* options: wandb_project \('other', stored 'envproj"):
        run(dataclasses.replace(config, wandb_project="other", resume=True))  # as the CLI refuses it (below)
    run(dataclasses.replace(config, wandb_name=None, resume=True))  # Python: the stored names
    line = fails_with_one_line(["run", "--out", str(out), "--resume", "--wandb-project", "other"], capsys)
    assert line.startswith("error: --resume: the run in") and "wandb_project ('other', stored 'envproj')" in line
    assert main(["run", "--out", str(out), "--resume", "--no-progress"]) == 0  # the CLI: the stored names
    folders = sorted(out.glob("wandb/offline-run-*"))
    assert len(folders) == 3
    for folder in folders:
        records = read_records(wait_for_complete_file(next(folder.glob("run-*.wandb"))))
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert [(r.project, r.display_name, list(r.tags)) for r in runs[:1]] == [("envproj", "myname", ["t1", "t2"])]


def test_a_wandb_run_without_a_name_is_named_after_its_folder(tmp_path, monkeypatch):
    """As transformers' Trainer names runs after output_dir: runs/digits-mlp-slr is digits-mlp-slr in wandb's list."""
    from wandb_records import read_records, wait_for_complete_file

    from constrainedsparse import RunConfig, run

    monkeypatch.delenv("WANDB_NAME", raising=False)
    out = tmp_path / "digits-magnitude-50"
    run(RunConfig(problem="digits-mlp", formulation="magnitude", sparsity=0.5, epochs=1, pretrain_epochs=0,
                  out=out, wandb="offline", progress=False))  # fmt: skip
    records = read_records(wait_for_complete_file(next(out.glob("wandb/offline-run-*/run-*.wandb"))))
    assert [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"][:1] == [out.name]


@pytest.mark.parametrize("stop", [0, -1, 1.5, True])
def test_stop_after_epochs_below_one_is_refused_before_anything_is_written(tmp_path, stop):
    from constrainedsparse import RunConfig, run

    with pytest.raises(ValueError, match=r"^RunConfig\(stop_after_epochs=\.\.\.\) must be an integer >= 1 or None"):
        run(RunConfig(problem="digits-mlp", out=tmp_path / "a", stop_after_epochs=stop, progress=False))
    assert not (tmp_path / "a").exists()


def test_resume_of_a_finished_run_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "a"
    assert _run(out) == 0
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = fails_with_one_line(["run", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert line == (
        f"error: --resume: the run in {out} has finished ({out / 'summary.json'}); there is nothing to continue: "
        "run it again with --overwrite, or choose another folder"
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files


def test_an_existing_run_directory_is_refused_untouched_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "a"
    assert _run(out) == 0
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = fails_with_one_line(["run", "digits-mlp", "--out", str(out), *FAST], capsys)
    assert line == (
        f"error: --out {out} already holds a finished run; replace the run's files with --overwrite (other files "
        "stay), or choose another folder"
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files
    # a bad value in the same command is reported first (the folder's error would come back once it is fixed)
    line = fails_with_one_line(["run", "digits-mlp", "--out", str(out), "--set", "rho=-1", *FAST], capsys)
    assert line == "error: rho must be > 0, got -1.0"
    (out / "notes.txt").write_text("mine")
    assert _run(out, "--overwrite", "--set", "rho=0.3") == 0
    assert json.loads((out / "summary.json").read_text())["settings"] == {"rho": "0.3"}
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes a run's files, nothing else
    assert not (out / LOCK).exists()


def test_files_get_the_process_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert _run(tmp_path / "a") == 0
    finally:
        os.umask(old)
    for name in ("summary.json", "model.safetensors", "checkpoint.pt", "metrics.jsonl", "metrics.png"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o644, name


def test_out_paths_that_cannot_be_a_run_directory(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (a_file, f"--out {a_file} is a file, not a directory"),
        (a_file / "under", f"--out {a_file / 'under'}: {a_file} is a file, not a directory"),
    ]
    for out, message in cases:
        assert fails_with_one_line(["run", "--out", str(out), *FAST], capsys) == f"error: {message}"
    assert fails_with_one_line(["run", "--out", "", *FAST], capsys) == (
        "error: --out must name a run directory, got the current directory"
    )
    assert a_file.read_text() == "x"


def test_a_discarded_run_removes_the_parents_it_created_if_empty(tmp_path):
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "runs" / "a" / "b", tmp_path / "kept" / "new" / "c"):
        directory = RunDirectory(out)
        directory.check()
        directory.claim()
        directory.discard_if_unused()  # failed before a checkpoint: nothing of it stays
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    other = RunDirectory(tmp_path / "runs" / "x")
    other.claim()
    (tmp_path / "runs" / "mine.txt").write_text("a file of the user's")
    other.discard_if_unused()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine.txt"]


def test_a_busy_directory_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "busy"
    holder = RunDirectory(out)
    holder.check()
    holder.claim()
    (out / "metrics.jsonl").write_text("")  # the busy run's files: a plain run is told who holds them
    try:
        for flags in (["--overwrite"], []):
            code = (
                "import sys; from constrainedsparse.cli import main; "
                f"sys.exit(main(['run', '--out', {str(out)!r}, *{flags!r}, '--no-progress', '--wandb', 'disabled']))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, flags
            assert done.stderr.strip() == (
                f"error: --out {out} is in use by another run (pid {os.getpid()}); wait for it or choose another folder"
            ), flags
    finally:
        holder.release()
    assert not (out / LOCK).exists()


def test_a_killed_run_leaves_no_lock_that_blocks_resume(tmp_path):
    out = tmp_path / "killed"
    script = (
        "import sys; from constrainedsparse.cli import main; "
        f"main(['run', 'digits-mlp', '--formulation', 'magnitude', '--out', {str(out)!r}, '--pretrain-epochs', '3', "
        "'--epochs', '40', '--no-progress', '--wandb', 'disabled'])"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert (out / "checkpoint.pt").exists()
    assert main(["run", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 40


def test_progress_is_one_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path):
    code = (
        "from constrainedsparse.cli import main; "
        f"main(['run', 'digits-mlp', '--formulation', 'magnitude', '--out', {str(tmp_path / 'a')!r}, "
        "'--pretrain-epochs', '2', '--epochs', '3', '--wandb', 'disabled'])"
    )
    env = {**os.environ, "CONSTRAINEDSPARSE_CACHE": str(tmp_path / "cache")}  # the dense model is trained here
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["dense digits-mlp"] * 2 + ["prune magnitude"] * 3, lines
    assert lines[-1].startswith("prune magnitude: epoch 3/3 loss ") and "\r" not in done.stderr


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)


def test_kill_9_at_random_points_and_inside_a_checkpoint_write_resumes_bit_identically(tmp_path):
    import random

    args = ["run", "digits-mlp", "--formulation", "slr", "--sparsity", "0.8", "--epochs", "6", "--pretrain-epochs",
            "2", "--retrain-epochs", "2", "--wandb", "disabled", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "killed"
    script = f"import sys; from constrainedsparse.cli import main; sys.exit(main({[*args, '--out', str(out)]!r}))"
    rng = random.Random(7)
    aims = ["random", "checkpoint write", "random"]
    for attempt, aim in enumerate(aims):
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
        code = script if not resume else script.replace("'--no-progress'", "'--no-progress', '--resume'")
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if aim == "random":
            _wait_for(lambda child=child: (out / "checkpoint.pt").exists() or child.poll() is not None)
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # the moment a checkpoint's temporary file appears: the old one must survive
            _wait_for(lambda child=child: any(out.glob(".checkpoint.pt.*.tmp")) or child.poll() is not None)
        child.kill()
        child.wait()
        assert (out / "checkpoint.pt").exists(), attempt
    if not (out / "summary.json").exists():  # a kill after the run finished leaves nothing to resume
        assert main(["run", "--out", str(out), "--resume", "--no-progress"]) == 0
    full, killed = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", out))
    for key in ("achieved_sparsity", "layer_sparsity", "dense_accuracy", "hardprune_accuracy", "retrain_accuracy"):
        assert killed[key] == full[key], key
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".*.tmp"))  # orphans of the killed writes were cleaned


def test_a_dense_cache_that_cannot_be_written_is_refused_before_pre_training(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CONSTRAINEDSPARSE_CACHE", str(blocker))  # a file where the cache folder should be
    started = time.perf_counter()
    line = fails_with_one_line(["run", "--out", str(tmp_path / "run"), "--epochs", "1", "--pretrain-epochs", "50",
                                "--wandb", "disabled", "--no-progress"], capsys)  # fmt: skip
    assert line.startswith(f"error: the dense-model cache {blocker}/dense cannot be written (Not a directory)")
    assert time.perf_counter() - started < 30 and not (tmp_path / "run").exists()  # 50 dense epochs not run


def test_resume_takes_the_unstructured_pattern_a_training_run_started_with_by_default(tmp_path):
    from constrainedsparse.cli import main
    from constrainedsparse.runners import run
    from constrainedsparse.runs import RunConfig

    out = tmp_path / "run"
    run(RunConfig(problem="digits-mlp", formulation="magnitude", sparsity=0.5, epochs=2, pretrain_epochs=2, out=out,
                  stop_after_epochs=1, progress=False, wandb="disabled"))  # fmt: skip
    assert main(["run", "--out", str(out), "--resume", "--pattern", "unstructured", "--no-progress"]) == 0
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize(
    ("files", "says"),
    [
        (["checkpoint.pt", "metrics.jsonl"], "a run; continue it with --resume, replace the run's files with"),
        (["metrics.jsonl", "wandb"], "a run stopped before its first checkpoint (nothing to resume); replace the"),
        (["checkpoint.pt", "summary.json"], "a finished run; replace the run's files with --overwrite"),
        (["notes.txt"], "other files (notes.txt); replace the run's files with --overwrite"),
    ],
    ids=["resumable", "killed-before-a-checkpoint", "finished", "yours"],
)
def test_a_held_directory_is_named_by_what_it_holds_and_resume_offered_only_with_a_checkpoint(tmp_path, files, says):
    out = tmp_path / "run"
    out.mkdir()
    for name in files:
        (out / name).write_text("")
    with pytest.raises(UserInputError) as caught:
        RunDirectory(out).check()
    assert str(caught.value).startswith(f"--out {out} already holds {says}")


def test_sigterm_unwinds_like_ctrl_c_one_line_exit_143_and_no_folder_before_the_first_checkpoint(tmp_path):
    """``kill``, ``timeout``, a scheduler: before the first checkpoint the folder it created is removed (it used to
    stay, refused by a new run and by --resume); after one, the checkpoint is kept and named."""
    for name, wait_for in (("early", "metrics.jsonl"), ("late", "checkpoint.pt")):
        out = tmp_path / name
        script = (
            "from constrainedsparse.cli import main; import sys; "
            f"sys.exit(main(['run', 'digits-mlp', '--formulation', 'magnitude', '--out', {str(out)!r}, "
            "'--pretrain-epochs', '3', '--epochs', '40', '--set', 'batch_size=4', '--no-progress', '--wandb', "
            "'disabled']))"  # batches of 4: an epoch takes seconds, the signal lands inside the first one
        )
        child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        _wait_for(lambda out=out, wait_for=wait_for, child=child: (out / wait_for).exists() or child.poll() is not None)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
        assert child.returncode == 143, err[-2000:]
        if name == "early":
            assert (
                err.strip().splitlines()[-1]
                == "terminated before the first checkpoint: nothing to resume, start the run again"
            )
            assert not out.exists()
        else:
            assert (
                err.strip().splitlines()[-1]
                == f"terminated; continue from the last checkpoint with --resume --out {out}"
            )
            assert (out / "checkpoint.pt").is_file()


def test_the_wandb_reader_merges_a_resumed_parts_first_row_into_the_row_logged_at_that_step():
    """A run stopped after its last checkpoint (the last epoch's row logged at step 5) resumes at step 5 and logs
    only the final metrics there: the epoch row's keys stay; rows after a resumed part's first step are replaced.
    The rows are given by hand: that stop needs a kill between the last checkpoint and the summary (a review hit it
    with SIGTERM by timing); the real offline run is read back by the test above."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "reader", Path(__file__).parents[1] / "docs/examples/read_wandb_offline.py"
    )
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    parts = {
        "first": [{"_step": 1, "loss": 2.0}, {"_step": 5, "accuracy/test": 0.5}],
        "resumed": [{"_step": 5, "accuracy/final": 0.9}, {"_step": 6, "loss": 1.0}],
        "stopped": [{"_step": 1, "loss": 2.0}, {"_step": 3, "loss": 1.5}, {"_step": 4, "loss": 1.4}],
        "again": [{"_step": 3, "loss": 1.6}],
    }
    reader.history = parts.__getitem__
    assert reader.merged_history(["resumed", "first"]) == [
        {"_step": 1, "loss": 2.0},
        {"_step": 5, "accuracy/test": 0.5, "accuracy/final": 0.9},
        {"_step": 6, "loss": 1.0},
    ]
    assert reader.merged_history(["stopped", "again"]) == [{"_step": 1, "loss": 2.0}, {"_step": 3, "loss": 1.6}]


def test_a_run_given_its_problem_as_a_path_resumes(tmp_path):
    """The Path went into checkpoint.pt as it was, and the resume refused its own checkpoint (objects other than
    tensors, containers, numbers and strings)."""
    from constrainedsparse import RunConfig, run

    problem = Path(__file__).parents[1] / "constrainedsparse" / "problems" / "digits_mlp.py"
    config = RunConfig(problem=problem, formulation="magnitude", sparsity=0.5, epochs=2, pretrain_epochs=1,
                       out=tmp_path / "o", wandb="disabled", progress=False)  # fmt: skip
    assert config.problem == str(problem)
    assert run(dataclasses.replace(config, stop_after_epochs=1)) is None
    assert run(dataclasses.replace(config, resume=True))["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
