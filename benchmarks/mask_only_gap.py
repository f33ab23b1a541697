r"""Why fw's masks have lower layer error than SparseGPT's yet a higher perplexity (smollm2-wiki, issue 16).

**Part 1, layer statistics.** Every linear layer of ``--blocks`` of the dense SmolLM2 (no propagation: each sees
the dense model's inputs) is pruned by Wanda, SparseGPT (row scope, its own update) and fw (mask only) from the
Gram matrix of the calibration windows, with per-row masks at 50 / 60 % (as in a run) and 2:4 along inputs. For
each method: the mean relative error
:math:`\|(W - \hat W)X\|^2 / \|WX\|^2` on the calibration windows and on as many tokens of the held-out
articles (the windows the perplexity is computed on), and the **shrinkage**

.. math::

    s = \frac{\langle \hat W X, (W - \hat W) X\rangle}{\|(W - \hat W) X\|^2}
    \quad\Longrightarrow\quad \|\hat W X\|^2 = \|WX\|^2 - (1 + 2s)\,\|(W - \hat W) X\|^2

on held-out text: :math:`s \approx 0` when the kept weights are a least-squares fit (SparseGPT's update makes the
error orthogonal to what it keeps), :math:`s > 0` when the kept output points along the error, i.e. the layer's
output shrinks, which a mask alone (the original values on the kept weights) cannot undo.

**Part 2, perplexity.** The whole model pruned as ``constrainedsparse run smollm2-wiki`` prunes it (every block,
each from the pruned model's inputs): SparseGPT, fw mask-only, and, as a diagnostic (*not* mask-only), fw's masks
with every row scaled by its least-squares factor :math:`c = \langle \hat w, w\rangle_G / \langle \hat w, \hat
w\rangle_G` (one scalar per output row, undoing the shrinkage and nothing else).

Usage::

    .venv/bin/python benchmarks/mask_only_gap.py --threads 2                 # 60 % and 2:4, blocks 3 14 25
    .venv/bin/python benchmarks/mask_only_gap.py --quick --threads 1         # tiny calibration, block 0 only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import command_line, non_negative_int, out_folder, results_dir, thread_count, torch_threads, write_results
from torch import nn

from constrainedsparse import prune_layerwise
from constrainedsparse.causal_lm import calibration_batches
from constrainedsparse.layerwise.base import LayerProblem, LayerResult, LayerwiseSolver
from constrainedsparse.layerwise.driver import accumulate_grams, capture_block_inputs
from constrainedsparse.layerwise.fw import FWSolver
from constrainedsparse.layerwise.layers import find_blocks
from constrainedsparse.layerwise.solvers import SparseGPT, Wanda
from constrainedsparse.problems import smollm2_wiki
from constrainedsparse.settings import target_from_flags
from constrainedsparse.spec import load_problem

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "mask_only_gap"
SETTINGS = {
    "50%": {"sparsity": 0.5, "pattern": None},
    "60%": {"sparsity": 0.6, "pattern": None},
    "2:4": {"sparsity": None, "pattern": "2:4"},
}
"""``prune_layerwise``'s ``sparsity`` / ``pattern`` per setting (per-row masks at a level, as in a run)."""
QUICK_OPTIONS = {"calibration_samples": 2, "seq_len": 32, "eval_tokens": 64}
BLOCKS = 30
"""The blocks of smollm2-wiki's model (SmolLM2-135M): ``--blocks`` is checked before the model is loaded."""
BATCH = 8


class RowScaledFW(FWSolver):
    """fw's mask with every row scaled by its least-squares factor (a diagnostic: the kept values change)."""

    def prune(self, layer: LayerProblem) -> LayerResult:
        result = super().prune(layer)
        kept = torch.where(result.mask, result.weight, torch.zeros_like(result.weight)).double()
        product = kept @ layer.gram.double()
        scale = (product * layer.weight.double()).sum(1) / (product * kept).sum(1).clamp_min(1e-300)
        return dataclasses.replace(result, weight=(kept * scale[:, None]).to(result.weight.dtype))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny calibration, block 0 (unless --blocks), first setting"
    )
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["60%", "2:4"])
    parser.add_argument(
        "--blocks", nargs="+", type=non_negative_int, help=f"part 1's blocks, 0 to {BLOCKS - 1} (default 3 14 25)"
    )
    parser.add_argument("--seed", type=int, default=0, help="calibration sample (default 0)")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/mask_only_gap; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    if args.blocks is None:
        args.blocks = [0] if args.quick else [3, 14, 25]
    elif max(args.blocks) >= BLOCKS:
        parser.error(f"--blocks {max(args.blocks)}: smollm2-wiki has {BLOCKS} blocks, numbered 0 to {BLOCKS - 1}")
    if args.quick:
        args.settings = args.settings[:1]
    return args


def _grams(model: nn.Module, blocks: Sequence[int], batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """:math:`X^\\top X` (float64) of the input of every linear layer of ``blocks`` over ``batches``, each block
    fed the dense model's inputs (the driver's own capture and accumulation), by ``"block.layer"`` name."""
    all_blocks = find_blocks(model)
    grams = {}
    with torch.no_grad():
        for b in blocks:
            block = all_blocks[b]
            layers = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
            inputs = capture_block_inputs(model, block, batches)
            for name, (gram, _) in accumulate_grams(block, layers, inputs, dtype=torch.float64).items():
                grams[f"{b}.{name}"] = gram
    return grams


def _relative(weight: torch.Tensor, kept: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """Relative error and shrinkage :math:`s` of ``kept`` under ``gram`` (float64)."""
    w, k = weight.double(), kept.double()
    d = w - k
    error = float(((d @ gram) * d).sum())
    return error / float(((w @ gram) * w).sum()), float(((k @ gram) * d).sum()) / max(error, 1e-300)


def layer_statistics(model: nn.Module, options: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part 1: per setting and method, mean calibration / held-out relative error and held-out shrinkage."""
    blocks = find_blocks(model)
    layers = {
        f"{b}.{name}": module
        for b in args.blocks
        for name, module in blocks[b].named_modules()
        if isinstance(module, nn.Linear)
    }
    calibration = _grams(model, args.blocks, smollm2_wiki.calibration(options, args.seed))
    windows = smollm2_wiki.held_out_windows(options)[: options["calibration_samples"]]
    held_out = _grams(model, args.blocks, calibration_batches(windows, BATCH))
    solvers: dict[str, LayerwiseSolver] = {"wanda": Wanda(), "sparsegpt": SparseGPT(), "fw": FWSolver()}
    rows = []
    for setting in args.settings:
        target = target_from_flags(**SETTINGS[setting], default_sparsity=0.5, unstructured_pattern="row")
        sums = {name: [0.0, 0.0, 0.0] for name in solvers}
        for name, module in layers.items():
            weight = module.weight.detach().float().contiguous()
            problem = LayerProblem(name, weight, calibration[name].float().contiguous(), target)
            for method, solver in solvers.items():
                result = solver.prune(problem)
                kept = torch.where(result.mask, result.weight, torch.zeros_like(result.weight))
                cal, _ = _relative(weight, kept, calibration[name])
                held, shrink = _relative(weight, kept, held_out[name])
                for i, value in enumerate((cal, held, shrink)):
                    sums[method][i] += value / len(layers)
        for method, (cal, held, shrink) in sums.items():
            rows.append({"setting": setting, "method": method, "layers": len(layers), "calibration_error": cal,
                         "held_out_error": held, "shrinkage": shrink})  # fmt: skip
            print(
                f"{setting:>4} {method:<10} error {cal:.5f} (held-out {held:.5f}) shrinkage {shrink:+.3f}", flush=True
            )
    return rows


def perplexities(
    problem: Any, dense_model: nn.Module, options: dict[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Part 2: the perplexity of the whole model pruned by each method (quick: block 0 only), each from a copy of
    ``dense_model``."""
    rows = []
    solvers: dict[str, type[LayerwiseSolver]] = {"sparsegpt": SparseGPT, "fw": FWSolver, "fw, rows scaled": RowScaledFW}
    dense = problem.held_out(dense_model, options)
    batches = problem.calibration(options, args.seed)
    for setting in args.settings:
        for method, solver in solvers.items():
            model = copy.deepcopy(dense_model)
            started = time.perf_counter()
            blocks = list(find_blocks(model))[:1] if args.quick else None
            prune_layerwise(model, batches, solver(), blocks=blocks, **SETTINGS[setting])
            scores = problem.score(dense, problem.held_out(model, options))
            rows.append({"setting": setting, "method": method, **scores, "seconds": time.perf_counter() - started})
            print(f"{setting:>4} {method:<16} perplexity {scores['perplexity']:.2f}", flush=True)
    return rows


def markdown(layer_rows: list[dict[str, Any]], ppl_rows: list[dict[str, Any]], command: str) -> str:
    """Both parts as markdown tables."""
    layers = layer_rows[0]["layers"] if layer_rows else 0
    lines = [
        "# Mask only against mask plus update on smollm2-wiki: layer error, shrinkage, perplexity",
        "",
        f"Command: `{command}`",
        "",
        f"Part 1: {layers} linear layers, dense inputs; error = relative layer error, shrinkage s = "
        "<kept output, error> / |error|^2 on held-out text (0: least-squares fit; > 0: the output shrinks by "
        "(1 + 2s) |error|^2).",
        "",
        "| setting | method | calibration error | held-out error | held-out shrinkage |",
        "|---|---|---|---|---|",
    ]
    for r in layer_rows:
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['calibration_error']:.5f} | {r['held_out_error']:.5f} | "
            f"{r['shrinkage']:+.3f} |"
        )
    lines += ["", "Part 2: the whole model pruned (`fw, rows scaled` is a diagnostic, not mask-only).", ""]
    lines += ["| setting | method | perplexity | dense perplexity | seconds |", "|---|---|---|---|---|"]
    for r in ppl_rows:
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['perplexity']:.2f} | {r['dense_perplexity']:.2f} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs both parts; writes ``results.md`` and ``results.json``."""
    args = parse_args(argv)
    command = command_line("benchmarks/mask_only_gap.py", argv)
    problem = load_problem("smollm2-wiki")
    options = {**problem.options, **(QUICK_OPTIONS if args.quick else {})}
    with torch_threads(args.threads):
        model = problem.model(options)
        layer_rows = layer_statistics(model, options, args)
        ppl_rows = perplexities(problem, model, options, args)
    text = markdown(layer_rows, ppl_rows, command)
    write_results(args.out, text, {"command": command, "layers": layer_rows, "perplexity": ppl_rows})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
