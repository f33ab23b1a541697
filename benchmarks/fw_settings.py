"""fw settings against SparseGPT and Wanda on recorded layers of a real model: error and solver seconds, interleaved.

Step 1 records the layer problems (W, G) that a real layer-wise run hands its solver (every block
pruned by the recording solver, ``--record-with``, and its pruned outputs propagated to the next;
SparseGPT records SmolLM2 in a fraction of fw's time), like ``benchmarks/nm_search.py``. Step 2
prunes every recorded layer with each baseline and each fw setting *in turn, layer by layer*, on
one thread, so that a machine shared with other jobs slows every method alike. A layer's seconds
are those of ``layer_seconds`` in a run: the solver and the relative error of its result.

The table gives the mean relative layer error :math:`\\|(W - \\hat W)X\\|^2 / \\|WX\\|^2`, as a
fraction of Wanda's and of the better SparseGPT's (row or layer scope, lower error), and the solver
seconds, as a multiple of that SparseGPT's. The fw settings of the measured tables in
``docs/formulations/layerwise.md`` were compared with it.

Usage::

    .venv/bin/python benchmarks/fw_settings.py --problem minilm-layerwise --setting 50% \\
        --configs "" "swap_steps=40" "relax_rows=true iterations=5"
    .venv/bin/python benchmarks/fw_settings.py --problem smollm2-wiki --setting 2:4 --record-with sparsegpt \\
        --blocks 10 20 --configs "" "iterations=20 tabu_steps=150"
    .venv/bin/python benchmarks/fw_settings.py --quick   # tiny MiniLM calibration, first 6 layers, defaults only
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import (
    checked,
    command_line,
    non_negative_int,
    out_folder,
    positive_int,
    problem_of_kind,
    results_dir,
    thread_count,
    torch_threads,
    usage_error,
    write_results,
)
from nm_search import parse_config

from constrainedsparse import prune_layerwise
from constrainedsparse.layerwise.base import LayerProblem, LayerResult, LayerwiseSolver, solver_class
from constrainedsparse.layerwise.fw import FWSolver
from constrainedsparse.layerwise.solvers import SparseGPT, Wanda
from constrainedsparse.spec import load_problem
from constrainedsparse.targets import SparsityConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fw_settings"
SETTINGS = {"50%": {"sparsity": 0.5}, "60%": {"sparsity": 0.6}, "2:4": {"pattern": "2:4"}}
QUICK_OPTIONS = {"calibration_samples": 8, "held_out_samples": 8, "max_tokens": 32}
QUICK_LAYERS = 6
BASELINES = ("wanda", "sparsegpt", "sparsegpt-layer")


def recording(base: type[LayerwiseSolver]) -> LayerwiseSolver:
    """An instance of ``base`` that keeps a copy of every layer problem it is given (no registry entry)."""

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.recorded: list[LayerProblem] = []

        def prune(self, layer: LayerProblem) -> LayerResult:
            copy = LayerProblem(layer.name, layer.weight.detach().clone(), layer.gram.detach().clone(), layer.target)
            self.recorded.append(copy)
            return super().prune(layer)

    return Recording()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny MiniLM calibration, first 6 layers, defaults")
    parser.add_argument("--problem", default="minilm-layerwise", help="a bundled layer-wise problem")
    parser.add_argument("--setting", default="50%", choices=list(SETTINGS))
    parser.add_argument("--record-with", default="fw", choices=("fw", "sparsegpt", "wanda"))
    parser.add_argument(
        "--blocks", nargs="+", type=non_negative_int, help="only the layers of these blocks (default: all)"
    )
    parser.add_argument("--layers", type=positive_int, help="only the first LAYERS recorded layers")
    help_configs = "fw settings, each a string of KEY=VALUE ('': defaults; mask_scope=layer: layer-wide)"
    parser.add_argument("--configs", nargs="+", default=[""], help=help_configs)
    parser.add_argument("--threads", type=thread_count, default=1, help="torch threads of step 2 (default 1)")
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/fw_settings; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    problem_of_kind(parser, "--problem", args.problem, layerwise=True)  # bad inputs fail before the model is loaded
    for text in args.configs:
        checked(parser, parse_config, _fw_part(text), flag="--configs")
    if args.quick and args.layers is None:
        args.layers = QUICK_LAYERS
    return args


def record(
    problem_name: str, setting: str, base: str, quick: bool, blocks: Sequence[int] | None = None
) -> list[LayerProblem]:
    """The layer problems a ``problem_name`` run at ``setting`` hands the ``base`` solver, block after block
    (``blocks``: refused, before the recording, unless the model has them)."""
    problem = load_problem(problem_name)
    options = {**problem.options, **(QUICK_OPTIONS if quick else {})}
    model = problem.model(options)
    count = len(problem.model_blocks(model))
    if blocks and max(blocks) >= count:
        usage_error(f"--blocks {max(blocks)}: {problem_name} has {count} blocks, numbered 0 to {count - 1}")
    recorder = recording(solver_class(base))
    prune_layerwise(model, problem.calibration(options, 0), recorder, **SETTINGS[setting])
    return recorder.recorded


def _fw_part(text: str) -> str:
    """A setting's fw keys: ``mask_scope=layer`` (fw on the layer-wide pattern) is the benchmark's own."""
    return " ".join(item for item in text.split() if not item.startswith("mask_scope="))


def _in_blocks(name: str, blocks: Sequence[int]) -> bool:
    """Whether a weight name lies in one of ``blocks`` (``...layers.10.self_attn...``, ``...layer.3....``)."""
    found = re.search(r"\.layers?\.(\d+)\.", name)
    return found is not None and int(found.group(1)) in blocks


def _layer_scope(layer: LayerProblem) -> LayerProblem:
    """The same layer with the layer-wide mask (SparseGPT's own selection) at a row sparsity."""
    if layer.target.pattern != "row":
        return layer
    return dataclasses.replace(layer, target=SparsityConfig(layer.target.sparsity, "unstructured"))


def measure(layers: Sequence[LayerProblem], configs: Sequence[str]) -> list[dict[str, Any]]:
    """Every method's mean relative error and solver seconds, the methods taking turns layer by layer."""
    methods: dict[str, tuple[LayerwiseSolver, bool]] = {
        "wanda": (Wanda(), False),
        "sparsegpt": (SparseGPT(), False),
        "sparsegpt-layer": (SparseGPT(), True),
    }
    for text in configs:
        layer_scope = "mask_scope=layer" in text.split()
        methods[f"fw {text}" if text else "fw (defaults)"] = (FWSolver(parse_config(_fw_part(text))), layer_scope)
    totals = {name: [0.0, 0.0] for name in methods}
    for layer in layers:
        for name, (solver, layer_scope) in methods.items():
            problem = _layer_scope(layer) if layer_scope else layer
            started = time.perf_counter()
            result = solver.prune(problem)
            error = problem.relative_error(torch.where(result.mask, result.weight, torch.zeros_like(result.weight)))
            totals[name][1] += time.perf_counter() - started
            totals[name][0] += error
    wanda = totals["wanda"][0]
    best = min(("sparsegpt", "sparsegpt-layer"), key=lambda name: totals[name][0])
    results = []
    for name, (error, seconds) in totals.items():
        results.append(
            {
                "method": name,
                "mean_layer_error": error / len(layers),
                "error_vs_wanda": error / wanda,
                "error_vs_best_sparsegpt": error / totals[best][0],
                "solver_seconds": seconds,
                "seconds_vs_best_sparsegpt": seconds / totals[best][1],
                "best_sparsegpt": best,
            }
        )
        print(f"{name:<44} {error / len(layers):.5f}  {seconds:7.2f} s", flush=True)
    return results


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, count: int, command: str) -> str:
    """The results as a markdown table."""
    best = results[0]["best_sparsegpt"]
    lines = [
        f"# fw settings on {count} recorded layers of {args.problem} at {args.setting} ({args.record_with} recorded)",
        "",
        f"Command: `{command}`",
        "",
        f"Methods take turns layer by layer on {args.threads} thread(s); the better SparseGPT here: `{best}`.",
        "",
        "| method | mean layer error | / Wanda's | / best SparseGPT's | solver s | / best SparseGPT's |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['method']}` | {r['mean_layer_error']:.5f} | {r['error_vs_wanda']:.4f} | "
            f"{r['error_vs_best_sparsegpt']:.4f} | {r['solver_seconds']:.2f} | {r['seconds_vs_best_sparsegpt']:.2f} |"
        )
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the comparison; writes ``results.md`` and ``results.json``."""
    args = parse_args(argv)
    command = command_line("benchmarks/fw_settings.py", argv)
    layers = record(args.problem, args.setting, args.record_with, args.quick, args.blocks)
    if args.blocks:
        layers = [layer for layer in layers if _in_blocks(layer.name, args.blocks)]
    layers = layers[: args.layers] if args.layers is not None else layers
    if args.blocks and not layers:  # a problem whose layer names do not say their block (the selection is by name)
        usage_error(f"--blocks {' '.join(map(str, args.blocks))}: no recorded layer lies in these blocks")
    with torch_threads(args.threads):
        results = measure(layers, args.configs)
    text = markdown(results, args, len(layers), command)
    payload = {"command": command, "problem": args.problem, "setting": args.setting, "layers": [x.name for x in layers]}
    write_results(args.out, text, {**payload, "record_with": args.record_with, "results": results})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
