"""fw's N:M search after rounding, on the layers of the real all-MiniLM-L6-v2: group sweeps against tabu steps.

Step 1 records the layer problems (W, G) that a real ``minilm-layerwise`` run with fw's defaults hands
its solver (every block pruned by fw and its pruned outputs propagated to the next), through an fw
solver that keeps a copy of each layer it prunes. Step 2 prunes every recorded
layer again with each fw setting, on one thread, and reports the mean relative layer error
:math:`\\|(W - \\hat W)X\\|^2 / \\|WX\\|^2` as a fraction of Wanda's on the same layers, and the
solver seconds. The settings compared by default are those of the N:M search table in
``docs/formulations/layerwise.md``.

Usage::

    .venv/bin/python benchmarks/nm_search.py             # 2:4, all 36 layers, the docs' settings (~4 min)
    .venv/bin/python benchmarks/nm_search.py --pattern 4:8 --layers 12 \\
        --configs "polish_sweeps=6 tabu_steps=0" "tabu_steps=120"
    .venv/bin/python benchmarks/nm_search.py --quick     # tiny calibration, first 6 layers, 2 settings (~20 s)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    checked,
    command_line,
    out_folder,
    positive_int,
    results_dir,
    thread_count,
    torch_threads,
    write_results,
)

from constrainedsparse import prune_layerwise
from constrainedsparse.layerwise.base import LayerProblem, LayerResult
from constrainedsparse.layerwise.fw import FWConfig, FWSolver
from constrainedsparse.layerwise.solvers import Wanda
from constrainedsparse.settings import config_field_types, parse_value, route_settings
from constrainedsparse.spec import load_problem
from constrainedsparse.targets import SparsityConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "nm_search"
CONFIGS = (
    "polish_sweeps=6 tabu_steps=0",
    "polish_sweeps=3 tabu_steps=0",
    "polish_sweeps=6 tabu_steps=100",
    "polish_sweeps=3 tabu_steps=100",
    "polish_sweeps=1 tabu_steps=100",
    "tabu_steps=120",
    "",
    "tabu_steps=180",
    "tabu_tenure=10",
    "tabu_tenure=30",
)
QUICK_CONFIGS = ("polish_sweeps=6 tabu_steps=0", "")
# Quick: a tiny calibration, and the recording run prunes with a single Frank-Wolfe iteration.
QUICK_OPTIONS = {
    "calibration_samples": "8",
    "held_out_samples": "8",
    "max_tokens": "32",
    "iterations": "1",
    "tabu_steps": "0",
}
QUICK_LAYERS = 6


class RecordingFW(FWSolver):
    """fw that keeps a copy of every layer problem it is given (no registry entry: nothing else sees it)."""

    def __init__(self, config: FWConfig | None = None) -> None:
        super().__init__(config)
        self.recorded: list[LayerProblem] = []

    def prune(self, layer: LayerProblem) -> LayerResult:
        self.recorded.append(
            LayerProblem(layer.name, layer.weight.detach().clone(), layer.gram.detach().clone(), layer.target)
        )
        return super().prune(layer)


def parse_config(text: str) -> FWConfig:
    """``"key=value key=value"`` (empty: fw's defaults) as a validated :class:`FWConfig`."""
    types = config_field_types(FWConfig)
    values: dict[str, Any] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"setting {item!r} must be KEY=VALUE with KEY one of {', '.join(types)}")
        values[key] = parse_value(key, value, types[key])
    config = FWConfig.from_values(values)
    config.validate()
    return config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny calibration, first 6 layers, 2 settings")
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    parser.add_argument(
        "--layers", type=positive_int, help="prune only the first LAYERS recorded layers (default: all)"
    )
    parser.add_argument("--configs", nargs="+", help="fw settings, each one string of KEY=VALUE ('' = defaults)")
    parser.add_argument("--threads", type=thread_count, default=1, help="torch threads of step 2 (default 1)")
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/nm_search; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    if args.configs is None:
        args.configs = list(QUICK_CONFIGS if args.quick else CONFIGS)
    if args.quick and args.layers is None:
        args.layers = QUICK_LAYERS
    checked(parser, SparsityConfig.parse, args.pattern, flag="--pattern")  # before the model is loaded
    for text in args.configs:
        checked(parser, parse_config, text, flag="--configs")
    return args


def record(pattern: str, settings: dict[str, str]) -> list[LayerProblem]:
    """The layer problems of a ``minilm-layerwise`` run with fw (``settings``: its ``--set``) at ``pattern``.

    The model and calibration batches are the problem's, pruned through :func:`constrainedsparse.prune_layerwise`
    (the same block driver as ``constrainedsparse run``) with a recording fw of the same configuration.
    """
    problem = load_problem("minilm-layerwise")
    routed = route_settings(
        settings,
        {"solver": config_field_types(FWConfig), "options": {k: type(v) for k, v in problem.options.items()}},
        "for nm_search",
    )
    options = {**problem.options, **routed["options"]}
    recorder = RecordingFW(FWConfig.from_values(routed["solver"]))
    prune_layerwise(problem.model(options), problem.calibration(options, 0), recorder, pattern=pattern)
    return recorder.recorded


def measure(layers: Sequence[LayerProblem], configs: Sequence[str]) -> tuple[float, list[dict[str, Any]]]:
    """Wanda's mean relative error, and every setting's (also as a fraction of Wanda's) and solver seconds."""
    wanda = sum(layer.relative_error(Wanda().prune(layer).weight) for layer in layers)
    results = []
    for text in configs:
        solver = FWSolver(parse_config(text))
        seconds, error = 0.0, 0.0
        for layer in layers:
            started = time.perf_counter()
            weight = solver.prune(layer).weight
            seconds += time.perf_counter() - started
            error += layer.relative_error(weight)
        results.append(
            {
                "settings": text or "(defaults)",
                "mean_layer_error": error / len(layers),
                "error_vs_wanda": error / wanda,
                "solver_seconds": seconds,
            }
        )
        print(f"{results[-1]['settings']:<32} {error / wanda:.4f} x wanda  {seconds:.1f} s", flush=True)
    return wanda / len(layers), results


def markdown(results: list[dict[str, Any]], pattern: str, layers: int, wanda: float, command: str) -> str:
    """The results as a markdown table."""
    lines = [
        f"# fw's N:M search at {pattern} on {layers} recorded all-MiniLM-L6-v2 layers",
        "",
        f"Command: `{command}`",
        "",
        f"Wanda's mean relative layer error on these layers: {wanda:.4f}.",
        "",
        "| fw settings | mean layer error | error / Wanda's | solver s |",
        "|---|---|---|---|",
    ]
    for r in results:
        figures = f"{r['mean_layer_error']:.4f} | {r['error_vs_wanda']:.4f} | {r['solver_seconds']:.1f}"
        lines.append(f"| `{r['settings']}` | {figures} |")
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; writes ``results.md`` and ``results.json``."""
    args = parse_args(argv)
    command = command_line("benchmarks/nm_search.py", argv)
    layers = record(args.pattern, QUICK_OPTIONS if args.quick else {})
    layers = layers[: args.layers] if args.layers is not None else layers
    with torch_threads(args.threads):
        wanda, results = measure(layers, args.configs)
    text = markdown(results, args.pattern, len(layers), wanda, command)
    payload = {"command": command, "pattern": args.pattern, "layers": [layer.name for layer in layers]}
    write_results(args.out, text, {**payload, "wanda_mean_layer_error": wanda, "results": results})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
