"""A negative result, kept reproducible: pruning every layer towards the *dense model's* outputs.

SparseGPT, Wanda and fw prune each layer to reproduce its own dense outputs on the pruned model's
inputs, min ||(W' - W) X||^2 ("own"). The asymmetric calibration of GPTAQ (Li et al. 2025, for
quantization) instead asks each layer to reproduce what the dense model computes there, from the
pruned model's inputs, so that it also corrects the earlier blocks' error:

    min_W' sum_t ||W' x_t - W x~_t||^2 + lam ||W' - W||^2,   x~_t: the dense model's input for token t,

whose unconstrained minimiser is W~ = W (C^T + lam I)(G + lam I)^-1 with G = sum x x^T and
C = sum x x~^T; the objective is ||(W' - W~)||^2 in the G + lam I norm plus a constant, so any solver
prunes W~ instead of W ("dense"). This script streams the dense model's activations next to the
pruned one's, block by block, layer groups in execution order (q/k/v, o, gate/up, down, so that
a layer's inputs already carry its block's earlier corrections), and reports the held-out
perplexity of own and dense at several lam, and the held-out hidden-state deviation from the dense
model after every block. It is not a library feature: on SmolLM2 with 32 x 256 calibration tokens
it makes perplexity far worse (the corrections fit the calibration tokens and do not generalise).

Usage::

    .venv/bin/python benchmarks/dense_target.py --threads 1            # wanda, own and dense at 3 damps
    .venv/bin/python benchmarks/dense_target.py --quick                # 2 blocks of a tiny calibration
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import (
    command_line,
    out_folder,
    positive_float,
    results_dir,
    sparsity_level,
    thread_count,
    torch_threads,
    write_results,
)

from constrainedsparse.causal_lm import calibration_batches, consecutive_windows, perplexity_scores
from constrainedsparse.layerwise import LayerProblem, solver_class
from constrainedsparse.layerwise.driver import accumulate_grams, capture_block_inputs, run_block, walk_blocks
from constrainedsparse.layerwise.layers import layer_weight, set_layer_weight, targeted_layers
from constrainedsparse.problems import smollm2_wiki
from constrainedsparse.spec import load_problem
from constrainedsparse.targets import SparsityConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dense_target"
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def paired_grams(block, layers, inputs, reference) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """G = sum x x^T and C = sum x x~^T per layer: each batch runs the block on the dense model's
    inputs (recording every layer's input), then on the pruned model's (every token is real here)."""
    sums = {name: [0.0, 0.0] for name, _ in layers}
    recorded: dict[str, torch.Tensor] = {}
    state = {"recording": True}

    def hook(name: str, d_in: int):
        def add(module, args):
            rows = args[0].reshape(-1, d_in).double()
            if state["recording"]:
                recorded[name] = rows.clone()
            else:
                sums[name][0] = sums[name][0] + rows.T @ rows
                sums[name][1] = sums[name][1] + rows.T @ recorded.pop(name)

        return add

    handles = [m.register_forward_pre_hook(hook(n, layer_weight(m).shape[1])) for n, m in layers]
    try:
        with torch.no_grad():
            for item, dense in zip(inputs, reference):
                state["recording"] = True
                block(*dense.args, **dense.kwargs)
                state["recording"] = False
                block(*item.args, **item.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (gram, cross) for name, (gram, cross) in sums.items()}


def dense_target(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """W~ = W (C^T + lam I)(G + lam I)^-1, lam = damp x mean diag G."""
    lam = damp * float(gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    w = weight.double()
    return torch.linalg.solve(gram + lam * eye, (cross + lam * eye) @ w.T).T.float()


def _hidden(items) -> torch.Tensor:
    return torch.cat([item.hidden for item in items]).double()


@torch.no_grad()
def prune(model, blocks, targets, batches, test, solver, target, damp: float | None, stop: int) -> list[float]:
    """Prunes blocks ``0 .. stop - 1`` group by group (``damp`` None: own outputs; else dense at that
    damp); returns the held-out relative hidden-state deviation from the dense model after each block."""
    reference = None
    test_pruned = test_dense = capture_block_inputs(model, blocks[0], test)
    deviations = []
    for _, block, _, inputs, _ in walk_blocks(model, blocks, batches, stop=stop):
        reference = inputs if reference is None else reference
        dense_block = copy.deepcopy(block)
        following = run_block(dense_block, reference)
        layers = dict(targeted_layers(block, targets))
        assert all(n.rsplit(".", 1)[-1] in sum(GROUPS, ()) for n in layers), list(layers)  # a LLaMA block
        for group in GROUPS:
            chosen = [(n, m) for n, m in layers.items() if n.rsplit(".", 1)[-1] in group]
            if damp is None:
                grams = {n: (g.double(), None) for n, (g, _) in accumulate_grams(block, chosen, inputs).items()}
            else:
                grams = paired_grams(block, chosen, inputs, reference)
            for name, module in chosen:
                gram, cross = grams[name]
                weight = layer_weight(module).detach().float().clone()
                weight = weight if cross is None else dense_target(weight, gram, cross, damp)
                result = solver.prune(LayerProblem(name, weight, gram.float(), target))
                set_layer_weight(module, torch.where(result.mask, result.weight, 0.0))
        reference = following
        test_pruned, test_dense = run_block(block, test_pruned), run_block(dense_block, test_dense)
        pruned, dense = _hidden(test_pruned), _hidden(test_dense)
        deviations.append(float((pruned - dense).norm() / dense.norm()))
    return deviations


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (every value checked here, before the model is loaded)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, 2 x 32 calibration tokens, 64 evaluated")
    parser.add_argument("--solver", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    parser.add_argument("--sparsity", type=sparsity_level, default=0.5, help="row sparsity in [0, 1) (default 0.5)")
    parser.add_argument("--damp", type=positive_float, nargs="+", help="each > 0; default: 0.01 0.1 1 (quick: 0.1)")
    parser.add_argument("--threads", type=thread_count)
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/dense_target; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    if args.damp is None:
        args.damp = [0.1] if args.quick else [0.01, 0.1, 1.0]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs own and dense at every ``--damp``; writes ``results.md`` and ``results.json``."""
    args = parse_args(argv)
    command = command_line("benchmarks/dense_target.py", argv)
    problem = load_problem("smollm2-wiki")
    options = {**problem.options, "eval_tokens": 4096}
    if args.quick:
        options.update(calibration_samples=2, seq_len=32, eval_tokens=64)
    rows = []
    with torch_threads(args.threads):
        for damp in [None, *args.damp]:
            model = problem.model(options)
            model.config.use_cache = False
            batches = problem.calibration(options, 0)
            dense = problem.held_out(model, options)
            ids = smollm2_wiki._ids(str(smollm2_wiki._folder(options)), "held-out")
            test = calibration_batches(consecutive_windows(ids, options["seq_len"], options["eval_tokens"]), 8)
            blocks = problem.model_blocks(model)
            stop = 2 if args.quick else len(blocks)
            target = SparsityConfig(args.sparsity, "row")
            solver = solver_class(args.solver)()
            deviations = prune(model, blocks, problem.targets, batches, test, solver, target, damp, stop)
            scores = perplexity_scores(dense, problem.held_out(model, options))
            label = "own" if damp is None else f"dense, damp {damp:g}"
            rows.append({"match": label, **scores, "deviation": deviations})
            print(f"{label:<18} perplexity {scores['perplexity']:.2f} (dense {scores['dense_perplexity']:.2f})",
                  flush=True)  # fmt: skip
    write_results(args.out, markdown(rows, command, args), {"command": command, "results": rows})
    return 0


def markdown(rows: list[dict[str, Any]], command: str, args: argparse.Namespace) -> str:
    """Perplexity per target, and the held-out deviation from the dense model after every few blocks."""
    blocks = len(rows[0]["deviation"])
    shown = sorted({0, *range(2, blocks, 4), blocks - 1})
    lines = [
        f"# Own vs dense-output targets: {args.solver} at {args.sparsity:g} (row), smollm2-wiki",
        "",
        f"Command: `{command}`",
        "",
        "| target | perplexity | dense perplexity | " + " | ".join(f"dev. after block {i}" for i in shown) + " |",
        "|---|---|---|" + "---|" * len(shown),
    ]
    for row in rows:
        cells = " | ".join(f"{row['deviation'][i]:.3f}" for i in shown)
        lines.append(f"| {row['match']} | {row['perplexity']:.2f} | {row['dense_perplexity']:.2f} | {cells} |")
    lines += [
        "",
        "dev.: ||h - h_dense|| / ||h_dense|| of the hidden states after the block, on the held-out windows.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
