"""Wall time per training step in the user's own loop, with and without constrainedsparse, as a ratio.

Every method is driven the way a user drives the library (``SparsityProblem``, :func:`constrainedsparse.make`
with *their* optimizer, ``setup``, the split step) on its own copy of one model, and compared with the
identical loop without the library on another copy, over the same batches::

    # plain                                    # with constrainedsparse
    opt.zero_grad(set_to_none=True)            opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()            step = f.backward((x, y))
    opt.step()                                 opt.step()
                                               f.post_step(step)

``opt`` is the user's optimizer, built the same way for every copy: ``sgd`` (SGD, lr 0.01, momentum 0.9)
or ``adam`` (Adam, lr 1e-3). Methods: ``slr``, ``admm``, ``l0``, ``magnitude`` and ``+l2`` variants
(``slr+l2``, ``magnitude+l2``) with one user constraint, ``||W_fc||^2 <= 0.9 x`` its initial value on the
model's last Linear layer (a :class:`~constrainedsparse.problem.UserConstraint` with its own multiplier,
stepped every step).

One repeat is ``--steps`` steps of one method timed as a block, then (except for plain) one epoch boundary
(``end_epoch`` then ``start_epoch``) timed on its own. The slr/admm coordination (Z-step, dual steps, SLR's
objective on its reference batch) runs in ``post_step`` (or at the epoch boundary) when its ``interval`` is
due; every coordination is timed on its own (the benchmark wraps the formulation's ``coordinate``), taken out
of the block and added back spread over the steps: ``coordination ms x coordinations per epoch / S`` per step.
A repeat without a coordination (one every 390 steps of the ResNet's epoch with the default 4 per epoch)
times one after its block, outside the window. Methods are interleaved (their order rotates every repeat)
after ``--warmup`` untimed repeats; the median over repeats is reported:

* ``step ratio``: (median time of a step of the method without coordination + the coordinations' share) /
  median time of a plain step;
* ``amortised ratio``: ``(step + epoch boundary / S) / plain step``, with ``S`` the steps of one epoch of
  the problem, i.e. the cost of a whole epoch;
* ``+l2 adds``: amortised time of ``X+l2`` / amortised time of ``X``, minus 1.

Problems: bundled names (their own data, model, targets and batch size), and ``cifar10-resnet18``: the
bundled model and targets (torchvision ResNet-18 with the 3x3 stride-1 CIFAR stem, first conv and
classifier dense) on generated 3x32x32 images and labels (the real shape; the bundled problem reads
CIFAR-10 from disk), batch 32, an epoch of CIFAR-10's 50,000 images (1,563 steps). The target is sparsity
0.9, unstructured. Measure with ``--threads 1`` on a shared machine and note the load (``uptime``), which
the results record.

Usage::

    .venv/bin/python benchmarks/overhead.py --threads 1              # the three problems, both optimizers
    .venv/bin/python benchmarks/overhead.py --quick --threads 1      # digits-mlp and a small ResNet, 2 steps
    .venv/bin/python benchmarks/overhead.py --problems cifar10-resnet18 --optimizers sgd --methods slr slr+l2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    command_line,
    non_negative_int,
    out_folder,
    positive_int,
    problem_of_kind,
    results_dir,
    sparsity_level,
    thread_count,
    torch_threads,
    write_results,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import constrainedsparse
from constrainedsparse.dense import reference_batch
from constrainedsparse.formulations import formulation_class
from constrainedsparse.settings import config_field_types, parse_value
from constrainedsparse.spec import Problem, load_problem
from constrainedsparse.targets import SparsityConfig

RESNET = "cifar10-resnet18"
DEFAULT_PROBLEMS = (RESNET, "digits-mlp", "mnist1d-mlp")
DEFAULT_METHODS = ("slr", "admm", "l0", "magnitude", "magnitude+l2", "slr+l2")
DEFAULT_OPTIMIZERS = ("sgd", "adam")
QUICK_METHODS = ("slr", "admm", "l0", "slr+l2")
DEFAULT_OUT = Path(__file__).parent / "results" / "overhead"
L2_SUFFIX = "+l2"
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}
OPTIMIZER_TEXT = {"sgd": "SGD(lr=0.01, momentum=0.9)", "adam": "Adam(lr=1e-3)"}


def goal(problem: str, method: str) -> float | None:
    """The issue's goal for the amortised ratio of ``method`` on ``problem`` (``None``: no goal)."""
    if method in ("slr", "admm"):
        return 1.05 if problem == RESNET else 1.25
    if method == "l0" and problem == RESNET:
        return 1.5
    return None


L2_GOAL = 0.05
"""What one user constraint may add on the ResNet (amortised, relative)."""


@dataclass(frozen=True)
class ResNetShape:
    """Size of the generated CIFAR-10 batches.

    Attributes:
        batch: Minibatch size.
        image: Height and width of the RGB images.
        samples: Generated training images (the reference batch of slr takes 128 of them).
        epoch_steps: Steps of one epoch, for the amortised ratio.
        default_steps: Timed steps per repeat when ``--steps`` is not given.
    """

    batch: int = 32
    image: int = 32
    samples: int = 1024
    epoch_steps: int = math.ceil(50_000 / 32)
    default_steps: int = 10


QUICK_RESNET = ResNetShape(batch=8, image=16, samples=64, epoch_steps=math.ceil(50_000 / 8), default_steps=2)


def resnet_problem(shape: ResNetShape, seed: int) -> Problem:
    """The bundled ``cifar10-resnet18`` model and targets on generated images and labels of the real shape."""
    bundled = load_problem(RESNET)

    def data(options: Any) -> tuple[TensorDataset, TensorDataset]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(shape.samples, 3, shape.image, shape.image, generator=generator)
        y = torch.randint(0, 10, (shape.samples,), generator=generator)
        return TensorDataset(x, y), TensorDataset(x, y)

    return dataclasses.replace(
        bundled,
        description=f"{RESNET} model, generated {shape.image}x{shape.image} RGB batches of {shape.batch}",
        data=data,
        batch_size=shape.batch,
        check=None,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``--quick`` applied; ``configs`` per formulation)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="digits-mlp and a small ResNet, sgd, slr admm l0 slr+l2, 2 steps, 2 repeats",
    )
    parser.add_argument("--problems", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_PROBLEMS)}")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"formulations and X+l2 variants (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--optimizers", nargs="+", default=None, choices=sorted(OPTIMIZERS), help="default: sgd adam")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help=f"timed steps per repeat (default: one epoch; {RESNET}: 10)"
    )
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per method (default 7)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed repeats first")
    parser.add_argument("--sparsity", type=sparsity_level, default=0.9, help="in [0, 1) (default 0.9)")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="formulation setting, e.g. interval=20 (every method that has it) or slr:s0=0.02",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/overhead; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    if args.problems is None:
        args.problems = ["digits-mlp", RESNET] if args.quick else list(DEFAULT_PROBLEMS)
    if args.methods is None:
        args.methods = list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    if args.optimizers is None:
        args.optimizers = ["sgd"] if args.quick else list(DEFAULT_OPTIMIZERS)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.steps is None and args.quick:
        args.steps = 2
    args.resnet = QUICK_RESNET if args.quick else ResNetShape()
    for name in args.problems:  # bundled or a file, trained (not layer-wise): refused before any model is built
        problem_of_kind(parser, "--problems", name, layerwise=False)
    try:
        args.configs = formulation_configs(sorted({base_method(m) for m in args.methods}), args.settings)
    except ValueError as err:
        parser.error(str(err))
    return args


def base_method(method: str) -> str:
    """The formulation of a method (``slr+l2`` -> ``slr``)."""
    return method.removesuffix(L2_SUFFIX)


def formulation_configs(methods: Sequence[str], settings: Sequence[str]) -> dict[str, Any]:
    """Each formulation's ``Config`` with the ``--set`` values applied and validated.

    Args:
        methods: Formulation names.
        settings: ``KEY=VALUE`` (every formulation that has ``KEY``) or ``METHOD:KEY=VALUE``.

    Raises:
        ValueError: For an unknown formulation, a malformed item, a key no chosen formulation has, a bad value.
    """
    classes = {method: formulation_class(method) for method in methods}
    values: dict[str, dict[str, Any]] = {method: {} for method in methods}
    for item in settings:
        key, sep, text = item.partition("=")
        prefix, colon, key = key.strip().rpartition(":")
        chosen = [prefix] if colon else list(methods)
        if not sep or not key or (colon and prefix not in methods):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or METHOD:KEY=VALUE with METHOD in {list(methods)}")
        takers = [m for m in chosen if key in config_field_types(classes[m].Config)]
        if not takers:
            raise ValueError(f"--set {item!r}: no formulation among {chosen} has a setting {key!r}")
        for method in takers:
            values[method][key] = parse_value(key, text.strip(), config_field_types(classes[method].Config)[key])
    configs = {method: classes[method].Config.from_values(values[method]) for method in methods}
    for config in configs.values():
        config.validate()
    return configs


class Runner:
    """One method on its own model copy, in the user's loop.

    Args:
        step: One training step on a batch.
        epoch_hook: ``epoch_hook(epoch)`` at the end of epoch ``epoch`` (0-based), or ``None``.
        config: The formulation's settings (for the record).
        coordinate: slr/admm: the formulation's (timed) ``coordinate``, to time one outside the steps.
        coordinations_per_epoch: How many coordinations an epoch holds (0 for other methods).
        coordination_ms: The list the timed ``coordinate`` appends each coordination's milliseconds to.
    """

    def __init__(
        self,
        step: Callable[[tuple[torch.Tensor, torch.Tensor]], object],
        epoch_hook: Callable[[int], object] | None = None,
        config: dict[str, Any] | None = None,
        coordinate: Callable[[], object] | None = None,
        coordinations_per_epoch: float = 0.0,
        coordination_ms: list[float] | None = None,
    ) -> None:
        self.step = step
        self.epoch_hook = epoch_hook
        self.config = config or {}
        self.epoch = 0
        self.coordinate = coordinate
        self.coordinations_per_epoch = coordinations_per_epoch
        # every coordination's time, in and out of the timed blocks (appended to by ``coordinate``)
        self.coordination_ms = [] if coordination_ms is None else coordination_ms

    def run(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One training step per batch."""
        for batch in batches:
            self.step(batch)

    def coordination_time(self, since: int) -> float:
        """Milliseconds spent in coordinations recorded after the first ``since``."""
        return sum(self.coordination_ms[since:])

    def end_epoch(self) -> None:
        """The epoch boundary (nothing for the plain loop)."""
        if self.epoch_hook is not None:
            self.epoch_hook(self.epoch)
        self.epoch += 1


def plain_runner(model: nn.Module, problem: Problem, optimizer: str) -> Runner:
    """The loop without the library: ``zero_grad; loss_fn(model(x), y).backward(); step``."""
    opt = OPTIMIZERS[optimizer](model.parameters())
    loss_fn = problem.loss

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return Runner(step)


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (the classifier), what the ``+l2`` constraint bounds."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the +l2 variants need a model with an nn.Linear layer")
    return linears[-1]


def formulation_runner(
    method: str,
    config: Any,
    model: nn.Module,
    problem: Problem,
    optimizer: str,
    sparsity: float,
    train: TensorDataset,
    epochs: int,
    steps_per_epoch: int,
    seed: int,
) -> Runner:
    """A method built as a user builds it: targets, :class:`SparsityProblem` (with the ``+l2`` constraint),
    their optimizer, ``make``, ``setup``; the step is the split step, the epoch hook ``end_epoch`` then
    ``start_epoch``."""
    targets = problem.targets.resolve(model, SparsityConfig(sparsity=sparsity))
    constraints: dict[str, constrainedsparse.UserConstraint] = {}
    if method.endswith(L2_SUFFIX):
        layer = last_linear(model)
        bound = 0.9 * float(layer.weight.detach().pow(2).sum())
        constraints["l2"] = constrainedsparse.UserConstraint(lambda m: layer.weight.pow(2).sum() - bound, "<=")
    sparsity_problem = constrainedsparse.SparsityProblem(model, problem.loss, targets, constraints)
    opt = OPTIMIZERS[optimizer](model.parameters())
    formulation = constrainedsparse.make(base_method(method), sparsity_problem, config, optimizer=opt)
    coordinate = getattr(formulation, "coordinate", None)
    coordination_ms: list[float] = []
    if coordinate is not None:  # slr/admm: every coordination is timed (instrumentation of this benchmark)

        def timed_coordinate() -> dict[str, float]:
            started = time.perf_counter()
            metrics = coordinate()
            coordination_ms.append((time.perf_counter() - started) * 1e3)
            return metrics

        formulation.coordinate = timed_coordinate  # type: ignore[method-assign]
    wanted = formulation.reference_samples
    formulation.setup(epochs, steps_per_epoch, reference_batch(train, seed, wanted) if wanted else None)
    formulation.start_epoch(0)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        lagrangian_step = formulation.backward(batch)
        opt.step()
        formulation.post_step(lagrangian_step)

    def epoch_hook(epoch: int) -> None:
        formulation.end_epoch(epoch)
        if epoch + 1 < epochs:
            formulation.start_epoch(epoch + 1)

    return Runner(
        step,
        epoch_hook,
        dataclasses.asdict(formulation.config),
        formulation.coordinate if coordinate is not None else None,
        formulation.coordinations_per_epoch() if coordinate is not None else 0.0,
        coordination_ms,
    )


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


def bench(name: str, optimizer: str, args: argparse.Namespace) -> dict[str, Any]:
    """Times the plain loop and every method on one problem with one optimizer.

    Returns:
        Medians in milliseconds, ratios, goals and the sizes that shaped them.
    """
    problem = resnet_problem(args.resnet, args.seed) if name == RESNET else load_problem(name)
    torch.manual_seed(args.seed)
    base = problem.model(problem.options)
    train, _ = problem.data(problem.options)
    if name == RESNET:
        epoch_steps, default_steps = args.resnet.epoch_steps, args.resnet.default_steps
    else:
        epoch_steps = default_steps = math.ceil(len(train) / problem.batch_size)
    batches = fixed_batches(
        train, problem.batch_size, args.steps if args.steps is not None else default_steps, args.seed
    )
    epochs = args.warmup + args.repeats
    runners = {"plain": plain_runner(copy.deepcopy(base), problem, optimizer)}
    for method in args.methods:
        runners[method] = formulation_runner(
            method,
            args.configs[base_method(method)],
            copy.deepcopy(base),
            problem,
            optimizer,
            args.sparsity,
            train,
            epochs,
            epoch_steps,
            args.seed,
        )
    step_ms: dict[str, list[float]] = {method: [] for method in runners}
    epoch_ms: dict[str, list[float]] = {method: [] for method in runners}
    coordination_ms: dict[str, list[float]] = {method: [] for method in runners}
    names = list(runners)
    for round_ in range(epochs):
        shift = round_ % len(names)
        for method in names[shift:] + names[:shift]:
            runner = runners[method]
            before = len(runner.coordination_ms)
            start = time.perf_counter()
            runner.run(batches)
            middle = time.perf_counter()
            in_block = runner.coordination_time(before)
            runner.end_epoch()
            stop = time.perf_counter()
            boundary = (stop - middle) * 1e3 - runner.coordination_time(before) + in_block
            if runner.coordinate is not None and len(runner.coordination_ms) == before:
                runner.coordinate()  # none in this block (an epoch is longer): time one on its own
            if round_ >= args.warmup:
                step_ms[method].append(((middle - start) * 1e3 - in_block) / len(batches))
                epoch_ms[method].append(boundary)
                coordination_ms[method].extend(runner.coordination_ms[before:])
    plain = statistics.median(step_ms["plain"])
    result: dict[str, Any] = {
        "problem": name,
        "optimizer": optimizer,
        "parameters": sum(p.numel() for p in base.parameters()),
        "batch_size": problem.batch_size,
        "steps_per_repeat": len(batches),
        "epoch_steps": epoch_steps,
        "plain_step_ms": plain,
        "methods": {},
        "samples_ms": {"step": step_ms, "epoch_boundary": epoch_ms, "coordination": coordination_ms},
    }
    for method in args.methods:
        per_epoch = runners[method].coordinations_per_epoch
        coordination = statistics.median(coordination_ms[method]) if coordination_ms[method] else 0.0
        step = statistics.median(step_ms[method]) + per_epoch * coordination / epoch_steps
        boundary = statistics.median(epoch_ms[method])
        amortised = step + boundary / epoch_steps
        result["methods"][method] = {
            "step_ms": step,
            "coordination_ms": coordination,
            "coordinations_per_epoch": per_epoch,
            "epoch_boundary_ms": boundary,
            "amortised_ms": amortised,
            "step_ratio": step / plain,
            "amortised_ratio": amortised / plain,
            "goal": goal(name, method),
            "config": runners[method].config,
        }
    for method, entry in result["methods"].items():
        without = result["methods"].get(base_method(method))
        if method.endswith(L2_SUFFIX) and without is not None:
            entry["l2_adds"] = entry["amortised_ms"] / without["amortised_ms"] - 1
            entry["l2_goal"] = L2_GOAL if name == RESNET else None
    return result


def _coordination(entry: dict[str, Any]) -> str:
    if not entry["coordinations_per_epoch"]:
        return " | "
    return f"{entry['coordination_ms']:.2f} | {entry['coordinations_per_epoch']:g}"


def _verdict(value: float, limit: float | None) -> str:
    return "" if limit is None else (" ✓" if value <= limit else " ✗")


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per problem x optimizer x method: step times, epoch boundary, both ratios and the goal."""
    lines = [
        "| problem | optimizer | method | plain ms/step | method ms/step | step ratio | coordination ms "
        "| coordinations / epoch | epoch boundary ms | amortised ratio | goal | +l2 adds |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for method, entry in result["methods"].items():
            limit = entry["goal"]
            adds = ""
            if "l2_adds" in entry:
                adds = f"{100 * entry['l2_adds']:+.1f} %" + _verdict(entry["l2_adds"], entry["l2_goal"])
                if entry["l2_goal"] is not None:
                    adds += f" (goal <= {100 * entry['l2_goal']:.0f} %)"
            lines.append(
                f"| {result['problem']} | {result['optimizer']} | {method} | {result['plain_step_ms']:.2f} "
                f"| {entry['step_ms']:.2f} | {entry['step_ratio']:.2f}x | {_coordination(entry)} "
                f"| {entry['epoch_boundary_ms']:.1f} "
                f"| {entry['amortised_ratio']:.2f}x{_verdict(entry['amortised_ratio'], limit)} "
                f"| {'' if limit is None else f'<= {limit:.2f}x'} | {adds} |"
            )
    return "\n".join(lines)


def _load() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:  # pragma: no cover - platforms without getloadavg
        return "unknown"


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
    load_before = _load()
    with torch_threads(args.threads) as threads:
        results = []
        for name in args.problems:
            for optimizer in args.optimizers:
                results.append(bench(name, optimizer, args))
                print(f"{name} {optimizer}: done ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started
    load_after = _load()
    table = markdown_table(results)
    configs = {base_method(m): entry["config"] for result in results for m, entry in result["methods"].items()}
    text = "\n".join(
        [
            "# Overhead per training step: the user's own loop with constrainedsparse against the same loop without",
            "",
            "```",
            command,
            "```",
            "",
            f"torch {torch.__version__} on CPU, torch threads: {threads}; sparsity {args.sparsity:g} unstructured; "
            f"{args.repeats} timed repeats (median) after {args.warmup} warm-up, methods interleaved; "
            f"wall time {wall:.0f} s; load average (1, 5, 15 min) {load_before} before, {load_after} after.",
            "",
            "Optimizers (the user's, the same for the plain loop): "
            + ", ".join(f"`{name}` = {OPTIMIZER_TEXT[name]}" for name in args.optimizers)
            + ". step ratio = median ms per step (`zero_grad; f.backward(batch); opt.step(); f.post_step(step)`) "
            "without coordination, plus the median coordination (slr/admm: Z-step, dual steps, SLR's f) times "
            "coordinations per epoch / steps per epoch, / median ms per plain step (`zero_grad; "
            "loss_fn(model(x), y).backward(); opt.step()`), same batches. "
            "amortised ratio adds one epoch boundary (`end_epoch; start_epoch`) spread over the epoch's steps. "
            "`X+l2` is X with one user constraint (squared L2 norm of the last Linear layer's weight <= 0.9 x its "
            "initial value); `+l2 adds` = its amortised time / X's - 1. Goals (issue): on the ResNet slr/admm "
            "<= 1.05x, l0 <= 1.5x, one user constraint adds <= 5 %; on the MLPs slr/admm <= 1.25x.",
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
        "load_average": {"before": load_before, "after": load_after},
        "optimizers": {name: OPTIMIZER_TEXT[name] for name in args.optimizers},
        "results": results,
    }
    write_results(args.out, text, payload)
    print(table)
    print(f"\nwall time {wall:.1f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
