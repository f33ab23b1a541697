"""Hard-prune accuracy per epoch of SLR against ADMM and magnitude baselines (Fig. 1 of the SLR paper).

For every problem x sparsity x seed the script runs, through :func:`constrainedsparse.run`:

* ``slr`` and ``admm`` for ``E`` epochs without retraining; the curve is
  ``accuracy/hardprune_now`` at the end of every pruning epoch, i.e. the test accuracy of a
  hard-pruned copy of the model with the formulation's current masks, without any retraining;
* ``magnitude+retrain``: one-shot magnitude pruning of the dense model, then ``E`` epochs of masked
  retraining (the same epoch budget); the curve is ``accuracy/test`` of each retraining epoch;
* ``magnitude-gradual``: magnitude pruning with the cubic schedule over ``E`` epochs; the curve is
  ``accuracy/hardprune_now`` per epoch.

Every curve has ``E + 1`` points: point ``e`` is the accuracy after epoch ``e``, and point 0 is the
one-shot magnitude accuracy of the dense model, which is what hard pruning gives before any epoch for
every method (the ``w``/``z`` masks of slr and admm start at the top-k of the dense weights).

Outputs in ``--out``: ``results.md`` (the command line, the threshold rule, a table of dense accuracy,
final accuracy and epochs to reach the threshold per method, mean +- std over seeds, and wall
times), ``results.json`` (every raw curve) and ``accuracy_vs_epoch.png`` (mean curve per method with
a std band, one panel per problem x sparsity). Run outputs go to a temporary directory; dense models
are cached in ``$CONSTRAINEDSPARSE_CACHE`` per problem and seed as usual.

Usage::

    .venv/bin/python benchmarks/slr_vs_admm.py                       # digits-mlp and mnist1d-mlp, 3 seeds
    .venv/bin/python benchmarks/slr_vs_admm.py --quick               # one small run per method
    .venv/bin/python benchmarks/slr_vs_admm.py --problems mnist1d-mlp --sparsities 0.95 --epochs 30 \\
        --set rho_growth=1.2 --set slr:s0=0.02 --threshold 0.9x --threshold mnist1d-mlp=0.6
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import command_line, out_folder, results_dir, scratch_dir, thread_count, torch_threads, write_results

from constrainedsparse import RunConfig, run
from constrainedsparse.engine import cache_dir, prepare
from constrainedsparse.formulations import formulation_class
from constrainedsparse.logger import read_metrics

METHODS = ("slr", "admm", "magnitude+retrain", "magnitude-gradual")
DUAL_METHODS = ("slr", "admm")
DEFAULT_PROBLEMS = ("digits-mlp", "mnist1d-mlp")
DEFAULT_SPARSITIES = (0.8, 0.9, 0.95)
DEFAULT_GRID = {"digits-mlp": (0.8, 0.9, 0.95), "mnist1d-mlp": (0.8, 0.9, 0.925, 0.95)}
GOAL_ROWS = {("mnist1d-mlp", 0.9), ("mnist1d-mlp", 0.925), ("mnist1d-mlp", 0.95), ("digits-mlp", 0.95)}
"""The issue's goal rows: SLR >= 0.8 x dense, >= ADMM + 5 points and >= gradual magnitude (mean of the seeds)."""
GOAL_DENSE_FACTOR = 0.8
GOAL_ADMM_MARGIN = 0.05
GOAL_EPOCHS_FACTOR = 0.5
DEFAULT_THRESHOLD = "0.9x"
DEFAULT_OUT = Path(__file__).parent / "results" / "slr_vs_admm"
QUICK = {"problems": ["digits-mlp"], "sparsities": ["0.9"], "seeds": [0], "epochs": 3, "pretrain_epochs": 3}


@dataclass(frozen=True)
class Threshold:
    """An accuracy threshold: absolute, or relative to the dense accuracy of each seed.

    Attributes:
        value: The accuracy (fraction) or the factor on the dense accuracy.
        relative: Whether ``value`` multiplies the seed's dense accuracy.
    """

    value: float
    relative: bool

    def resolve(self, dense_accuracy: float) -> float:
        """The threshold, as an accuracy fraction, for a seed with this dense accuracy."""
        return self.value * dense_accuracy if self.relative else self.value

    def describe(self) -> str:
        """Human-readable rule, e.g. ``'0.9 x dense accuracy of the seed'``."""
        return f"{self.value:g} x dense accuracy of the seed" if self.relative else f"{100 * self.value:g}% accuracy"


def parse_threshold(text: str) -> tuple[str | None, Threshold]:
    """Parses ``[PROBLEM=]VALUE[x]``: ``0.9x`` is 0.9 x dense accuracy, ``0.85`` is 85% accuracy.

    Args:
        text: The ``--threshold`` argument.

    Returns:
        ``(problem or None for every problem, threshold)``.

    Raises:
        ValueError: If the value is not a number in (0, 1] (absolute) or > 0 (relative).
    """
    problem, _, value = text.rpartition("=")
    relative = value.strip().lower().endswith("x")
    number = value.strip()[:-1] if relative else value.strip()
    try:
        level = float(number)
    except ValueError:
        raise ValueError(f"--threshold {text!r}: expected [PROBLEM=]VALUE[x], e.g. 0.9x or mnist1d-mlp=0.6") from None
    if not math.isfinite(level) or level <= 0 or (not relative and level > 1):
        raise ValueError(f"--threshold {text!r}: an absolute threshold is an accuracy in (0, 1], a factor is > 0")
    return (problem or None), Threshold(level, relative)


def parse_settings(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """Splits ``--set`` items into per-method settings.

    A key of the slr or admm hyperparameters (``rho``, ``interval``, ``s0``, ...) goes to slr and
    admm (the ones that have it); any other key (``lr``, ``batch_size``, ``device``, a problem option)
    goes to every method, so the dense models and the comparison stay the same for all four.

    Args:
        items: ``KEY=VALUE`` or ``METHOD:KEY=VALUE`` (``slr`` or ``admm`` only).

    Returns:
        ``{method: {key: value}}`` for every method of :data:`METHODS`, string values as
        :attr:`RunConfig.settings` takes them (the engine validates them).

    Raises:
        ValueError: For an item without ``=`` or a method prefix other than slr/admm.
    """
    fields = {m: {f.name for f in dataclasses.fields(formulation_class(m).Config)} for m in DUAL_METHODS}
    settings: dict[str, dict[str, str]] = {method: {} for method in METHODS}
    for item in items:
        key, sep, value = item.partition("=")
        method, colon, key = key.strip().rpartition(":")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or METHOD:KEY=VALUE")
        if colon and method not in DUAL_METHODS:
            raise ValueError(f"--set {item!r}: the method prefix must be one of {', '.join(DUAL_METHODS)}")
        if colon:
            takers: Sequence[str] = (method,)
        elif any(key in names for names in fields.values()):
            takers = [m for m in DUAL_METHODS if key in fields[m]]
        else:
            takers = METHODS
        for name in takers:
            settings[name][key] = value.strip()
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed namespace with ``--quick`` applied, ``settings`` split per method and
        ``thresholds`` as ``{problem or None: Threshold}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits-mlp, sparsity 0.9, one seed, 3 epochs")
    parser.add_argument("--problems", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_PROBLEMS)}")
    parser.add_argument(
        "--sparsities",
        nargs="+",
        default=None,
        metavar="LEVEL|PROBLEM=LEVEL,...",
        help="levels for every problem, or per problem (default: digits-mlp=0.8,0.9,0.95 "
        "mnist1d-mlp=0.8,0.9,0.925,0.95; other problems 0.8 0.9 0.95)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    parser.add_argument("--epochs", type=int, default=None, help="pruning (and retraining) epochs E (default 20)")
    parser.add_argument(
        "--pretrain-epochs", type=int, default=None, help="dense pre-training epochs (default: the problem's)"
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="slr/admm setting for both (or one, with a slr:/admm: prefix); other keys (lr, ...) go to every method",
    )
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="[PROBLEM=]VALUE[x]",
        help=f"accuracy to reach: 0.9x = 0.9 x dense accuracy of the seed, 0.85 = 85%% (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/slr_vs_admm; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    defaults = {"problems": list(DEFAULT_PROBLEMS), "sparsities": [], "seeds": [0, 1, 2], "epochs": 20}
    for key, value in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.pretrain_epochs is not None and args.pretrain_epochs < 0:
        parser.error("--pretrain-epochs must be >= 0")
    try:
        args.method_settings = parse_settings(args.settings)
        thresholds = dict(parse_threshold(text) for text in [DEFAULT_THRESHOLD, *args.threshold])
    except ValueError as err:
        parser.error(str(err))
    unknown = sorted(set(thresholds) - {None, *args.problems})
    if unknown:
        parser.error(f"--threshold names problems that are not run: {', '.join(unknown)}")
    args.thresholds = thresholds
    try:
        args.grid = parse_grid(args.sparsities, args.problems)
    except ValueError as err:
        parser.error(str(err))
    return args


def parse_grid(items: Sequence[str], problems: Sequence[str]) -> dict[str, list[float]]:
    """The sparsities of every problem from ``--sparsities`` items.

    Args:
        items: ``LEVEL`` (every problem) or ``PROBLEM=LEVEL,LEVEL,...``; none: :data:`DEFAULT_GRID`.
        problems: The problems run.

    Returns:
        ``{problem: levels}`` in ``problems`` order, levels sorted.

    Raises:
        ValueError: For a level outside (0, 1) or a problem that is not run.
    """
    common: list[float] = []
    own: dict[str, list[float]] = {}
    for item in items:
        problem, sep, levels = item.rpartition("=")
        if sep and problem not in problems:
            raise ValueError(f"--sparsities {item!r}: {problem!r} is not among the problems run")
        try:
            values = [float(level) for level in levels.split(",")]
        except ValueError:
            raise ValueError(f"--sparsities {item!r}: expected LEVEL or PROBLEM=LEVEL,LEVEL,...") from None
        if not all(0 < value < 1 for value in values):
            raise ValueError(f"--sparsities {item!r}: a level is in (0, 1)")
        (own.setdefault(problem, []) if sep else common).extend(values)
    grid = {}
    for problem in problems:
        levels = own.get(problem, []) + common
        if not items:
            levels = list(DEFAULT_GRID.get(problem, DEFAULT_SPARSITIES))
        grid[problem] = sorted(set(levels))
    return grid


def run_config(args: argparse.Namespace, problem: str, sparsity: float, seed: int, method: str, out: Path) -> RunConfig:
    """The :class:`RunConfig` of one method.

    Args:
        args: Parsed command line.
        problem: Problem name or path.
        sparsity: Target sparsity.
        seed: Run seed (also selects the cached dense model).
        method: One of :data:`METHODS`.
        out: Run directory.

    Returns:
        The configuration; ``magnitude+retrain`` is one-shot (0 pruning epochs) with ``E`` retraining epochs.
    """
    common = {
        "problem": problem,
        "sparsity": sparsity,
        "seed": seed,
        "out": out,
        "pretrain_epochs": args.pretrain_epochs,
        "progress": False,
        "wandb": "disabled",
        "settings": dict(args.method_settings[method]),
    }
    if method == "magnitude+retrain":
        return RunConfig(formulation="magnitude", epochs=0, retrain_epochs=args.epochs, **common)
    if method == "magnitude-gradual":
        return RunConfig(formulation="magnitude", epochs=args.epochs, **common)
    return RunConfig(formulation=method, epochs=args.epochs, **common)


def epoch_curve(rows: list[dict[str, Any]], phase: int, key: str, epochs: int) -> list[float]:
    """Epoch-end values of ``key`` in ``phase``, ordered by epoch.

    Args:
        rows: Rows of a run's ``metrics.jsonl``.
        phase: 0 (pruning) or 1 (retraining).
        key: Metric key.
        epochs: Expected number of epoch-end rows.

    Returns:
        One value per epoch.

    Raises:
        RuntimeError: If the run did not log exactly one row per epoch.
    """
    found = {int(row["epoch"]): float(row[key]) for row in rows if row.get("phase") == phase and key in row}
    if sorted(found) != list(range(1, epochs + 1)):
        raise RuntimeError(f"expected {key!r} for epochs 1..{epochs} of phase {phase}, got epochs {sorted(found)}")
    return [found[epoch] for epoch in range(1, epochs + 1)]


def epochs_to_reach(curve: Sequence[float], threshold: float) -> int | None:
    """First epoch (index into ``curve``) whose accuracy is at least ``threshold``, or ``None``."""
    return next((epoch for epoch, value in enumerate(curve) if value >= threshold), None)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def summarize(records: list[dict[str, Any]], grid: dict[str, list[float]]) -> list[dict]:
    """Aggregates the per-run records into one row per problem x sparsity.

    Args:
        records: One dict per run (see :func:`main`).
        grid: ``{problem: sparsities}`` in table order.

    Returns:
        Rows with ``dense`` (mean, std) and per method ``final`` (mean, std), ``epochs`` (mean over
        the seeds that reached the threshold, or None), ``reached`` and ``seeds`` counts, ``seconds``.
    """
    rows = []
    for problem, sparsities in grid.items():
        for sparsity in sparsities:
            group = [r for r in records if r["problem"] == problem and r["sparsity"] == sparsity]
            if not group:
                continue
            dense = {r["seed"]: r["dense_accuracy"] for r in group}
            row: dict[str, Any] = {
                "problem": problem,
                "sparsity": sparsity,
                "dense": _mean_std(list(dense.values())),
                "methods": {},
            }
            for method in METHODS:
                runs = [r for r in group if r["method"] == method]
                reached = [r["epochs_to_threshold"] for r in runs if r["epochs_to_threshold"] is not None]
                row["methods"][method] = {
                    "final": _mean_std([r["final_accuracy"] for r in runs]),
                    "final_pct": _pct([r["final_accuracy"] for r in runs]),
                    "epochs": statistics.fmean(reached) if reached else None,
                    "reached": len(reached),
                    "seeds": len(runs),
                    "seconds": statistics.fmean(r["seconds"] for r in runs),
                }
            row["dense_pct"] = _pct(list(dense.values()))
            row["goals"] = goal_checks(row)
            rows.append(row)
    return rows


def goal_checks(row: dict[str, Any]) -> dict[str, Any]:
    """The issue's comparisons of one row (means over the seeds).

    Returns:
        ``goal_row`` (whether the issue sets the goal for this problem and sparsity), ``slr_over_dense``,
        ``slr_minus_admm``, ``slr_minus_gradual`` (accuracy fractions), ``epochs_ratio`` (slr / admm mean
        epochs to the threshold where both reached it on some seed, else ``None``), and ``met`` per check.
    """
    methods = row["methods"]
    slr, admm, gradual = (methods[m]["final"][0] for m in ("slr", "admm", "magnitude-gradual"))
    epochs = (methods["slr"]["epochs"], methods["admm"]["epochs"])
    ratio = epochs[0] / epochs[1] if None not in epochs and epochs[1] > 0 else None
    checks = {
        "slr_over_dense": slr / row["dense"][0],
        "slr_minus_admm": slr - admm,
        "slr_minus_gradual": slr - gradual,
        "epochs_ratio": ratio,
    }
    checks["met"] = {
        "slr_over_dense": checks["slr_over_dense"] >= GOAL_DENSE_FACTOR,
        "slr_minus_admm": checks["slr_minus_admm"] >= GOAL_ADMM_MARGIN - 1e-12,
        "slr_minus_gradual": checks["slr_minus_gradual"] >= 0,
        "epochs_ratio": None if ratio is None else ratio <= GOAL_EPOCHS_FACTOR,
    }
    checks["goal_row"] = (row["problem"], row["sparsity"]) in GOAL_ROWS
    return checks


def _load() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:  # pragma: no cover - platforms without getloadavg
        return "unknown"


def _mark(met: bool | None) -> str:
    return "" if met is None else (" ✓" if met else " ✗")


def goals_table(rows: list[dict[str, Any]]) -> str:
    """The goal comparisons per row (✓ met, ✗ not); goal rows are the issue's, the others for information."""
    header = [
        "problem",
        "sparsity",
        "goal row",
        f"slr / dense (>= {GOAL_DENSE_FACTOR:g})",
        f"slr - admm (>= +{100 * GOAL_ADMM_MARGIN:g} points)",
        "slr - gradual magnitude (>= 0)",
        f"epochs to thr. slr / admm (<= {GOAL_EPOCHS_FACTOR:g} where both reach it)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|:---|---:|:---:|---:|---:|---:|---:|"]
    for row in rows:
        goals, met = row["goals"], row["goals"]["met"]
        ratio = goals["epochs_ratio"]
        methods = row["methods"]
        if ratio is not None:
            epochs = f"{ratio:.2f}{_mark(met['epochs_ratio'])}"
        elif methods["slr"]["epochs"] is not None:
            epochs = "admm never"
        else:
            epochs = "slr never" if methods["admm"]["epochs"] is not None else "neither"
        cells = [
            row["problem"],
            f"{row['sparsity']:g}",
            "yes" if goals["goal_row"] else "no",
            f"{goals['slr_over_dense']:.2f}{_mark(met['slr_over_dense'])}",
            f"{100 * goals['slr_minus_admm']:+.1f}{_mark(met['slr_minus_admm'])}",
            f"{100 * goals['slr_minus_gradual']:+.1f}{_mark(met['slr_minus_gradual'])}",
            epochs,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results table: dense and final accuracy (%), then epochs to reach the threshold, per method."""
    header = ["problem", "sparsity", "dense %"]
    header += [f"{m} %" for m in METHODS] + [f"{m} epochs to thr." for m in METHODS]
    lines = ["| " + " | ".join(header) + " |", "|:---|---:|" + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [row["problem"], f"{row['sparsity']:g}", row["dense_pct"]]
        cells += [row["methods"][m]["final_pct"] for m in METHODS]
        for method in METHODS:
            entry = row["methods"][method]
            count = f"({entry['reached']}/{entry['seeds']})"
            cells.append(f"{entry['epochs']:.1f} {count}" if entry["epochs"] is not None else f"— {count}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seconds_table(rows: list[dict[str, Any]]) -> str:
    """Mean wall seconds per run (as the engine reports them, dense loading included), per method."""
    header = ["problem", "sparsity", *METHODS]
    lines = ["| " + " | ".join(header) + " |", "|:---|---:|" + "---:|" * len(METHODS)]
    for row in rows:
        cells = [row["problem"], f"{row['sparsity']:g}"] + [f"{row['methods'][m]['seconds']:.1f}" for m in METHODS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Mean accuracy-vs-epoch curve per method with a +-1 std band, one panel per problem x sparsity.

    Args:
        records: Per-run records with ``curve``.
        rows: :func:`summarize` rows (fix the panels and their order).
        path: PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    problems = list(dict.fromkeys(row["problem"] for row in rows))
    # One row of panels per problem, its own sparsities packed from the left (problems may have different lists).
    levels = {problem: sorted({row["sparsity"] for row in rows if row["problem"] == problem}) for problem in problems}
    columns = max(len(found) for found in levels.values())
    fig, axes = plt.subplots(
        len(problems),
        columns,
        figsize=(max(6.5, 1 + 4 * columns), 1.2 + 3.2 * len(problems)),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for row in rows:
        ax = axes[problems.index(row["problem"])][levels[row["problem"]].index(row["sparsity"])]
        ax.set_visible(True)
        group = [r for r in records if r["problem"] == row["problem"] and r["sparsity"] == row["sparsity"]]
        for method in METHODS:
            curves = torch.tensor([r["curve"] for r in group if r["method"] == method], dtype=torch.float64)
            mean = 100 * curves.mean(0)
            std = 100 * curves.std(0) if len(curves) > 1 else torch.zeros_like(mean)
            epochs = range(len(mean))
            label = method + (" (after retraining)" if method == "magnitude+retrain" else "")
            ax.plot(epochs, mean, label=label, marker="o" if len(mean) <= 12 else None, markersize=3)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.axhline(100 * row["dense"][0], color="gray", linestyle=":", linewidth=1, label="dense (mean)")
        threshold = statistics.fmean(r["threshold"] for r in group)
        ax.axhline(100 * threshold, color="gray", linestyle="--", linewidth=1, label="threshold (mean)")
        ax.set_title(f"{row['problem']}, sparsity {row['sparsity']:g}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("hard-prune test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = next(ax for ax in axes.flat if ax.get_visible()).get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Hard-prune test accuracy without retraining, mean ± std over seeds", fontsize=11)
    fig.tight_layout(rect=(0, 0.1 if len(problems) == 1 else 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs every problem x seed x sparsity x method in a temporary directory.

    Args:
        args: Parsed command line.

    Returns:
        One record per run: problem, sparsity, seed, method, dense and final accuracy, ``curve``
        (``E + 1`` accuracies), the resolved ``threshold``, ``epochs_to_threshold`` (or None),
        the engine's ``seconds`` and the formulation ``settings``.
    """
    records: list[dict[str, Any]] = []
    total = sum(len(levels) for levels in args.grid.values()) * len(args.seeds) * len(METHODS)
    # One-shot first: its hard-prune accuracy is epoch 0 of every method's curve.
    order = sorted(METHODS, key=lambda method: method != "magnitude+retrain")
    with scratch_dir("slr_vs_admm-") as scratch:
        runs = [(p, seed, level) for p in args.problems for seed in args.seeds for level in args.grid[p]]
        for problem, seed, sparsity in runs:
            threshold = args.thresholds.get(problem, args.thresholds[None])
            oneshot = math.nan
            for method in order:
                out = scratch / f"{problem}-{sparsity:g}-{seed}-{method}"
                config = run_config(args, problem, sparsity, seed, method, out)
                summary = run(config)
                rows = read_metrics(out / "metrics.jsonl")
                if method == "magnitude+retrain":
                    oneshot = summary["hardprune_accuracy"]
                    curve = [oneshot, *epoch_curve(rows, 1, "accuracy/test", args.epochs)]
                    final = summary["retrain_accuracy"]
                else:
                    curve = [oneshot, *epoch_curve(rows, 0, "accuracy/hardprune_now", args.epochs)]
                    final = summary["hardprune_accuracy"]
                level = threshold.resolve(summary["dense_accuracy"])
                records.append(
                    {
                        "problem": problem,
                        "sparsity": sparsity,
                        "seed": seed,
                        "method": method,
                        "dense_accuracy": summary["dense_accuracy"],
                        "final_accuracy": final,
                        "curve": curve,
                        "threshold": level,
                        "epochs_to_threshold": epochs_to_reach(curve, level),
                        "seconds": summary["seconds"],
                        "settings": dict(config.settings),
                    }
                )
                print(
                    f"[{len(records)}/{total}] {problem} sparsity={sparsity:g} seed={seed} {method}: "
                    f"final {100 * final:.1f}% (dense {100 * summary['dense_accuracy']:.1f}%), "
                    f"{summary['seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Runs every problem x sparsity x seed x method and writes the results.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        Process exit status (0).
    """
    args = parse_args(argv)
    command = command_line("benchmarks/slr_vs_admm.py", argv)
    # Validate every configuration (settings, problems, sparsities) before the first run.
    for problem in args.problems:
        for sparsity in args.grid[problem]:
            for method in METHODS:
                try:
                    prepare(run_config(args, problem, sparsity, args.seeds[0], method, Path("unused")))
                except ValueError as err:
                    print(f"error: {method} on {problem}: {err}", file=sys.stderr)
                    return 2
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    started = time.perf_counter()
    with torch_threads(args.threads) as threads:
        records = run_all(args)
    wall = time.perf_counter() - started
    load_after = _load()
    rows = summarize(records, args.grid)
    table = markdown_table(rows)
    rules = "; ".join(
        f"{name or 'default'}: {rule.describe()}" for name, rule in sorted(args.thresholds.items(), key=str)
    )
    settings = ", ".join(f"{m}: {s}" for m, s in args.method_settings.items() if s) or "library defaults"
    text = "\n".join(
        [
            "# SLR vs ADMM: hard-prune accuracy without retraining",
            "",
            "```",
            command,
            "```",
            "",
            f"Epochs E = {args.epochs} per method; pretrain epochs: "
            f"{args.pretrain_epochs if args.pretrain_epochs is not None else 'problem default'}; "
            f"seeds {' '.join(map(str, args.seeds))}; settings (--set): {settings}; torch {torch.__version__}, "
            f"torch threads: {threads}; dense-model cache {cache_dir()}; total wall time {wall:.0f} s; load average "
            f"(1, 5, 15 min) {load_before} before, {load_after} after.",
            "",
            "Accuracy columns: test accuracy (%) after hard pruning at the end of the E epochs, mean ± std over "
            "seeds, no retraining for slr, admm and magnitude-gradual; magnitude+retrain is one-shot magnitude "
            "pruning followed by E epochs of masked retraining (its final accuracy is after retraining).",
            "",
            f"Epochs to threshold: the first epoch e in 0..E at which the curve reaches the threshold "
            f"({rules}), mean over the seeds that reached it, with (seeds reached / seeds); — if none did. "
            "Epoch 0 is the one-shot magnitude accuracy of the dense model, shared by every method.",
            "",
            table,
            "",
            "Goal checks (the issue's, on the mean over seeds; goal rows: mnist1d-mlp 0.9 to 0.95 and digits-mlp "
            "0.95, the others for information):",
            "",
            goals_table(rows),
            "",
            "Mean wall seconds per run (engine's count, dense model from the cache except on the first run "
            "per problem and seed):",
            "",
            seconds_table(rows),
            "",
            "Curves: `accuracy_vs_epoch.png`; raw numbers: `results.json`.",
            "",
        ]
    )
    (args.out / "results.md").write_text(text, encoding="utf-8")
    payload = {
        "command": command,
        "epochs": args.epochs,
        "pretrain_epochs": args.pretrain_epochs,
        "problems": args.problems,
        "sparsities": args.grid,
        "seeds": args.seeds,
        "methods": list(METHODS),
        "settings": args.method_settings,
        "thresholds": {name or "default": rule.describe() for name, rule in args.thresholds.items()},
        "curve_definition": "curve[e] = hard-prune test accuracy after epoch e (after retraining epoch e for "
        "magnitude+retrain); curve[0] = one-shot magnitude accuracy of the dense model",
        "torch": torch.__version__,
        "threads": threads,
        "wall_seconds": wall,
        "runs": records,
        "summary": [
            {key: value for key, value in row.items() if key != "dense_pct"}
            | {"dense_accuracy_mean": row["dense"][0], "dense_accuracy_std": row["dense"][1]}
            for row in rows
        ],
    }
    write_results(args.out, text, payload)
    plot(records, rows, args.out / "accuracy_vs_epoch.png")
    print(table)
    print()
    print(goals_table(rows))
    print(f"\nwall time {wall:.1f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
