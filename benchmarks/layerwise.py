"""Layer-wise pruning of the real all-MiniLM-L6-v2: magnitude, wanda, sparsegpt, fw, fw + reconstruct.

Every (setting, method) pair is one ``constrainedsparse run minilm-layerwise`` in its own process
(the same command a user types), so the peak resident memory of each is its own (``os.wait4``).
From each run's ``summary.json`` the table reports the mean relative layer error
:math:`\\|(W - \\hat W)X\\|^2 / \\|WX\\|^2` over the 36 linear layers on the calibration inputs,
the embedding fidelity on held-out paragraphs, the solver seconds (sum over layers of the time to
choose the mask and weights and measure the error), the whole run's seconds and the peak RSS.

Goals of issue 5 (ratios in the second table): fw (mask only) mean layer error <= 0.45 x Wanda's,
fw + reconstruct <= 0.65 x SparseGPT's, fw wall time <= 2 x SparseGPT's, at 50 %, 60 % and 2:4.
``fw-sweep`` (``--set polish_sweeps=6 tabu_steps=0``: the N:M group sweep instead of fw's default
tabu search, the default before) runs at N:M settings only, to compare the two searches in one run.

Usage::

    .venv/bin/python benchmarks/layerwise.py            # 3 settings x 5 methods, default calibration
    .venv/bin/python benchmarks/layerwise.py --quick    # 50 % only, wanda and fw, 8 short paragraphs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import command_line, write_results

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "layerwise"
SETTINGS: dict[str, list[str]] = {
    "50%": ["--sparsity", "0.5"],
    "60%": ["--sparsity", "0.6"],
    "2:4": ["--pattern", "2:4"],
}
METHODS: dict[str, list[str]] = {
    "magnitude": ["--formulation", "magnitude"],
    "wanda": ["--formulation", "wanda"],
    "sparsegpt": ["--formulation", "sparsegpt"],
    "fw": ["--formulation", "fw"],
    "fw+reconstruct": ["--formulation", "fw", "--set", "reconstruct=true"],
    "fw-sweep": ["--formulation", "fw", "--set", "polish_sweeps=6", "--set", "tabu_steps=0"],
}
# Both searches move N:M groups: at row sparsity the run would repeat fw.
NM_ONLY_METHODS = ("fw-sweep",)
QUICK_SETTINGS = ("50%",)
QUICK_METHODS = ("wanda", "fw")
QUICK_OPTIONS = ("calibration_samples=8", "held_out_samples=8", "max_tokens=32")
FW_ERROR_GOAL, RECONSTRUCT_GOAL, TIME_GOAL = 0.45, 0.65, 2.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 %% only, wanda and fw, tiny calibration")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="default: all (quick: 50%%)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all (quick: wanda fw)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every run (e.g. calibration_samples=64)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="OMP/torch threads of each run (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.settings is None:
        args.settings = list(QUICK_SETTINGS if args.quick else SETTINGS)
    if args.methods is None:
        args.methods = list(QUICK_METHODS if args.quick else METHODS)
    if args.quick:
        args.extra = [*QUICK_OPTIONS, *args.extra]
    return args


def run_one(setting: str, method: str, extra: Sequence[str], threads: int | None, workdir: Path) -> dict[str, Any]:
    """Runs one configuration in a child process; returns its summary figures and peak RSS."""
    out = workdir / f"{setting.replace(':', '-').replace('%', '')}-{method}"
    command = [sys.executable, "-m", "constrainedsparse", "run", "minilm-layerwise", *SETTINGS[setting]]
    command += [*METHODS[method], "--out", str(out), "--wandb", "disabled", "--no-progress"]
    for item in extra:
        command += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4, not wait(): it returns this child's own resource usage (peak RSS).
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        last = log_path.read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"{setting} {method} failed with exit code {process.returncode}: {last}")
    summary = json.loads((out / "summary.json").read_text())
    peak = usage.ru_maxrss / 1024  # kilobytes on Linux
    return {
        "setting": setting,
        "method": method,
        "mean_layer_error": summary["mean_layer_error"],
        "fidelity": summary["fidelity"],
        "achieved_sparsity": summary["achieved_sparsity"],
        "solver_seconds": sum(summary["layer_seconds"].values()),
        "run_seconds": summary["seconds"],
        "process_seconds": wall,
        "peak_rss_mb": peak,
        "calibration_tokens": summary["calibration_tokens"],
    }


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Goal ratios per setting, where the methods they need were run."""
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        by = {r["method"]: r for r in results if r["setting"] == setting}
        row: dict[str, Any] = {"setting": setting}
        if "fw" in by and "wanda" in by:
            row["fw / wanda error"] = by["fw"]["mean_layer_error"] / by["wanda"]["mean_layer_error"]
        if "fw+reconstruct" in by and "sparsegpt" in by:
            row["fw+reconstruct / sparsegpt error"] = (
                by["fw+reconstruct"]["mean_layer_error"] / by["sparsegpt"]["mean_layer_error"]
            )
        if "fw" in by and "sparsegpt" in by:
            row["fw / sparsegpt run seconds"] = by["fw"]["run_seconds"] / by["sparsegpt"]["run_seconds"]
            row["fw / sparsegpt solver seconds"] = by["fw"]["solver_seconds"] / by["sparsegpt"]["solver_seconds"]
        if "fw-sweep" in by and "wanda" in by:
            row["fw-sweep / wanda error"] = by["fw-sweep"]["mean_layer_error"] / by["wanda"]["mean_layer_error"]
        if "fw-sweep" in by and "sparsegpt" in by:
            row["fw-sweep / sparsegpt run seconds"] = by["fw-sweep"]["run_seconds"] / by["sparsegpt"]["run_seconds"]
        rows.append(row)
    return rows


def markdown(results: list[dict[str, Any]], goal_rows: list[dict[str, Any]], command: str) -> str:
    """The results as markdown tables."""
    lines = [
        "# Layer-wise pruning of all-MiniLM-L6-v2 (36 linear layers, per-row masks; 2:4 along inputs)",
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
    if any(len(row) > 1 for row in goal_rows):
        keys = list(dict.fromkeys(k for row in goal_rows for k in row if k != "setting"))
        goals = {
            "fw / wanda error": FW_ERROR_GOAL,
            "fw+reconstruct / sparsegpt error": RECONSTRUCT_GOAL,
            "fw / sparsegpt run seconds": TIME_GOAL,
            "fw / sparsegpt solver seconds": TIME_GOAL,
            "fw-sweep / wanda error": FW_ERROR_GOAL,
            "fw-sweep / sparsegpt run seconds": TIME_GOAL,
        }
        lines += ["", "| setting | " + " | ".join(f"{k} (goal <= {goals[k]})" for k in keys) + " |"]
        lines.append("|---" * (len(keys) + 1) + "|")
        for row in goal_rows:
            cells = [f"{row[k]:.3f} ({'met' if row[k] <= goals[k] else 'NOT met'})" if k in row else "" for k in keys]
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
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate(methods):
        by = {r["setting"]: r for r in results if r["method"] == method}
        xs = [j + i * width for j in range(len(settings))]
        axes[0].bar(xs, [by[s]["mean_layer_error"] if s in by else 0 for s in settings], width, label=method)
        axes[1].bar(xs, [by[s]["fidelity"] if s in by else 0 for s in settings], width, label=method)
    for axis, title in zip(axes, ("mean relative layer error (lower is better)", "embedding fidelity (higher)")):
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
        axis.set_title(title)
    axes[1].set_ylim(min(r["fidelity"] for r in results) - 0.05, 1.0)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; writes ``results.md``, ``results.json`` and ``layerwise.png``."""
    args = parse_args(argv)
    command = command_line("benchmarks/layerwise.py", argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="layerwise-bench-") as workdir:
        for setting in args.settings:
            for method in args.methods:
                if method in NM_ONLY_METHODS and ":" not in setting:
                    continue
                result = run_one(setting, method, args.extra, args.threads, Path(workdir))
                results.append(result)
                print(
                    f"{setting:>4} {method:<15} error {result['mean_layer_error']:.4f} fidelity "
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
