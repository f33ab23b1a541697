"""Long own-loop runs with the user's SGD: does slr / admm / l0 stay finite and reach its target?

    python benchmarks/sgd_stability.py --threads 1            # ~3 min on 2 cores
    python benchmarks/sgd_stability.py --quick --out /tmp/s   # 2 epochs, two runs (the tests)

The user's loop of ``docs/own-loop.md`` on sklearn's digits (1,400 training images, batches of 64: 22
steps an epoch), an MLP 64-256-128-10 trained dense for 10 epochs with SGD(lr=0.1, momentum=0.9), then pruned
to 90 % for ``--epochs`` epochs by each formulation with the library's defaults (4 coordinations an epoch:
5.5 W-steps apart) and the user's SGD at lr 0.05, with and without momentum 0.9, with a constant lr or
``CosineAnnealingWarmRestarts(T_0=10)`` (stepped per epoch; the lr returns to 0.05 every 10 epochs). Each row
reports the first epoch whose loss was not finite, or the hard-pruned test accuracy, the final rho and, for
slr, the largest dual step over rho.

``--without-bounds`` runs the same rows with rho's SGD bound (``PenaltyRule.stable``) and slr's step cap
(``slr.capped_step``) switched off: what they prevent (an ablation of this script, not a library setting).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import command_line, out_folder, results_dir, thread_count, torch_threads, write_results
from torch import nn

import constrainedsparse as cs
from constrainedsparse.formulations import rho as rho_module
from constrainedsparse.formulations import slr as slr_module

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sgd_stability"
ROWS = (  # formulation, momentum, schedule, extra settings
    ("slr", 0.0, "constant", {}),
    ("slr", 0.9, "constant", {}),
    ("slr", 0.9, "restarts", {}),
    ("admm", 0.0, "constant", {}),
    ("admm", 0.0, "restarts", {}),
    ("admm", 0.9, "constant", {}),
    ("admm", 0.9, "constant", {"interval": 2}),
    ("admm", 0.9, "constant", {"interval": 2, "rho_growth": 1.1025}),  # 11 steps apart, rho's growth per epoch kept
    ("admm", 0.95, "constant", {"interval": 2}),
    ("admm", 0.95, "constant", {"interval": 1}),
    ("l0", 0.9, "constant", {}),
    ("l0", 0.9, "constant", {"gate_lr": 1000.0}),
)
QUICK_ROWS = (ROWS[1], ROWS[5])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, two rows")
    parser.add_argument("--epochs", type=int, default=None, help="pruning epochs (default 60; quick 2)")
    parser.add_argument("--lr", type=float, default=0.05, help="the user's SGD learning rate while pruning")
    parser.add_argument("--without-bounds", action="store_true", help="ablation: rho's SGD bound and slr's cap off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=thread_count, default=None)
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/sgd_stability; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    args.epochs = args.epochs if args.epochs is not None else (2 if args.quick else 60)
    if args.epochs < 1 or args.lr <= 0:
        parser.error("--epochs must be >= 1 and --lr > 0")
    return args


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # here: a bad argument is refused without this 1.5 s import

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def batches(x: torch.Tensor, y: torch.Tensor, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(1400, generator=torch.Generator().manual_seed(epoch))
    return [(x[order[i : i + 64]], y[order[i : i + 64]]) for i in range(0, 1400, 64)]


def dense_model(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(10):
        for xb, yb in batches(x, y, epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x[1400:]).argmax(1) == y[1400:]).float().mean())


def prune(row: tuple[Any, ...], model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict:
    """One row: the user's loop of docs/own-loop.md; the first non-finite epoch or the hard-pruned accuracy."""
    name, momentum, schedule, settings = row
    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.9))
    problem = cs.SparsityProblem(model, nn.functional.cross_entropy, targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = cs.make(name, problem, optimizer=optimizer, **settings)
        scheduler = None
        if schedule == "restarts":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=10)
        f.setup(num_epochs=args.epochs, steps_per_epoch=22, reference_batch=(x[:32], y[:32]))
        result: dict[str, Any] = {"nonfinite_epoch": None, "max_step_over_rho": 0.0}
        for epoch in range(args.epochs):
            f.start_epoch(epoch)
            for batch in batches(x, y, 100 + epoch):
                optimizer.zero_grad()
                step = f.backward(batch)
                optimizer.step()
                metrics = f.post_step(step)
                if "stepsize/s" in metrics:
                    ratio = max(metrics["stepsize/s"], metrics["stepsize/s_prime"]) / metrics["penalty/rho"]
                    result["max_step_over_rho"] = max(result["max_step_over_rho"], ratio)
            if not math.isfinite(float(step.loss.detach())):
                result["nonfinite_epoch"] = epoch
                break
            f.end_epoch(epoch)
            if scheduler is not None:
                scheduler.step()
        if result["nonfinite_epoch"] is None:
            result["rho"] = getattr(f, "rho", None)
            if hasattr(f, "expected_density"):  # l0: where its gates went (the hard masks meet the target anyway)
                result["expected_density"] = float(f.expected_density().detach())
            masks = f.hard_masks()
            f.finalize()
            cs.hard_prune(targets, masks)
            result["accuracy"] = accuracy(model, x, y)
            result["sparsity"] = cs.achieved_sparsity(targets)
    result["warnings"] = sorted({str(w.message).split(":")[0] for w in caught if issubclass(w.category, UserWarning)})
    return result


def label(row: tuple[Any, ...]) -> str:
    name, momentum, schedule, settings = row
    extra = " ".join(f"{k}={v:g}" for k, v in settings.items())
    return f"{name} | {momentum:g} | {schedule} | {extra or 'defaults'}"


def markdown(results: list[dict], args: argparse.Namespace, command: str, seconds: float, dense: float) -> str:
    lines = [
        "# Long own-loop runs with the user's SGD",
        "",
        f"```\n{command}\n```",
        "",
        f"digits MLP 64-256-128-10 (dense test accuracy {100 * dense:.1f} %), pruned to 90 % for {args.epochs} "
        f"epochs of 22 steps with SGD at lr {args.lr:g}; rho's SGD bound and slr's step cap "
        f"{'OFF (ablation)' if args.without_bounds else 'on (the library)'}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); {seconds:.0f} s.",
        "",
        "| formulation | momentum | lr schedule | settings | outcome | hard-pruned % | final rho | max s / rho "
        "| l0 expected density |",
        "|:---|---:|:---|:---|:---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["nonfinite_epoch"] is not None:
            outcome, acc = f"NaN at epoch {r['nonfinite_epoch']}", "—"
        else:
            outcome, acc = f"finite, sparsity {r['sparsity']:.3f}", f"{100 * r['accuracy']:.1f}"
        rho = "" if r.get("rho") is None else f"{r['rho']:.3g}"
        ratio = f"{r['max_step_over_rho']:.2f}" if r["max_step_over_rho"] else ""
        density = f"{r['expected_density']:.3f}" if r.get("expected_density") is not None else ""
        lines.append(f"| {r['row']} | {outcome} | {acc} | {rho} | {ratio} | {density} |")
    lines += ["", "Warnings raised (first clause):", ""]
    lines += [f"- {r['row']}: {'; '.join(r['warnings']) or 'none'}" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("benchmarks/sgd_stability.py", argv)
    bounds = rho_module.PenaltyRule.stable, slr_module.capped_step
    if args.without_bounds:
        rho_module.PenaltyRule.stable = lambda self: float("inf")  # type: ignore[method-assign]
        slr_module.capped_step = lambda step, rho: step
    started = time.perf_counter()
    results = []
    try:
        with torch_threads(args.threads):
            x, y = digits()
            dense = dense_model(x, y, args.seed)
            dense_accuracy = accuracy(dense, x, y)
            for row in QUICK_ROWS if args.quick else ROWS:
                result = {"row": label(row), **prune(row, copy.deepcopy(dense), x, y, args)}
                print(result["row"], result.get("accuracy"), result["nonfinite_epoch"], flush=True)
                results.append(result)
            text = markdown(results, args, command, time.perf_counter() - started, dense_accuracy)
    finally:
        rho_module.PenaltyRule.stable, slr_module.capped_step = bounds  # type: ignore[method-assign]
    payload = {"command": command, "epochs": args.epochs, "lr": args.lr, "without_bounds": args.without_bounds}
    write_results(args.out, text, {**payload, "dense_accuracy": dense_accuracy, "rows": results})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
