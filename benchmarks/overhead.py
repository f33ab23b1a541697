"""Wall time per training step of slr and admm against the same plain PyTorch loop, as a ratio.

Every formulation is built the way a user would build it (:func:`~constrainedsparse.spec.load_problem`,
:meth:`~constrainedsparse.targets.Targets.resolve`, :class:`~constrainedsparse.problem.SparsityProblem`,
:func:`constrainedsparse.formulations.make`, ``setup``) on its own copy of one model, and compared
with the plain loop on another copy::

    optimizer = torch.optim.Adam(model.parameters(), lr=problem.lr)   # the same lr as the formulation
    optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()

over the same batches. One repeat is ``--steps`` training steps of one method, timed as a block,
then (formulations only) one ``end_epoch`` timed on its own. The slr/admm coordination (Z-step,
dual steps, SLR's objective on its reference batch) runs inside ``training_step`` every ``interval``
steps with ``interval_unit=step`` (the default), so the step time includes it (keep ``--steps`` a
multiple of the interval), or in ``end_epoch`` with ``interval_unit=epoch``. Methods are interleaved (their
order rotates every repeat) after ``--warmup`` untimed repeats, and the median of the repeats is reported:

* ``step ratio``: median time of ``training_step`` / median time of the plain step;
* ``amortised ratio``: ``(step + end_epoch / S) / plain step`` with ``S`` the steps of one epoch
  of the problem (its training set over its batch size), i.e. the cost of a whole epoch.

Problems: bundled names or problem-file paths, and ``resnet18``: a user-built torchvision
``resnet18(num_classes=10)`` on random 32x32 RGB batches of 32 with the default
:class:`~constrainedsparse.targets.Targets` (every Conv2d/Linear weight), whose epoch is taken to be
CIFAR-10's (50,000 images, 1,563 steps); and ``resnet18-cifar``: the same on the bundled
``cifar10-resnet18`` model and targets (3x3 stride-1 stem, no max-pool, first conv and classifier
dense), the realistic CIFAR case. The target is sparsity 0.9, unstructured. Threads are left
as torch sets them unless ``--threads`` is given.

Usage::

    .venv/bin/python benchmarks/overhead.py                          # digits-mlp, mnist1d-mlp, both resnet18s
    .venv/bin/python benchmarks/overhead.py --quick                  # digits-mlp and a small resnet18
    .venv/bin/python benchmarks/overhead.py --problems resnet18 --steps 30 --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import command_line, torch_threads, write_results
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import constrainedsparse.formulations
from constrainedsparse.engine import reference_batch
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.spec import Problem, load_problem
from constrainedsparse.targets import SparsityConfig, Targets

DEFAULT_PROBLEMS = ("digits-mlp", "mnist1d-mlp", "resnet18", "resnet18-cifar")
DEFAULT_METHODS = ("slr", "admm")
DEFAULT_OUT = Path(__file__).parent / "results" / "overhead"
RESNET = "resnet18"
RESNET_CIFAR = "resnet18-cifar"
RESNETS = (RESNET, RESNET_CIFAR)
GOAL = 1.10


@dataclass(frozen=True)
class ResNetShape:
    """Size of the user-built resnet18 case.

    Attributes:
        batch: Minibatch size.
        image: Height and width of the random RGB images.
        samples: Random training images (the reference batch of slr takes up to 1,024 of them).
        epoch_steps: Steps of one epoch, for the amortised ratio.
        default_steps: Timed steps per repeat when ``--steps`` is not given.
    """

    batch: int = 32
    image: int = 32
    samples: int = 1024
    epoch_steps: int = math.ceil(50_000 / 32)
    default_steps: int = 10


QUICK_RESNET = ResNetShape(batch=8, image=16, samples=64, epoch_steps=math.ceil(50_000 / 8), default_steps=2)


def resnet18_problem(shape: ResNetShape, seed: int, cifar_stem: bool = False) -> Problem:
    """A user-built problem: torchvision resnet18 (10 classes) on random images and labels.

    Args:
        shape: Batch, image and dataset size.
        seed: Seeds the random images and labels.
        cifar_stem: Use the bundled ``cifar10-resnet18`` model and targets (3x3 stride-1 stem, no
            max-pool: 16x more activations per image, the same 11 M weights) instead of the
            ImageNet stem (a weight-heavy, compute-light worst case for the overhead ratio).

    Returns:
        A :class:`~constrainedsparse.spec.Problem` (default targets, or the bundled problem's).
    """
    from torchvision.models import resnet18

    def data(options: Any) -> tuple[TensorDataset, TensorDataset]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(shape.samples, 3, shape.image, shape.image, generator=generator)
        y = torch.randint(0, 10, (shape.samples,), generator=generator)
        dataset = TensorDataset(x, y)
        return dataset, dataset

    if cifar_stem:
        bundled = load_problem("cifar10-resnet18")
        model, targets, name = bundled.model, bundled.targets, RESNET_CIFAR
    else:
        model, targets, name = (lambda options: resnet18(num_classes=10)), Targets(), RESNET
    return Problem(
        name=name,
        description=f"{name}, random {shape.image}x{shape.image} RGB batches of {shape.batch}",
        model=model,
        data=data,
        targets=targets,
        batch_size=shape.batch,
        lr=1e-3,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed namespace with ``--quick`` applied.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits-mlp and a small resnet18, 2 steps, 2 repeats")
    parser.add_argument(
        "--problems",
        nargs="+",
        default=None,
        help=f"bundled names, .py paths, {RESNET} or {RESNET_CIFAR} (default: all four)",
    )
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="formulations (default slr admm)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default: one epoch; resnet18: 10)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="formulation setting, e.g. interval_unit=epoch (every method that has it) or slr:s0=0.02",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    args = parser.parse_args(argv)
    if args.problems is None:
        args.problems = ["digits-mlp", RESNET] if args.quick else list(DEFAULT_PROBLEMS)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.steps is None and args.quick:
        args.steps = 2
    args.resnet = QUICK_RESNET if args.quick else ResNetShape()
    if args.repeats < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        parser.error("--repeats and --steps must be >= 1, --warmup >= 0")
    try:
        args.configs = formulation_configs(args.methods, args.settings)
    except ValueError as err:
        parser.error(str(err))
    return args


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--set {key}={text!r} must be a bool")
        return text.lower() in ("true", "1", "yes")
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"--set {key}={text!r} must be a {type(default).__name__}") from None


def formulation_configs(methods: Sequence[str], settings: Sequence[str]) -> dict[str, Any]:
    """Each method's ``Config`` with the ``--set`` values applied and validated.

    Args:
        methods: Formulation names.
        settings: ``KEY=VALUE`` (every method whose config has ``KEY``) or ``METHOD:KEY=VALUE``.

    Returns:
        ``{method: config}``.

    Raises:
        ValueError: For an unknown method, a malformed item, a key no chosen method has, a bad value.
    """
    defaults = {method: constrainedsparse.formulations.formulation_class(method).Config() for method in methods}
    values: dict[str, dict[str, Any]] = {method: {} for method in methods}
    for item in settings:
        key, sep, text = item.partition("=")
        prefix, colon, key = key.strip().rpartition(":")
        chosen = [prefix] if colon else list(methods)
        if not sep or not key or (colon and prefix not in methods):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or METHOD:KEY=VALUE with METHOD in {list(methods)}")
        takers = [m for m in chosen if key in {f.name for f in dataclasses.fields(defaults[m])}]
        if not takers:
            raise ValueError(f"--set {item!r}: no formulation among {chosen} has a setting {key!r}")
        for method in takers:
            values[method][key] = _convert(key, text.strip(), getattr(defaults[method], key))
    configs = {method: dataclasses.replace(defaults[method], **values[method]) for method in methods}
    for config in configs.values():
        config.validate()
    return configs


class Runner:
    """One method on its own model copy: ``run(batches)`` trains, ``end_epoch()`` runs the per-epoch hooks.

    Args:
        step: One training step on a batch.
        epoch_hook: ``epoch_hook(epoch)`` at the end of epoch ``epoch`` (0-based).
    """

    def __init__(
        self,
        step: Callable[[tuple[torch.Tensor, torch.Tensor]], object],
        epoch_hook: Callable[[int], object] | None = None,
    ) -> None:
        self.step = step
        self.epoch_hook = epoch_hook
        self.epoch = 0
        self.config: dict[str, Any] = {}

    def run(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One training step per batch."""
        for batch in batches:
            self.step(batch)

    def end_epoch(self) -> None:
        """The per-epoch hooks (nothing for the plain loop)."""
        if self.epoch_hook is not None:
            self.epoch_hook(self.epoch)
        self.epoch += 1


def plain_runner(model: nn.Module, problem: Problem) -> Runner:
    """The plain PyTorch loop: Adam with the problem's lr, ``zero_grad; loss.backward(); step``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=problem.lr)
    loss_fn = problem.loss

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    return Runner(step)


def formulation_runner(
    method: str,
    config: Any,
    model: nn.Module,
    problem: Problem,
    sparsity: float,
    train: TensorDataset,
    epochs: int,
    steps_per_epoch: int,
    seed: int,
) -> Runner:
    """A formulation built like a user would: targets, :class:`SparsityProblem`, ``make``, ``setup``.

    Its epoch hook is ``end_epoch(epoch)`` followed by ``start_epoch(epoch + 1)``, as the engine calls them.
    """
    targets = problem.targets.resolve(model, SparsityConfig(sparsity=sparsity))
    example = next(iter(DataLoader(train, batch_size=problem.batch_size)))
    sparsity_problem = SparsityProblem(model, problem.loss, targets, problem.constraints, example)
    formulation = constrainedsparse.formulations.make(
        method, sparsity_problem, config, lr=problem.lr, dual_lr=problem.dual_lr
    )
    wanted = formulation.reference_samples
    formulation.setup(epochs, steps_per_epoch, reference_batch(train, seed, wanted) if wanted else None)
    formulation.start_epoch(0)

    def epoch_hook(epoch: int) -> None:
        formulation.end_epoch(epoch)
        if epoch + 1 < epochs:
            formulation.start_epoch(epoch + 1)

    runner = Runner(formulation.training_step, epoch_hook)
    runner.config = dataclasses.asdict(formulation.config)
    return runner


def fixed_batches(train: TensorDataset, batch_size: int, steps: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``steps`` shuffled batches (cycling through epochs of ``train`` if needed), built once."""
    batches: list[tuple[torch.Tensor, ...]] = []
    epoch = 0
    while len(batches) < steps:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        for batch in DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator):
            batches.append(tuple(batch))
            if len(batches) == steps:
                break
        epoch += 1
    return batches


def bench_problem(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Times the plain loop and every method on one problem.

    Args:
        name: Bundled problem, problem-file path or ``resnet18``.
        args: Parsed command line.

    Returns:
        Medians in milliseconds, ratios and the sizes that shaped them.
    """
    if name in RESNETS:
        problem = resnet18_problem(args.resnet, args.seed, cifar_stem=name == RESNET_CIFAR)
    else:
        problem = load_problem(name)
    torch.manual_seed(args.seed)
    base = problem.model(problem.options)
    train, _ = problem.data(problem.options)
    if name in RESNETS:
        epoch_steps, default_steps = args.resnet.epoch_steps, args.resnet.default_steps
    else:
        epoch_steps = default_steps = math.ceil(len(train) / problem.batch_size)
    steps = args.steps or default_steps
    batches = fixed_batches(train, problem.batch_size, steps, args.seed)
    epochs = args.warmup + args.repeats
    runners = {"plain": plain_runner(copy.deepcopy(base), problem)}
    for method in args.methods:
        runners[method] = formulation_runner(
            method,
            args.configs[method],
            copy.deepcopy(base),
            problem,
            args.sparsity,
            train,
            epochs,
            epoch_steps,
            args.seed,
        )
    step_ms: dict[str, list[float]] = {method: [] for method in runners}
    end_ms: dict[str, list[float]] = {method: [] for method in runners}
    names = list(runners)
    for round_ in range(epochs):
        shift = round_ % len(names)
        for method in names[shift:] + names[:shift]:
            runner = runners[method]
            start = time.perf_counter()
            runner.run(batches)
            middle = time.perf_counter()
            runner.end_epoch()
            stop = time.perf_counter()
            if round_ >= args.warmup:
                step_ms[method].append((middle - start) * 1e3 / len(batches))
                end_ms[method].append((stop - middle) * 1e3)
    plain = statistics.median(step_ms["plain"])
    result: dict[str, Any] = {
        "problem": name,
        "parameters": sum(p.numel() for p in base.parameters()),
        "batch_size": problem.batch_size,
        "steps_per_repeat": len(batches),
        "epoch_steps": epoch_steps,
        "plain_step_ms": plain,
        "methods": {},
        "samples_ms": {"step": step_ms, "end_epoch": end_ms},
    }
    for method in args.methods:
        step = statistics.median(step_ms[method])
        end = statistics.median(end_ms[method])
        result["methods"][method] = {
            "step_ms": step,
            "end_epoch_ms": end,
            "step_ratio": step / plain,
            "amortised_ratio": (step + end / epoch_steps) / plain,
            "config": runners[method].config,
        }
    return result


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per problem x method: step times, end-of-epoch time and both ratios."""
    lines = [
        "| problem | params | batch | epoch steps | method | plain ms/step | method ms/step | step ratio "
        "| end_epoch ms | amortised ratio |",
        "|:---|---:|---:|---:|:---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for method, entry in result["methods"].items():
            lines.append(
                f"| {result['problem']} | {result['parameters']:,} | {result['batch_size']} | {result['epoch_steps']} "
                f"| {method} | {result['plain_step_ms']:.2f} | {entry['step_ms']:.2f} | {entry['step_ratio']:.2f}x "
                f"| {entry['end_epoch_ms']:.1f} | {entry['amortised_ratio']:.2f}x |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints the table and writes ``results.md`` and ``results.json``.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        Process exit status (0).
    """
    args = parse_args(argv)
    command = command_line("benchmarks/overhead.py", argv)
    started = time.perf_counter()
    with torch_threads(args.threads) as threads:
        results = []
        for name in args.problems:
            results.append(bench_problem(name, args))
            print(f"{name}: done ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started
    table = markdown_table(results)
    configs = {method: entry["config"] for result in results for method, entry in result["methods"].items()}
    worst = max(entry["amortised_ratio"] for result in results for entry in result["methods"].values())
    text = "\n".join(
        [
            "# Overhead per training step: slr/admm against the plain PyTorch loop",
            "",
            "```",
            command,
            "```",
            "",
            f"torch {torch.__version__} on CPU, torch threads: {threads}; sparsity {args.sparsity:g} unstructured; "
            f"{args.repeats} timed repeats (median) after {args.warmup} warm-up, methods interleaved; "
            f"wall time {wall:.0f} s.",
            "",
            "step ratio = median ms per `training_step` / median ms per plain step "
            "(`zero_grad(); loss_fn(model(x), y).backward(); step()` with the same Adam lr, same batches). "
            "amortised ratio adds one `end_epoch` spread over the epoch steps of the problem. The slr/admm "
            "coordination (Z-step and dual steps) runs inside `training_step` every `interval` steps when "
            "`interval_unit` is `step`, in `end_epoch` when it is `epoch` (configs below). "
            f"Goal: <= {GOAL:.2f}x; the worst amortised ratio here is {worst:.2f}x.",
            "",
            table,
            "",
            *(f"{method} config: `{config}`" for method, config in configs.items()),
            "",
        ]
    )
    payload = {
        "command": command,
        "torch": torch.__version__,
        "threads": threads,
        "sparsity": args.sparsity,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "wall_seconds": wall,
        "goal_ratio": GOAL,
        "results": results,
    }
    write_results(args.out, text, payload)
    print(table)
    print(f"\nwall time {wall:.1f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
