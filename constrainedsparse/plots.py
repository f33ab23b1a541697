r"""Plots a person reads: what a run did, phase by phase, and why the multipliers moved.

:func:`plot_metrics` turns a run's ``metrics.jsonl`` into one PNG (``constrainedsparse plot`` calls
the same function). A training run gets, top to bottom:

* the test metric per epoch (and the hard-pruned model's, with the masks of that moment) as lines,
  the dense level as a dashed reference, the hard-prune and final values as marked points;
* the training loss;
* one row per constraint (the user's and the formulation's, e.g. ``l0_density``): its violation
  with the zero line drawn, beside its multiplier, dual restarts as ticks on the multiplier;
* the formulation's own dynamics: for ``slr``/``admm`` the residual :math:`\|W - Z\|`, :math:`\|\Lambda\|`
  and the change of Z (log scale), the dual step sizes :math:`s, s'` on their own log axis and
  :math:`\alpha^k` on its own, :math:`\rho`; for ``l0`` the expected and test-time densities;
* the density of every pruned tensor.

Vertical marks show where pruning starts, where the hard prune happens and where retraining
starts. A layer-wise run gets every layer's error and sparsity, and (for ``fw``) each layer's objective over the
iterations (:mod:`~constrainedsparse.layerwise_plots`).
:func:`figure_for` returns the figure itself (the tests read its axes back).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constrainedsparse.checkpoint import writable
from constrainedsparse.errors import is_number
from constrainedsparse.layerwise_plots import layerwise_figure
from constrainedsparse.logger import metrics_file, read_metrics

__all__ = ["check_png", "figure_for", "metrics_rows", "plot_metrics", "run_title"]

Rows = Sequence[dict[str, Any]]
_MARKS = {"pruning": "tab:green", "hard prune": "tab:red", "retraining": "tab:purple"}


def _series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _keys(rows: Rows, family: str) -> list[str]:
    found: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key.startswith(f"{family}/"):
                found[key] = None
    return list(found)


_METRIC_SUFFIXES = ("/test", "/dense", "/hardprune", "/final")
"""The keys that name the run's metric: a one-shot run (no epochs) logs only the last three."""


def _metric_name(rows: Rows) -> str | None:
    for row in rows:
        for key in row:
            if key.endswith(_METRIC_SUFFIXES):
                return key.split("/", 1)[0]
    return None


def _phase_marks(rows: Rows, metric: str | None) -> dict[str, int]:
    marks: dict[str, int] = {}
    dense = [row["step"] for row in rows if metric and row.get(f"{metric}/dense") is not None]
    marks["pruning"] = dense[0] if dense else 0
    hard = [row["step"] for row in rows if metric and row.get(f"{metric}/hardprune") is not None]
    if hard:
        marks["hard prune"] = hard[0]
    retrain = [row["step"] for row in rows if row.get("phase") == 1]
    if retrain and hard and retrain[0] > hard[0]:
        marks["retraining"] = hard[0]
    return marks


def _mark(ax: Any, marks: dict[str, int], legend: bool = False) -> None:
    for label, step in marks.items():
        ax.axvline(step, color=_MARKS[label], linestyle=":", linewidth=1, label=label if legend else None)


def _line(ax: Any, rows: Rows, key: str, label: str, **style: Any) -> bool:
    steps, values = _series(rows, key)
    if steps:
        ax.plot(steps, values, label=label, marker="." if len(steps) < 40 else None, **style)
    return bool(steps)


def _metric_panel(ax: Any, rows: Rows, metric: str, marks: dict[str, int]) -> None:
    _line(ax, rows, f"{metric}/test", "test (per epoch)")
    _line(ax, rows, f"{metric}/hardprune_now", "hard-pruned with the masks of the epoch")
    _, dense = _series(rows, f"{metric}/dense")
    if dense:
        ax.axhline(dense[0], color="black", linestyle="--", linewidth=1, label=f"dense {dense[0]:.4g}")
    points = (
        (f"{metric}/hardprune", "after hard prune", "X", "tab:green"),
        (f"{metric}/final", "final", "*", "tab:red"),
    )
    for key, label, marker, color in points:
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, linestyle="none", marker=marker, markersize=12, color=color,
                    label=f"{label} {values[-1]:.4g}")  # fmt: skip
    _mark(ax, marks)
    ax.set_title(f"test {metric}")
    ax.set_ylabel(metric)
    ax.margins(y=0.35)  # headroom for the legend above the lines
    ax.legend(fontsize=7, framealpha=0.6, loc="best")


def _constraint_names(rows: Rows) -> list[str]:
    names = [key.split("/", 1)[1] for key in _keys(rows, "violation")]
    return names + [k.split("/", 1)[1] for k in _keys(rows, "multiplier") if k.split("/", 1)[1] not in names]


def _constraint_row(axes: Sequence[Any], rows: Rows, name: str, marks: dict[str, int]) -> None:
    violation, multiplier = axes
    proxy = _line(violation, rows, f"surrogate/{name}", "surrogate (fn)", linestyle="--", color="tab:grey")
    _line(violation, rows, f"violation/{name}", "measured (strict_fn)" if proxy else "violation")
    steps, final = _series(rows, f"final_violation/{name}")  # the final (hard-pruned) model's, on the test set
    if steps:
        violation.plot(steps, final, linestyle="none", marker="*", markersize=12, color="tab:red",
                       label=f"final model {final[-1]:.4g}")  # fmt: skip
    if proxy or steps:  # a proxy: the multiplier reads the measurement, the weights train on the surrogate
        violation.legend(fontsize=7, framealpha=0.6)
    violation.axhline(0.0, color="black", linewidth=1)
    violation.set_title(f"{name}: violation\n(<= 0 holds; an equality: = 0)", fontsize=9)
    violation.set_ylabel("g")
    _line(multiplier, rows, f"multiplier/{name}", "multiplier", color="tab:orange")
    restarts, _ = _series(rows, f"restart/{name}")
    for step in restarts:
        multiplier.axvline(step, ymax=0.08, color="tab:red", linewidth=1)
    if restarts:
        multiplier.plot([], [], color="tab:red", label=f"restart ({len(restarts)})")
    multiplier.set_title(f"{name}: multiplier", fontsize=9)
    multiplier.set_ylabel("lambda")
    _, values = _series(rows, f"multiplier/{name}")
    if values and min(values) >= 0:  # an inequality's multiplier: no negative half
        multiplier.set_ylim(bottom=0, top=max(max(values) * 1.05, 1e-3))
    multiplier.legend(fontsize=7, framealpha=0.6)
    for ax in axes:
        _mark(ax, marks)


def _family_panel(
    ax: Any, rows: Rows, keys: Sequence[str], title: str, marks: dict[str, int], log: bool = False
) -> None:
    # Densities change at the hard prune, between two logged rows: drawn as steps, not as a slope.
    style = {"drawstyle": "steps-pre"} if title.startswith("density") else {}
    drawn = [key for key in keys if _line(ax, rows, key, key.split("/", 1)[1], **style)]
    if title.startswith("density per pruned tensor"):  # the saved model's, after the hard prune: a star per tensor
        stars = 0
        for key, line in zip(drawn, list(ax.get_lines()), strict=True):
            steps, final = _series(rows, f"final_{key}")
            if steps:
                ax.plot(steps, final, linestyle="none", marker="*", markersize=10, color=line.get_color())
                stars += 1
        if stars:
            ax.plot([], [], linestyle="none", marker="*", markersize=10, color="tab:grey", label="saved model")
    if log and drawn and all(v > 0 for key in drawn for v in _series(rows, key)[1]):
        ax.set_yscale("log")
        title = title if "log scale" in title else f"{title} (log scale)"
    if title.startswith("surrogate conditions"):
        ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    if 0 < len(drawn) <= 8:
        ax.legend(fontsize=7, framealpha=0.6)
    if title.startswith(("density", "expected")):
        ax.set_ylabel("density (fraction kept)")
    elif title == "training loss":
        ax.set_ylabel("loss")
    _mark(ax, marks)


def _dynamics_panels(rows: Rows) -> list[tuple[str, list[str], bool]]:
    """``(title, keys, log scale)`` of the formulation families present in ``rows``."""
    panels = [
        ("training loss", _keys(rows, "loss"), False),
        ("W = Z: residual ||W - Z||, ||Lambda||, change of Z", _keys(rows, "dual"), True),
        ("dual step sizes s, s' (log scale)", [k for k in _keys(rows, "stepsize") if k != "stepsize/alpha"], True),
        ("alpha^k", ["stepsize/alpha"] if _keys(rows, "stepsize") else [], False),
        ("penalty rho", _keys(rows, "penalty"), False),
        ("surrogate conditions (1 = holds)", _keys(rows, "condition"), False),
        ("expected and test-time density (l0)", _keys(rows, "l0"), False),
        ("expected density per layer (l0)", _keys(rows, "l0_density"), False),
        ("density per pruned tensor", _keys(rows, "density"), False),
    ]
    return [panel for panel in panels if panel[1]]


def _training_figure(rows: Rows) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metric = _metric_name(rows)
    marks = _phase_marks(rows, metric)
    constraints = _constraint_names(rows)
    panels = _dynamics_panels(rows)
    beside = 1 if metric and panels and panels[0][0] == "training loss" else 0  # the loss goes next to the metric
    grid = (1 if metric else 0) + len(constraints) + math.ceil((len(panels) - beside) / 2)
    fig = Figure(figsize=(12, 3.1 * max(1, grid)))
    axes = fig.subplots(max(1, grid), 2, squeeze=False)
    row = 0
    if metric:
        _metric_panel(axes[0][0], rows, metric, marks)
        title, keys, log = panels.pop(0) if panels and panels[0][0] == "training loss" else ("", [], False)
        if keys:
            _family_panel(axes[0][1], rows, keys, title, marks, log)
        else:
            axes[0][1].axis("off")
        row = 1
    for name in constraints:
        _constraint_row(axes[row], rows, name, marks)
        row += 1
    for index, (title, keys, log) in enumerate(panels):
        _family_panel(axes[row + index // 2][index % 2], rows, keys, title, marks, log)
    if len(panels) % 2:
        axes[row + len(panels) // 2][1].axis("off")
    steps = [row["step"] for row in rows if isinstance(row.get("step"), (int, float))]
    span = (min(steps, default=0), max(steps, default=1))
    pad = 0.02 * (span[1] - span[0]) if span[1] > span[0] else 1.0  # one step (a one-shot run): a unit either side
    for ax in axes.flat:
        if ax.axison:  # one step axis for every panel: a step sits at the same place in every column
            ax.set_xlim(span[0] - pad, span[1] + pad)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    return fig


def _phase_legend(marks: dict[str, int]) -> str:
    """The line under the title that says what the dotted lines mark (one legend for every panel)."""
    names = {"pruning": "green: pruning starts", "hard prune": "red: hard prune", "retraining": "purple: retraining"}
    return "dotted lines: " + ", ".join(names[label] for label in marks)


def figure_for(rows: Rows, title: str | None = None) -> Any:
    """The matplotlib figure of a run's metric rows (layer-wise or training): a ``Figure`` of its own, outside pyplot
    (the process's backend and pyplot's figures are left alone), under ``title`` (the run, :func:`run_title`)."""
    layerwise = any(key.startswith("layer_error/") for row in rows for key in row)
    fig = layerwise_figure(rows) if layerwise else _training_figure(rows)
    lines = [title] if title else []
    if not layerwise:
        lines.append(_phase_legend(_phase_marks(rows, _metric_name(rows))))
    if lines:
        fig.suptitle("\n".join(lines), fontsize=11)
    inches = 0.22 * (len(lines) + 0.5) if lines else 0.0
    fig.tight_layout(rect=(0, 0, 1, 1 - inches / fig.get_figheight()))
    return fig


def run_title(summary: Any) -> str | None:
    """What run a plot shows, from its ``summary.json``: problem, formulation and target (``None`` without one)."""
    if not isinstance(summary, dict):
        return None
    target, pattern = summary.get("target"), summary.get("pattern")
    if target is None and is_number(summary.get("target_sparsity")):
        target = f"sparsity {summary['target_sparsity']:g}" + (f" {pattern}" if isinstance(pattern, str) else "")
    elif target is None and isinstance(pattern, str):  # a fixed-level pattern (2:4) records no sparsity
        target = f"pattern {pattern}"
    parts = [str(summary[key]) for key in ("problem", "formulation") if isinstance(summary.get(key), str)]
    parts += [str(target)] if target is not None else []
    return " / ".join(parts) or None


def metrics_rows(path: Path | str) -> tuple[Path, list[dict[str, Any]]]:
    """The rows of a run's ``metrics.jsonl``; ``path`` may be the run directory.

    Returns:
        The file's path and its rows.

    Raises:
        ValueError: For a missing file, one that is not a run's ``metrics.jsonl`` (one JSON object
            with an integer ``step`` per line), or one without rows.
    """
    rows = read_metrics(path)  # a run directory: its metrics.jsonl
    path = metrics_file(path)
    what = f"{str(path)!r} is not a metrics.jsonl written by a run"
    if not rows:
        raise ValueError(f"{str(path)!r} holds no rows yet: nothing to plot")
    if any(not isinstance(row, dict) or not isinstance(row.get("step"), int) for row in rows):
        raise ValueError(f"{what} (rows need a step)")
    for row in rows:
        bad = next(
            (k for k, v in row.items() if v is not None and not is_number(v)),
            None,
        )
        if bad is not None:
            raise ValueError(f"{what} (values are numbers or null; step {row['step']} has {bad}={row[bad]!r})")
    return path, rows


def _read_summary(path: Path) -> Any:
    """A run's ``summary.json`` for the plot's title; ``None`` where there is none or it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_png(png_path: Path | str) -> None:
    """``png_path`` can receive the plot: a file name ending in ``.png`` in an existing directory.

    Raises:
        ValueError: Naming what is wrong with it.
    """
    png = Path(png_path)
    if png.is_dir():
        raise ValueError(f"{str(png)!r} is a directory: give a file name ending in .png")
    if png.suffix.lower() != ".png":
        raise ValueError(f"{str(png)!r}: the plot is a PNG image, give a file name ending in .png")
    if not png.parent.is_dir():
        raise ValueError(f"{str(png)!r}: the directory {str(png.parent)!r} does not exist")
    if not writable(png.parent):
        raise ValueError(f"{str(png)!r}: the directory {str(png.parent)!r} cannot be written")


def plot_metrics(
    jsonl_path: Path | str, png_path: Path | str | None = None, rows: Rows | None = None, title: str | None = None
) -> Path:
    """Plots a ``metrics.jsonl`` into a PNG (see the module docstring); returns the PNG's path.

    Args:
        jsonl_path: A run's ``metrics.jsonl``, or the run directory holding it.
        png_path: Where the PNG goes (``None``: next to the file, ``metrics.png``).
        rows: The file's rows when the caller has read them already (not read again).
        title: What run it is (``None``: from the ``summary.json`` beside the file, if there is one).

    Raises:
        ValueError: For a file that is missing, not a run's or empty (:func:`metrics_rows`), or a
            PNG path that cannot receive the plot (:func:`check_png`).
    """
    if png_path is not None and not isinstance(png_path, (str, os.PathLike)):
        raise ValueError(f"plot_metrics(png_path=...) must be a file path (str or Path) or None, got {png_path!r}")
    if rows is not None and (not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows)):
        raise ValueError(f"plot_metrics(rows=...) must be the list of dicts read_metrics returns, got {rows!r:.60}")
    if rows is None:
        jsonl_path, rows = metrics_rows(jsonl_path)
    png_path = Path(png_path) if png_path is not None else Path(jsonl_path).with_suffix(".png")
    check_png(png_path)
    if title is None:
        title = run_title(_read_summary(metrics_file(jsonl_path).parent / "summary.json"))
    fig = figure_for(rows, title)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, png_path)
    return png_path
