"""Layer-wise pruning of the real all-MiniLM-L6-v2: magnitude, wanda, sparsegpt (both scopes), fw, fw + reconstruct.

Every (setting, method) pair is one ``constrainedsparse run minilm-layerwise`` in its own process
(the same command a user types), so the peak resident memory of each is its own (``os.wait4``).
From each run's ``summary.json`` the table reports the mean relative layer error
:math:`\\|(W - \\hat W)X\\|^2 / \\|WX\\|^2` over the 36 linear layers on the calibration inputs,
the embedding fidelity on held-out paragraphs, the solver seconds (sum over layers of the time to
choose the mask and weights and measure the error), the whole run's seconds and the peak RSS.

**Every baseline at its paper's setting.** At ``--sparsity`` settings the runner's default is
per-row masks (``mask_scope=row``), Wanda's comparison group. SparseGPT's paper selects its masks
over the whole layer, block by block: ``sparsegpt-layer`` (``--set mask_scope=layer``, i.e.
``--pattern unstructured``) runs next to ``sparsegpt`` (rows), and every ratio is taken against the
better of the two (lower error), named in the ratio table. fw runs at both scopes too
(``fw-layer``, ``fw+reconstruct-layer``), and the table says which scope wins. At N:M settings the
scope does not apply and the ``-layer`` methods are not run.

Goals (issue items 3 and 4, ratios in the second table): fw (mask only) mean layer error <= 0.40 x
Wanda's, fw + reconstruct <= 0.55 x the best SparseGPT's, fw solver seconds <= 2 x the best
SparseGPT's, at 50 %, 60 % and 2:4. ``fw-sweep`` (``--set polish_sweeps=6 tabu_steps=0``: the N:M
group sweep instead of fw's tabu search) runs at N:M settings only, to compare the two searches in
one run.

Usage::

    .venv/bin/python benchmarks/layerwise.py            # 3 settings x 9 methods, default calibration
    .venv/bin/python benchmarks/layerwise.py --quick    # 50 % only, wanda and fw, 8 short paragraphs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import command_line, scratch_dir, sweep_child, sweep_defaults, sweep_parser, write_results

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "layerwise"
SETTINGS: dict[str, list[str]] = {
    "50%": ["--sparsity", "0.5"],
    "60%": ["--sparsity", "0.6"],
    "2:4": ["--pattern", "2:4"],
}
LAYER_SCOPE = ["--set", "mask_scope=layer"]
METHODS: dict[str, list[str]] = {
    "magnitude": ["--formulation", "magnitude"],
    "wanda": ["--formulation", "wanda"],
    "sparsegpt": ["--formulation", "sparsegpt"],
    "sparsegpt-layer": ["--formulation", "sparsegpt", *LAYER_SCOPE],
    "fw": ["--formulation", "fw"],
    "fw-layer": ["--formulation", "fw", *LAYER_SCOPE],
    "fw+reconstruct": ["--formulation", "fw", "--set", "reconstruct=true"],
    "fw+reconstruct-layer": ["--formulation", "fw", "--set", "reconstruct=true", *LAYER_SCOPE],
    "fw-sweep": ["--formulation", "fw", "--set", "polish_sweeps=6", "--set", "tabu_steps=0"],
    "admm": ["--formulation", "admm"],
    "admm-layer": ["--formulation", "admm", *LAYER_SCOPE],
}
# Both searches move N:M groups: at row sparsity the run would repeat fw.
NM_ONLY_METHODS = ("fw-sweep",)
# The mask scope is a --sparsity option: an N:M pattern has none.
SPARSITY_ONLY_METHODS = ("sparsegpt-layer", "fw-layer", "fw+reconstruct-layer", "admm-layer")
SPARSEGPT_SCOPES = ("sparsegpt", "sparsegpt-layer")
QUICK_SETTINGS = ("50%",)
QUICK_METHODS = ("wanda", "fw")
QUICK_OPTIONS = ("calibration_samples=8", "held_out_samples=8", "max_tokens=32")
FW_ERROR_GOAL, RECONSTRUCT_GOAL, TIME_GOAL = 0.40, 0.55, 2.0
# The ratio columns and their goals (None: reported without a goal).
GOALS: dict[str, float | None] = {
    "fw / wanda error": FW_ERROR_GOAL,
    "fw-layer / wanda error": FW_ERROR_GOAL,
    "fw / best sparsegpt error": None,
    "fw-layer / best sparsegpt error": None,
    "fw+reconstruct / best sparsegpt error": RECONSTRUCT_GOAL,
    "fw+reconstruct-layer / best sparsegpt error": RECONSTRUCT_GOAL,
    "fw / best sparsegpt solver seconds": TIME_GOAL,
    "fw-layer / best sparsegpt solver seconds": TIME_GOAL,
    "fw / best sparsegpt run seconds": None,
    "fw-sweep / wanda error": FW_ERROR_GOAL,
    "fw-sweep / best sparsegpt solver seconds": TIME_GOAL,
    "admm / best sparsegpt error": None,
    "admm-layer / best sparsegpt error": None,
    "admm / best sparsegpt solver seconds": None,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    args = sweep_parser(__doc__.split("\n\n")[0], SETTINGS, METHODS, DEFAULT_OUT).parse_args(argv)
    return sweep_defaults(args, (SETTINGS, QUICK_SETTINGS), (METHODS, QUICK_METHODS), QUICK_OPTIONS)


def applies(setting: str, method: str) -> bool:
    """Whether ``method`` runs at ``setting`` (the scope is a --sparsity option; the sweep is N:M's)."""
    nm = ":" in setting
    return not (method in NM_ONLY_METHODS and not nm) and not (method in SPARSITY_ONLY_METHODS and nm)


def run_one(
    setting: str, method: str, extra: Sequence[str], threads: int | None, workdir: Path, seed: int = 0
) -> dict[str, Any]:
    """Runs one configuration in a child process; returns its summary figures and peak RSS."""
    out = workdir / f"{setting.replace(':', '-').replace('%', '')}-{method}"
    args = [*SETTINGS[setting], *METHODS[method], "--seed", str(seed)]
    for item in extra:
        args += ["--set", item]
    child = sweep_child("minilm-layerwise", args, out, threads)
    summary = child.summary
    return {
        "setting": setting,
        "method": method,
        "mean_layer_error": summary["mean_layer_error"],
        "fidelity": summary["fidelity"],
        "achieved_sparsity": summary["achieved_sparsity"],
        "solver_seconds": sum(summary["layer_seconds"].values()),
        "run_seconds": summary["seconds"],
        "process_seconds": child.wall_seconds,
        "peak_rss_mb": child.peak_rss_mb,
        "calibration_tokens": summary["calibration_tokens"],
        "seed": summary["seed"],
    }


def best_sparsegpt(by: dict[str, dict[str, Any]]) -> str | None:
    """The SparseGPT scope of lower mean layer error among those run (``None``: none ran)."""
    ran = [name for name in SPARSEGPT_SCOPES if name in by]
    return min(ran, key=lambda name: by[name]["mean_layer_error"]) if ran else None


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Goal ratios per setting, where the methods they need were run, against the better SparseGPT."""
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        by = {r["method"]: r for r in results if r["setting"] == setting}
        row: dict[str, Any] = {"setting": setting}
        best = best_sparsegpt(by)
        if best is not None:
            row["best sparsegpt"] = best
        fw_scopes = [name for name in ("fw", "fw-layer") if name in by]
        if fw_scopes:
            row["fw scope of lower error"] = min(fw_scopes, key=lambda name: by[name]["mean_layer_error"])

        pairs = [(method, "wanda", "wanda") for method in ("fw", "fw-layer", "fw-sweep")]
        reconstructing = ("fw+reconstruct", "fw+reconstruct-layer", "admm", "admm-layer")
        pairs += [(m, best, "best sparsegpt") for m in ("fw", "fw-layer", *reconstructing)]
        for method, reference, name in pairs:
            if method in by and reference in by:
                row[f"{method} / {name} error"] = by[method]["mean_layer_error"] / by[reference]["mean_layer_error"]
        if best is not None:
            for method in ("fw", "fw-layer", "fw-sweep", "admm"):
                if method in by:
                    seconds = by[method]["solver_seconds"] / by[best]["solver_seconds"]
                    row[f"{method} / best sparsegpt solver seconds"] = seconds
            if "fw" in by:
                row["fw / best sparsegpt run seconds"] = by["fw"]["run_seconds"] / by[best]["run_seconds"]
        rows.append(row)
    return rows


def _ratio_cell(value: Any, goal: float | None) -> str:
    if isinstance(value, str):
        return value
    if goal is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({'met' if value <= goal else 'NOT met'})"


def markdown(results: list[dict[str, Any]], goal_rows: list[dict[str, Any]], command: str) -> str:
    """The results as markdown tables."""
    lines = [
        "# Layer-wise pruning of all-MiniLM-L6-v2 (36 linear layers; per-row masks unless `-layer`; 2:4 along inputs)",
        "",
        f"Command: `{command}`",
        "",
        "| setting | method | mean layer error | fidelity | solver s | run s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['mean_layer_error']:.4f} | {r['fidelity']:.4f} | "
            f"{r['solver_seconds']:.1f} | {r['run_seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    keys = list(dict.fromkeys(k for row in goal_rows for k in row if k != "setting"))
    if any(k in GOALS for k in keys):
        header = [k if GOALS.get(k) is None else f"{k} (goal <= {GOALS[k]})" for k in keys]
        lines += ["", "| setting | " + " | ".join(header) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in goal_rows:
            cells = [_ratio_cell(row[k], GOALS.get(k)) if k in row else "" for k in keys]
            lines.append(f"| {row['setting']} | " + " | ".join(cells) + " |")
    tokens = {r["calibration_tokens"] for r in results}
    lines += ["", f"Calibration tokens (padding excluded): {', '.join(map(str, sorted(tokens)))}.", ""]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bars of mean layer error and fidelity per setting and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, method in enumerate(methods):
        by = {r["setting"]: r for r in results if r["method"] == method}
        xs = [j + i * width for j in range(len(settings))]
        axes[0].bar(xs, [by[s]["mean_layer_error"] if s in by else 0 for s in settings], width, label=method)
        axes[1].bar(xs, [by[s]["fidelity"] if s in by else 0 for s in settings], width, label=method)
    for axis, title in zip(axes, ("mean relative layer error (lower is better)", "embedding fidelity (higher)")):
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
        axis.set_title(title)
    axes[1].set_ylim(min(r["fidelity"] for r in results) - 0.05, 1.0)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; writes ``results.md``, ``results.json`` and ``layerwise.png``."""
    args = parse_args(argv)
    command = command_line("benchmarks/layerwise.py", argv)
    results = []
    with scratch_dir("layerwise-bench-") as workdir:
        for setting in args.settings:
            for method in args.methods:
                if not applies(setting, method):
                    continue
                result = run_one(setting, method, args.extra, args.threads, workdir, args.seed)
                results.append(result)
                print(
                    f"{setting:>4} {method:<21} error {result['mean_layer_error']:.4f} fidelity "
                    f"{result['fidelity']:.4f} solver {result['solver_seconds']:.1f}s run {result['run_seconds']:.1f}s",
                    flush=True,
                )
    goal_rows = ratios(results)
    text = markdown(results, goal_rows, command)
    write_results(args.out, text, {"command": command, "results": results, "ratios": goal_rows})
    plot(results, args.out / "layerwise.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
