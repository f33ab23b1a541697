"""Controllability of ``l0``: achieved expected density against the target (the diagonal plot).

For every target density ``d`` (``--sparsity 1 - d``), scope (model-wise / layer-wise) and seed the
script runs ``l0`` through the engine and reads ``summary.json``: the model-wise expected density
:math:`\\sum_n |\\theta_n| \\bar P_n / \\sum_n |\\theta_n|` at the end of pruning, the per-layer expected
densities, the median-rule (test-time) density and the hard-prune accuracy. Next to it the penalized
baseline ``l0-penalty`` runs over a sweep of fixed ``lmbda``: its achieved density is whatever
``lmbda`` gives, which is the controllability gap the constrained formulation closes.

The goals of issue 4 are ``|achieved expected density - target| <= 0.02`` for every target (the
table reports the worst gap over seeds, model-wise, and over seeds and layers, layer-wise) and the
test-time model's measured density within 0.03 of the target: the median-rule density (model-wise,
or per layer), and with ``--set grouping=structured`` the purged model's targeted parameters over
the dense ones (``purged_density`` of ``summary.json``). Each target's row also shows the
penalized baseline's gated accuracy at the sweep's ``lmbda`` whose density is nearest.

``--set`` passes ``l0`` settings to every run, e.g. ``--set density_constraint=equality --set
density_dual_kp=10`` or ``--set grouping=structured`` (``scope`` is set per run by ``--scopes``).
With ``--set density_of=purged`` (structured, ``--scopes model``) the constraint is on the expected
purged density, so the expected column and its gap are that one (``expected_purged_density`` of
``summary.json``); structured tables also show the hard-pruned weight density (1 - ``achieved_sparsity``).

Usage::

    .venv/bin/python benchmarks/l0_control.py                 # mnist1d-mlp, 5 targets x 2 scopes x 3 seeds
    .venv/bin/python benchmarks/l0_control.py --quick         # digits-mlp, 2 targets, 1 seed, 2 epochs
    .venv/bin/python benchmarks/l0_control.py --epochs 30 --dual-lr 2 --out benchmarks/results/l0_control
    .venv/bin/python benchmarks/l0_control.py --set grouping=structured --out benchmarks/results/l0_control_structured
    .venv/bin/python benchmarks/l0_control.py --scopes model --set grouping=structured --set density_of=purged \\
        --lmbdas 0 --threads 1 --out benchmarks/results/l0_control_structured_purged
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    command_line,
    out_folder,
    positive_int,
    results_dir,
    scratch_dir,
    thread_count,
    torch_threads,
    write_results,
)

from constrainedsparse import RunConfig, run
from constrainedsparse.engine import prepare
from constrainedsparse.formulations.l0 import L0PenaltyConfig
from constrainedsparse.logger import read_metrics

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "l0_control"
DEFAULT_TARGETS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_LMBDAS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
GOAL = 0.02
TEST_GOAL = 0.03
PENALTY_KEYS = frozenset(f.name for f in dataclasses.fields(L0PenaltyConfig))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``--quick`` fills in small defaults for what was not given)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits-mlp, targets 0.3 0.7, one seed, 2 epochs")
    parser.add_argument("--problem", default=None, help="bundled problem (default mnist1d-mlp)")
    parser.add_argument("--targets", type=float, nargs="+", default=None, help="target densities in (0, 1]")
    parser.add_argument("--scopes", nargs="+", default=["model", "layer"], choices=["model", "layer"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    parser.add_argument("--epochs", type=positive_int, default=None, help="pruning epochs, >= 1 (default 20)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="dense pre-training (problem default)")
    parser.add_argument("--dual-lr", type=float, default=1.0, help="step on the density multipliers (density_dual_lr)")
    parser.add_argument("--lmbdas", type=float, nargs="+", default=None, help="l0-penalty sweep")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/l0_control; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    quick = args.quick
    args.problem = args.problem if args.problem is not None else ("digits-mlp" if quick else "mnist1d-mlp")
    args.targets = args.targets or ([0.3, 0.7] if quick else list(DEFAULT_TARGETS))
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.epochs = args.epochs if args.epochs is not None else (2 if quick else 20)
    if args.pretrain_epochs is None and quick:
        args.pretrain_epochs = 2
    args.lmbdas = args.lmbdas or ([0.0, 10.0] if quick else list(DEFAULT_LMBDAS))
    for d in args.targets:
        if not 0.0 < d <= 1.0:
            parser.error(f"target densities must be in (0, 1], got {d}")
    for item in args.settings:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
    return args


def _settings(items: Sequence[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def _config(
    args: argparse.Namespace, formulation: str, density: float, seed: int, settings: dict, out: Path
) -> RunConfig:
    return RunConfig(
        problem=args.problem,
        formulation=formulation,
        sparsity=round(1.0 - density, 10),
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        seed=seed,
        out=out,
        wandb="disabled",
        progress=False,
        settings=settings,
    )


def _constrained_settings(args: argparse.Namespace, scope: str) -> dict[str, str]:
    return {"density_dual_lr": str(args.dual_lr), "scope": scope, **_settings(args.settings)}


def _penalty_settings(args: argparse.Namespace, lmbda: float) -> dict[str, str]:
    # The penalty ignores the level; --sparsity only sets the hard-pruning target (0.5). It takes
    # the shared gate settings (grouping, gate_lr, ...), not l0's constraint settings.
    shared = {k: v for k, v in _settings(args.settings).items() if k in PENALTY_KEYS}
    return {"lmbda": str(lmbda), **shared}


def check_configs(args: argparse.Namespace) -> str | None:
    """Validates every run's configuration before the first one trains: the first error's line, or ``None``."""
    planned = [("l0", d, _constrained_settings(args, s)) for s in args.scopes for d in args.targets]
    planned += [("l0-penalty", 0.5, _penalty_settings(args, lmbda)) for lmbda in args.lmbdas]
    for formulation, density, settings in planned:
        try:
            prepare(_config(args, formulation, density, args.seeds[0], settings, Path("unused")))
        except ValueError as err:
            return f"{formulation} on {args.problem}: {err}"
    return None


def _one(args: argparse.Namespace, formulation: str, density: float, seed: int, settings: dict, out: Path) -> dict:
    summary = run(_config(args, formulation, density, seed, settings, out))
    # The gated model in eval mode (median rule) is what the engine evaluates at each pruning epoch end.
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("phase") == 0 and "accuracy/test" in r]
    summary["gated_accuracy"] = epochs[-1]["accuracy/test"] if epochs else float("nan")
    return summary


def run_all(args: argparse.Namespace, runs: Path) -> dict[str, list[dict[str, Any]]]:
    """Every constrained and penalized run (run directories under ``runs``); one record per run."""
    constrained, penalized = [], []
    for scope in args.scopes:
        for density in args.targets:
            for seed in args.seeds:
                settings = _constrained_settings(args, scope)
                s = _one(args, "l0", density, seed, settings, runs / f"l0-{scope}-d{density:g}-seed{seed}")
                # density_of=purged constrains the expected purged density: that is the one to hold to the target.
                expected = s.get("expected_purged_density", s["expected_density"])
                layer_gap = max(abs(v - density) for v in s["layer_density"].values())
                layer_test_gap = max(abs(v - density) for v in s["layer_test_density"].values())
                purged = s.get("purged_density")  # structured grouping only
                constrained.append(
                    {
                        "scope": scope,
                        "target": density,
                        "seed": seed,
                        "expected_density": expected,
                        "expected_weight_density": s["expected_density"],
                        "constrains_purged": "expected_purged_density" in s,
                        "layer_density": s["layer_density"],
                        "gap": abs(expected - density),
                        "layer_gap": layer_gap,
                        "test_density": s["test_density"],
                        "layer_test_density": s["layer_test_density"],
                        "test_gap": abs(s["test_density"] - density),
                        "layer_test_gap": layer_test_gap,
                        "purged_density": purged,
                        "purged_nonzero_density": s.get("purged_nonzero_density"),
                        "purged_gap": None if purged is None else abs(purged - density),
                        "weight_density": 1.0 - s["achieved_sparsity"],
                        "purged_params": s.get("purged_params"),
                        "dense_params": s.get("dense_params"),
                        "hardprune_accuracy": s["hardprune_accuracy"],
                        "gated_accuracy": s["gated_accuracy"],
                        "dense_accuracy": s["dense_accuracy"],
                        "seconds": s["seconds"],
                    }
                )
                print(f"l0 {scope} target {density:g} seed {seed}: {expected:.4f}", file=sys.stderr)
    for lmbda in args.lmbdas:
        for seed in args.seeds:
            s = _one(
                args, "l0-penalty", 0.5, seed, _penalty_settings(args, lmbda), runs / f"penalty-l{lmbda:g}-seed{seed}"
            )
            penalized.append(
                {
                    "lmbda": lmbda,
                    "seed": seed,
                    "expected_density": s["expected_density"],
                    "test_density": s["test_density"],
                    "gated_accuracy": s["gated_accuracy"],
                    "seconds": s["seconds"],
                }
            )
            print(f"l0-penalty lmbda {lmbda:g} seed {seed}: {s['expected_density']:.4f}", file=sys.stderr)
    return {"constrained": constrained, "penalized": penalized}


def _ms(values: Sequence[float], digits: int = 4) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _penalty_means(records: dict[str, list[dict[str, Any]]], lmbdas: Sequence[float]) -> list[dict[str, Any]]:
    """Per ``lmbda`` of the sweep: mean expected density and the gated accuracies over seeds."""
    means = []
    for lmbda in lmbdas:
        rows = [r for r in records["penalized"] if r["lmbda"] == lmbda]
        if rows:
            density = statistics.fmean(r["expected_density"] for r in rows)
            means.append({"lmbda": lmbda, "density": density, "acc": [100 * r["gated_accuracy"] for r in rows]})
    return means


def nearest_penalty(records: dict[str, list[dict[str, Any]]], lmbdas: Sequence[float], density: float) -> str:
    """The penalized baseline at the matching density: gated accuracy of the ``lmbda`` whose mean expected
    density is nearest to ``density``, with that ``lmbda`` and density (a measured run, no interpolation)."""
    means = _penalty_means(records, lmbdas)
    if not means:
        return "–"
    best = min(means, key=lambda m: abs(m["density"] - density))
    return f"{_ms(best['acc'], 2)} (λ {best['lmbda']:g}, d {best['density']:.3f})"


def _test_time_gap(rows: list[dict[str, Any]], scope: str) -> float:
    """Worst gap of the test-time model: the purged model's density (structured), else the median-rule
    density (model-wise, or per layer in layer scope)."""
    if all(r.get("purged_gap") is not None for r in rows):
        return max(r["purged_gap"] for r in rows)
    return max(r["test_gap"] if scope == "model" else r["layer_test_gap"] for r in rows)


def markdown(args: argparse.Namespace, records: dict[str, list[dict[str, Any]]], command: str) -> str:
    """The results page: constrained table (per scope and target), penalty sweep, goal verdicts."""
    structured = any(r.get("purged_density") is not None for r in records["constrained"])
    constrains_purged = any(r.get("constrains_purged") for r in records["constrained"])
    settings = ", ".join(f"`{item}`" for item in args.settings) or "defaults"
    purged_cols = " hard-pruned weight density | purged density | purged nonzero density |" if structured else ""
    expected_col = "expected purged density" if constrains_purged else "expected density"
    lines = [
        "# l0 controllability",
        "",
        f"Command: `{command}`",
        "",
        f"Problem {args.problem}, {args.epochs} pruning epochs, dual lr {args.dual_lr}, settings {settings}, seeds "
        f"{' '.join(map(str, args.seeds))}. Expected density at the end of pruning (mean ± std over seeds); "
        f"worst gap = max over seeds (and, layer-wise, over layers) of |achieved − target|; goal ≤ {GOAL}. "
        f"Test-time gap: the same for the test-time model's measured density (median-rule gates; with "
        f"structured grouping the purged model's targeted parameters over the dense ones); goal ≤ {TEST_GOAL}."
        + (
            " With `density_of=purged` the constraint, the expected column and its gap are the expected purged "
            "density (Σ_l in_l P̄_l · out_l P̄_(l+1) / Σ_l in_l out_l); the layer gap is that of the layers' "
            "expected weight densities (informational in model scope)."
            if constrains_purged
            else ""
        )
        + (
            " Hard-pruned weight density: 1 − `achieved_sparsity`, the unpurged targeted weights kept by the "
            "hard masks."
            if structured
            else ""
        ),
        "",
        f"| scope | target | {expected_col} | worst gap | worst layer gap | median-rule density |"
        + purged_cols
        + " worst test-time gap | gated (median-rule) acc. % | hard-prune acc. % "
        "| l0-penalty acc. % at nearest density | goal met (expected) | goal met (test-time) |",
        "|---|---|---|---|---|---|" + ("---|---|---|" if structured else "") + "---|---|---|---|---|---|",
    ]
    met_all = test_met_all = True
    for scope in args.scopes:
        for density in args.targets:
            rows = [r for r in records["constrained"] if r["scope"] == scope and r["target"] == density]
            gap = max(r["gap"] for r in rows)
            layer_gap = max(r["layer_gap"] for r in rows)
            met = (gap if scope == "model" else layer_gap) <= GOAL
            test_gap = _test_time_gap(rows, scope)
            test_met = test_gap <= TEST_GOAL
            met_all &= met
            test_met_all &= test_met
            acc = [100 * r["hardprune_accuracy"] for r in rows]
            gated = [100 * r["gated_accuracy"] for r in rows]
            purged = (
                f" {_ms([r['weight_density'] for r in rows])} | {_ms([r['purged_density'] for r in rows])} | "
                f"{_ms([r['purged_nonzero_density'] for r in rows])} |"
                if structured
                else ""
            )
            lines.append(
                f"| {scope} | {density:g} | {_ms([r['expected_density'] for r in rows])} | {gap:.4f} | "
                f"{layer_gap:.4f} | {_ms([r['test_density'] for r in rows])} |{purged} {test_gap:.4f} | "
                f"{_ms(gated, 2)} | {_ms(acc, 2)} | {nearest_penalty(records, args.lmbdas, density)} | "
                f"{'yes' if met else 'no'} | {'yes' if test_met else 'no'} |"
            )
    dense = statistics.fmean(r["dense_accuracy"] for r in records["constrained"])
    lines += [
        "",
        f"Dense accuracy {100 * dense:.2f} %. Expected-density goal met for every target: "
        f"{'yes' if met_all else 'no'}; test-time goal met for every target: {'yes' if test_met_all else 'no'}. "
        "Gated accuracy: the model with median-rule gates at the last pruning epoch; hard-prune accuracy: "
        "after the formulation's hard masks at the target "
        "(one global budget in model scope, per layer in layer scope; no retraining). l0-penalty accuracy: "
        "the gated accuracy of the sweep's λ whose mean expected density is nearest to the target.",
        "",
        "## Penalized baseline (`l0-penalty`, fixed λ)",
        "",
        "| lmbda | expected density | median-rule density | gated (median-rule) acc. % |",
        "|---|---|---|---|",
    ]
    for lmbda in args.lmbdas:
        rows = [r for r in records["penalized"] if r["lmbda"] == lmbda]
        lines.append(
            f"| {lmbda:g} | {_ms([r['expected_density'] for r in rows])} | {_ms([r['test_density'] for r in rows])} "
            f"| {_ms([100 * r['gated_accuracy'] for r in rows], 2)} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(args: argparse.Namespace, records: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Left: achieved vs target (diagonal) per scope; right: penalty density over lmbda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="target")
    for scope, marker in (("model", "o"), ("layer", "s")):
        rows = [r for r in records["constrained"] if r["scope"] == scope]
        if rows:
            left.scatter([r["target"] for r in rows], [r["expected_density"] for r in rows], marker=marker,
                         label=f"l0 {scope}-wise: expected", alpha=0.7)  # fmt: skip
            purged = [r for r in rows if r.get("purged_density") is not None]
            key = "purged_density" if purged else "test_density"
            test = [(r["target"], r[key]) for r in rows]
            left.scatter(*zip(*test), marker="x" if scope == "model" else "+", alpha=0.8,
                         label=f"l0 {scope}-wise: {'purged' if purged else 'median-rule'}")  # fmt: skip
    left.set_xlabel("target density")
    left.set_ylabel("achieved density")
    left.set_title(f"{args.problem}: l0 (constrained)")
    left.legend()
    rows = records["penalized"]
    xs = [max(r["lmbda"], min([x for x in args.lmbdas if x > 0] or [1e-3]) / 10) for r in rows]
    right.scatter(xs, [r["expected_density"] for r in rows], color="C3")
    right.set_xscale("log")
    if xs:  # the leftmost point (lmbda 0, or the smallest) at the left edge, as the label says
        right.set_xlim(left=min(xs) / 1.5, right=max(max(xs) * 1.5, min(xs) * 100))
    right.set_xlabel("lmbda (0 drawn at the left edge)")
    right.set_ylabel("achieved expected density")
    right.set_title("l0-penalty (fixed lmbda)")
    for density in args.targets:
        right.axhline(density, color="0.85", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; writes ``results.md``, ``results.json`` and ``l0_control.png`` under ``--out``."""
    args = parse_args(argv)
    error = check_configs(args)
    if error is not None:  # before any run, and nothing written
        print(f"error: {error}", file=sys.stderr)
        return 2
    with torch_threads(args.threads):
        started = time.perf_counter()
        with scratch_dir("l0_control-") as runs:
            records = run_all(args, runs)
        command = command_line("benchmarks/l0_control.py", argv)
        payload = {**records, "args": {k: str(v) for k, v in vars(args).items()}}
        payload["seconds"] = time.perf_counter() - started
        write_results(args.out, markdown(args, records, command), payload)
        plot(args, records, args.out / "l0_control.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
