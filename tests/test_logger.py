"""MetricsLogger: JSONL and a real (offline) wandb run carry the same rows; resume; non-finite; plots."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
from wandb_records import history_rows, read_records, wait_for_complete_file, wait_for_complete_run

from constrainedsparse.logger import MetricsLogger, read_metrics
from constrainedsparse.plots import plot_metrics

WANDB_OWN_KEYS = {"_step", "_runtime", "_timestamp"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(step: int) -> dict[str, float]:
    return {
        "loss/train": 2.5 / step,
        "multiplier/budget": 0.125 * step,
        "violation/budget": 0.3 - 0.07 * step,
        "density/fc1.weight": 1.0 / (1.0 + step),
    }


def _strict_json(line: str) -> dict:
    """Parses a JSONL line, refusing the non-standard NaN/Infinity tokens."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token!r} in {line!r}")

    return json.loads(line, parse_constant=refuse)


def test_offline_wandb_run_matches_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "run"

    logger = MetricsLogger(out, wandb_mode="offline", config={"formulation": "slr", "lr": 0.1, "seed": 0})
    assert logger.run_id
    for step in range(1, 6):
        logger.log(_row(step), step)
    logger.close()
    assert logger.run is None

    jsonl = read_metrics(out / "metrics.jsonl")
    history = history_rows(wait_for_complete_run(out))

    assert len(jsonl) == 5
    assert len(history) == len(jsonl)
    assert [row["step"] for row in jsonl] == [1, 2, 3, 4, 5]
    assert [row["_step"] for row in history] == [row["step"] for row in jsonl]
    for logged, hist in zip(jsonl, history):
        logged_metrics = {k: v for k, v in logged.items() if k != "step"}
        hist_metrics = {k: v for k, v in hist.items() if k not in WANDB_OWN_KEYS}
        assert set(hist_metrics) == set(logged_metrics) == set(_row(1))
        for key, value in logged_metrics.items():
            assert hist_metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert logged_metrics == pytest.approx(_row(logged["step"]), rel=1e-12)


def test_a_logger_used_as_a_context_closes_when_the_loop_inside_raises(tmp_path):
    """A sweep's loop that raised left its wandb run unfinished and its file open."""
    with pytest.raises(RuntimeError, match="diverged"):
        with MetricsLogger(tmp_path / "run", wandb_mode="offline") as logger:
            logger.log(_row(1), 1)
            raise RuntimeError("diverged")
    assert logger.run is None and logger._file.closed
    assert read_metrics(tmp_path / "run")[0]["step"] == 1
    logger.close()  # again: nothing
    records = read_records(wait_for_complete_file(next((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))))
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]  # shown as failed


def test_wandb_mode_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"^wandb_mode must be one of disabled, offline, online, got 'bogus'$"):
        MetricsLogger(tmp_path, "bogus")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_empty_wandb_mode_variable_is_unset_for_wandb_too(tmp_path, monkeypatch):
    # the CLI reads WANDB_MODE= as unset; wandb refused the empty text even with --wandb offline
    monkeypatch.setenv("WANDB_MODE", "")
    logger = MetricsLogger(tmp_path / "run", "offline")
    logger.log({"loss/train": 1.0}, 1)
    logger.close()
    assert os.environ["WANDB_MODE"] == "" and list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_paths_may_be_str_and_read_metrics_takes_the_run_directory(tmp_path):
    """As the docs write them: MetricsLogger("runs/mine"), read_metrics(".../metrics.jsonl") or the run's folder."""
    out = tmp_path / "mine"
    logger = MetricsLogger(str(out))
    logger.log({"loss/train": 1.5}, 1)
    logger.close()
    assert logger.path == out / "metrics.jsonl"
    rows = [{"loss/train": 1.5, "step": 1}]
    assert read_metrics(str(out / "metrics.jsonl")) == read_metrics(str(out)) == read_metrics(out) == rows
    with pytest.raises(ValueError, match=r"^metrics file '.*/missing' does not exist$"):
        read_metrics(tmp_path / "missing")


def test_wandb_online_without_a_login_is_one_line(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no key anywhere
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(ValueError, match=r"^--wandb online: No API key configured\..* \(or use --wandb offline\)$"):
        MetricsLogger(tmp_path / "run", "online")


def test_an_interrupt_inside_wandb_init_stops_wandb_before_the_run_directory_is_removed(tmp_path, monkeypatch):
    """Ctrl-C while wandb.init runs: the half-started run is torn down (it wrote files/output.log back into the
    directory the CLI had just removed), the JSONL file closed."""
    import wandb

    real_init = wandb.init

    def interrupted(**kwargs):
        real_init(**kwargs)
        raise KeyboardInterrupt

    torn_down = []
    real_teardown = wandb.teardown
    monkeypatch.setattr(wandb, "init", interrupted)
    monkeypatch.setattr(wandb, "teardown", lambda *args, **kwargs: torn_down.append(real_teardown(*args, **kwargs)))
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path / "run", wandb_mode="offline")
    assert wandb.run is None and len(torn_down) == 1


def test_a_wandb_run_the_user_has_open_stays_open_and_theirs(tmp_path):
    """The library's run opens beside the user's (it finished theirs: their next log raised) and an interrupt of its
    init finishes only its own run."""
    import wandb

    yours = wandb.init(project="mine", mode="offline", dir=str(tmp_path / "yours"))
    try:
        logger = MetricsLogger(tmp_path / "run", wandb_mode="offline")
        logger.log(_row(1), 1)
        logger.close()
        assert wandb.run is yours
        yours.log({"acc": 0.9}, step=1)
    finally:
        yours.finish()
    assert history_rows(wait_for_complete_run(tmp_path / "yours"))[0]["acc"] == 0.9
    assert history_rows(wait_for_complete_run(tmp_path / "run"))[0]["_step"] == 1


def test_resume_step_drops_later_rows(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 7):
        logger.log({"loss/train": float(step)}, step)
    logger.close()
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]

    logger = MetricsLogger(tmp_path, resume_step=3)
    logger.log({"loss/train": 40.0}, 4)
    logger.close()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss/train"] for row in rows] == [1.0, 2.0, 3.0, 40.0]


@pytest.mark.parametrize("shortened", ["deleted", "cut"])
def test_resume_warns_when_the_file_lost_rows_the_checkpoint_had_logged(tmp_path, shortened):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 5):
        logger.log({"loss/train": float(step)}, step)
    assert logger.last_step == 4
    logger.close()
    path = tmp_path / "metrics.jsonl"
    if shortened == "deleted":
        path.unlink()
    else:
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:2]))
    now = "is empty" if shortened == "deleted" else "ends at step 2"
    with pytest.warns(UserWarning, match=rf"metrics.jsonl {now}, but it held rows up to step 4 when the checkpoint"):
        MetricsLogger(tmp_path, resume_step=4, logged_step=4).close()


def test_resume_drops_a_last_row_cut_short_and_says_rows_are_missing(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 4):
        logger.log({"loss/train": float(step)}, step)
    logger.close()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text()[:-12])  # the last row's write cut short (a crash, a full disk)
    with pytest.warns(UserWarning, match=r"metrics.jsonl ends at step 2, but it held rows up to step 3"):
        MetricsLogger(tmp_path, resume_step=3, logged_step=3).close()
    assert [row["step"] for row in read_metrics(path)] == [1, 2]


@pytest.mark.parametrize("ending", ["no final newline", "blank line", "another writer's spacing"])
def test_a_resumed_file_of_other_bytes_is_rewritten_before_rows_merge_into_its_last(tmp_path, ending):
    rows = [{"a": 1.0, "step": 1}, {"a": 2.0, "step": 2}]
    text = {
        "no final newline": '{"a": 1.0, "step": 1}\n{"a": 2.0, "step": 2}',
        "blank line": '{"a": 1.0, "step": 1}\n{"a": 2.0, "step": 2}\n\n',
        "another writer's spacing": '{"a":1.0,"step":1}\n{"a":2.0,"step":2}\n',
    }[ending]
    (tmp_path / "metrics.jsonl").write_text(text)
    logger = MetricsLogger(tmp_path, resume_step=2, logged_step=2)
    logger.log({"b": 3.0}, 2)  # merges into the last row, as a resumed run's first log at the checkpoint's step
    logger.close()
    assert read_metrics(tmp_path) == [rows[0], {**rows[1], "b": 3.0}]


def test_resume_of_an_intact_file_does_not_warn(tmp_path, recwarn):
    logger = MetricsLogger(tmp_path)
    for step in (1, 3):
        logger.log({"loss/train": float(step)}, step)
    logger.close()
    MetricsLogger(tmp_path, resume_step=4, logged_step=3).close()
    assert not [w for w in recwarn if "metrics.jsonl" in str(w.message)]


def test_fresh_logger_truncates_previous_file(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"loss/train": 1.0}, 1)
    logger.close()
    logger = MetricsLogger(tmp_path)
    logger.log({"loss/train": 9.0}, 7)
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 7, "loss/train": 9.0}]


def test_non_finite_values_are_written_as_null(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"loss/train": math.nan, "violation/a": math.inf, "violation/b": -math.inf, "multiplier/a": 0.5}, 1)
    logger.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    row = _strict_json(lines[0])
    assert row == {"step": 1, "loss/train": None, "violation/a": None, "violation/b": None, "multiplier/a": 0.5}


def test_plot_metrics_writes_png(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 11):
        row = _row(step)
        row["density/fc2.weight"] = 0.5 + 0.01 * step
        row["accuracy/test"] = 0.1 * step if step != 5 else math.nan  # a null in the middle
        row["phase"] = 0 if step <= 6 else 1
        row["epoch"] = step // 3
        logger.log(row, step)
    logger.close()

    png = tmp_path / "metrics.png"
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook's inline backend, say: plotting a run leaves it alone (it set Agg)
    try:
        assert plot_metrics(tmp_path / "metrics.jsonl", png) == png
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024
    # Rows of two 6 x 3.1 in panels at 100 dpi: accuracy | loss, the budget's violation | multiplier, density.
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1200, 930)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]


def test_plot_metrics_refuses_what_the_cli_refuses_and_takes_a_run_directory(tmp_path):
    MetricsLogger(tmp_path).close()
    with pytest.raises(ValueError, match=r"^'.*metrics\.jsonl' holds no rows yet: nothing to plot$"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "empty.png")
    with pytest.raises(ValueError, match=r"^metrics file '.*none\.jsonl' does not exist$"):
        plot_metrics(tmp_path / "none.jsonl")
    logger = MetricsLogger(tmp_path)
    logger.log(_row(1), 1)
    logger.close()
    with pytest.raises(ValueError, match=r"^'.*' is a directory: give a file name ending in \.png$"):
        plot_metrics(tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"^'.*p\.png': the directory '.*nowhere' does not exist$"):
        plot_metrics(tmp_path, tmp_path / "nowhere" / "p.png")
    assert plot_metrics(tmp_path) == tmp_path / "metrics.png"  # a run directory: its metrics.jsonl, PNG beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]


def test_one_shot_run_plot_shows_its_metric():
    import matplotlib.pyplot as plt

    from constrainedsparse.plots import figure_for

    rows = [{"accuracy/dense": 0.98, "step": 0, "accuracy/hardprune": 0.47, "accuracy/final": 0.47}]
    fig = figure_for(rows)
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    plt.close(fig)
    assert ax.get_title() == "test accuracy"
    assert labels[:3] == ["dense 0.98", "after hard prune 0.47", "final 0.47"]
    assert ax.get_xlim() == (-1.0, 1.0)


def test_histograms_of_float32_values_a_few_ulps_apart_reach_wandb(tmp_path, monkeypatch):
    """l0's gate probabilities can all but agree: numpy could not cut their float32 range into wandb's 64 bins."""
    import torch

    monkeypatch.setenv("WANDB_SILENT", "true")
    close = torch.full((100,), 0.3, dtype=torch.float32)
    close[::2] = torch.nextafter(close[::2], torch.tensor(1.0))
    logger = MetricsLogger(tmp_path / "run", wandb_mode="offline")
    logger.log_histograms({"gates/p": close, "listed": [0.25, 0.25]}, 1)
    logger.log({"loss": 1.0}, 1)
    logger.close()
    (row,) = history_rows(wait_for_complete_run(tmp_path / "run"))
    assert row["_step"] == 1 and row["loss"] == 1.0
    assert sum(row["gates/p/values"]) == 100 and sum(row["listed/values"]) == 2


@pytest.mark.parametrize("histogram", [False, True])
def test_a_step_before_one_logged_already_is_refused(tmp_path, histogram):
    logger = MetricsLogger(tmp_path / "run")
    logger.log({"loss": 1.0}, 24)
    logger.log({"other": 2.0}, 24)  # the same step again: merged into its row
    log = logger.log_histograms if histogram else logger.log
    with pytest.raises(ValueError, match=r"^log step 3 is before step 24, logged already: steps must not decrease"):
        log({"loss": 1.0}, 3)
    with pytest.raises(ValueError, match=r"^log step must be an integer >= 0, got -1$"):
        log({"loss": 1.0}, -1)
    logger.close()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [{"loss": 1.0, "other": 2.0, "step": 24}]


def test_a_tag_wandb_refuses_at_init_is_one_line_naming_the_rule(tmp_path):
    with pytest.raises(ValueError, match=r"^--wandb offline: Tag 'x+\.\.\.x+' is 70 characters\. Tags must be between"):
        MetricsLogger(tmp_path / "run", "offline", tags=("x" * 70,))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--wandb-tags", "ok, " + "x" * 70, r"wandb_tags \(--wandb-tags\): a tag has 1 to 64 characters, got 'x{70}'"),
        ("--wandb-project", "a#b", r"wandb_project \(--wandb-project\) must be 1 to 128 characters, none of / \\ # \?"),
        ("--wandb-project", "p" * 129, r"wandb_project \(--wandb-project\) must be 1 to 128 characters"),
    ],
)
def test_wandb_names_wandb_refuses_stop_the_cli_before_anything_runs(tmp_path, capsys, flag, value, message):
    """Checked with the run's options: wandb itself checks them after the dense pre-training."""
    import re

    from cli_helpers import fails_with_one_line

    line = fails_with_one_line(["run", "digits-mlp", "--out", str(tmp_path / "a"), flag, value], capsys)
    assert re.match("error: " + message, line), line
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("env", "mode"), [("disabled", "disabled"), ("dryrun", "offline"), ("run", "online"), ("", "offline")]
)
def test_the_cli_takes_its_wandb_mode_from_wandb_mode_when_no_flag_names_one(monkeypatch, env, mode):
    from constrainedsparse.cli import _build_parser, _run_config

    monkeypatch.setenv("WANDB_MODE", env)
    assert _run_config(_build_parser().parse_args(["run", "digits-mlp"]))[0].wandb == mode
    flagged = _build_parser().parse_args(["run", "digits-mlp", "--wandb", "offline"])
    assert _run_config(flagged)[0].wandb == "offline"


def test_a_wandb_mode_wandb_does_not_know_is_one_line(monkeypatch, capsys):
    from cli_helpers import fails_with_one_line

    monkeypatch.setenv("WANDB_MODE", "shared")
    line = fails_with_one_line(["run", "digits-mlp", "--out", "unused"], capsys)
    modes = "(disabled, offline, online)"
    assert line == f"error: $WANDB_MODE is 'shared', none of the --wandb modes {modes}: set one, or give --wandb"


def test_a_proxy_constraints_panel_draws_the_measurement_and_its_surrogate():
    from constrainedsparse.plots import figure_for

    rows = [{**_row(step), "surrogate/budget": 0.2 - 0.05 * step, "step": step} for step in range(1, 6)]
    fig = figure_for(rows)
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("budget: violation"))
    lines = {
        line.get_label(): list(line.get_ydata()) for line in panel.get_lines() if not line.get_label().startswith("_")
    }
    assert lines["measured (strict_fn)"] == pytest.approx([0.3 - 0.07 * s for s in range(1, 6)])
    assert lines["surrogate (fn)"] == pytest.approx([0.2 - 0.05 * s for s in range(1, 6)])
    assert [t.get_text() for t in panel.get_legend().get_texts()] == ["surrogate (fn)", "measured (strict_fn)"]
    axes = figure_for([{**_row(1), "step": 1}]).axes
    plain = next(ax for ax in axes if ax.get_title().startswith("budget: violation"))
    assert plain.get_legend() is None and [line.get_label() for line in plain.get_lines()][0] == "violation"
