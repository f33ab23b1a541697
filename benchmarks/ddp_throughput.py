"""Training throughput (samples/second) of one vs several processes under DistributedDataParallel.

The problem is the bundled ``cifar10-resnet18`` (ResNet-18 with the CIFAR stem, 11.2 M parameters,
sparsity 0.9 on every conv but the first) read from a CIFAR-10 folder in the real python-batch
format. Unless ``--data-dir`` is given, a generated one is written to a temporary folder first:
random uint8 images and labels pickled exactly like ``cifar-10-batches-py`` (``data_batch_1..5``,
``test_batch``), read back through ``--set data_dir`` / ``train_subset`` like any run.

Every configuration (``PxT`` = P processes with T torch threads each) runs in fresh processes
started by torch's elastic launcher (:func:`constrainedsparse.launcher.launch`, the same path as
``constrainedsparse run --nproc P``, also for P = 1). Each worker builds the formulation as the
engine does (model, targets, :class:`~constrainedsparse.problem.SparsityProblem`, ``make``,
``setup``), wraps the model in DDP (:func:`~constrainedsparse.distributed.wrap`), reads its shard
of every global batch (:func:`~constrainedsparse.distributed.loader`), and times ``--steps``
``training_step`` calls after ``--warmup`` untimed ones, between two barriers. Throughput is
``steps x global batch / seconds``: the global batch is the same for every configuration (each of
P ranks computes ``batch / P`` samples per step), so the figures compare like for like. With
``--repeats R`` every configuration runs R times, interleaved (the order rotates every round, so
a change in the machine's load hits every configuration alike), and the median is reported
(for an even count, the faster of the two middle runs).

Usage::

    .venv/bin/python benchmarks/ddp_throughput.py                      # 1x1, 1x2, 2x1 on 2 cores
    .venv/bin/python benchmarks/ddp_throughput.py --quick              # tiny: 1x1 and 2x1, 3 steps
    .venv/bin/python benchmarks/ddp_throughput.py --configs 1x4 2x2 4x1 --batch 64 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    checked,
    command_line,
    non_negative_int,
    out_folder,
    positive_int,
    results_dir,
    scratch_dir,
    write_results,
)

from constrainedsparse import distributed, launcher
from constrainedsparse.formulations import formulation_class

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = SCRIPT.parent / "results" / "ddp_throughput"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CONFIG = re.compile(r"(\d+)x(\d+)")


def write_cifar10(folder: Path, train_images: int, test_images: int = 16, seed: int = 0) -> Path:
    """A generated CIFAR-10 in the real on-disk format (pickled dicts with ``b"data"`` uint8 ``(n, 3072)``
    and ``b"labels"``), ``train_images`` spread over the five training batches."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [len(part) for part in np.array_split(np.arange(train_images), 5)] + [test_images]
    for name, size in zip(CIFAR_FILES, sizes):
        entry = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, size=size).tolist(),
            b"data": rng.integers(0, 256, size=(size, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(size)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    return folder


def parse_config(text: str) -> tuple[int, int]:
    """``"PxT"`` -> ``(processes, threads per process)``.

    Raises:
        ValueError: Unless P and T are integers >= 1.
    """
    match = CONFIG.fullmatch(text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"--configs entries must be PxT with integers >= 1 (processes x threads), got {text!r}")
    return int(match[1]), int(match[2])


# --- worker (one rank) ----------------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> None:
    """One rank of one configuration; rank 0 writes the timing to ``spec["result"]``."""
    import torch.distributed as dist

    from constrainedsparse.engine import reference_batch
    from constrainedsparse.formulations import make
    from constrainedsparse.problem import SparsityProblem
    from constrainedsparse.spec import load_problem
    from constrainedsparse.targets import SparsityConfig

    torch.set_num_threads(spec["threads"])
    with distributed.process_group("cpu"):
        problem = load_problem("cifar10-resnet18")
        options = {**problem.options, "data_dir": spec["data_dir"], "train_subset": spec["train_images"]}
        train, _ = problem.data(options)
        torch.manual_seed(0)
        model = problem.model(options)
        targets = problem.targets.resolve(model, SparsityConfig(sparsity=0.9))
        sparsity_problem = SparsityProblem(model, problem.loss, targets)
        formulation = make(spec["formulation"], sparsity_problem, lr=problem.lr, dual_lr=problem.dual_lr)
        wanted = formulation.reference_samples
        reference = distributed.shard(reference_batch(train, 0, wanted)) if wanted else None
        batches = distributed.loader(train, spec["batch"], seed=0)
        formulation.setup(1, len(batches), reference)
        formulation.start_epoch(0)
        sparsity_problem.forward_module = distributed.wrap(model)
        steps = iter(batches)
        for _ in range(spec["warmup"]):
            formulation.training_step(next(steps))
        if distributed.is_distributed():
            dist.barrier()
        started = time.perf_counter()
        for _ in range(spec["steps"]):
            formulation.training_step(next(steps))
        if distributed.is_distributed():
            dist.barrier()
        seconds = time.perf_counter() - started
        if distributed.is_main_process():
            record = {"seconds": seconds, "world_size": distributed.world_size(), "threads": torch.get_num_threads()}
            Path(spec["result"]).write_text(json.dumps(record))


# --- driver ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: 1x1 and 2x1, batch 8, 3 steps")
    parser.add_argument("--configs", nargs="+", help="PxT: P processes with T threads each (default 1x1 1x2 2x1)")
    parser.add_argument("--formulation", default="admm", help="formulation whose training_step is timed")
    parser.add_argument("--batch", type=positive_int, help="global batch (default 32; --quick 8)")
    parser.add_argument("--steps", type=positive_int, help="timed steps (default 20; --quick 3)")
    parser.add_argument("--warmup", type=non_negative_int, help="untimed steps first (default 3; --quick 1)")
    parser.add_argument(
        "--repeats", type=positive_int, default=1, help="runs of every configuration, interleaved (median)"
    )
    parser.add_argument("--data-dir", type=Path, help="a cifar-10-batches-py folder (default: generate one)")
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/ddp_throughput; --quick: a temp folder)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    quick = args.quick
    configs = args.configs if args.configs is not None else (["1x1", "2x1"] if quick else ["1x1", "1x2", "2x1"])
    args.configs = [checked(parser, parse_config, c) for c in configs]
    args.batch = args.batch if args.batch is not None else (8 if quick else 32)
    args.steps = args.steps if args.steps is not None else (3 if quick else 20)
    args.warmup = 1 if quick and args.warmup is None else (3 if args.warmup is None else args.warmup)
    for processes, _ in args.configs:
        checked(parser, distributed.check_global_batch, args.batch, processes)
    checked(parser, formulation_class, args.formulation, flag="--formulation")  # not the ranks' error, later
    return args


def run_config(processes: int, threads: int, args: argparse.Namespace, data_dir: Path, scratch: Path) -> dict:
    """Launches one configuration and returns its timing record."""
    images = args.batch * (args.steps + args.warmup)
    result = scratch / f"{processes}x{threads}.json"
    spec = {
        "threads": threads,
        "data_dir": str(data_dir),
        "train_images": images,
        "formulation": args.formulation,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "result": str(result),
    }
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        code, message = launcher.launch(processes, [str(SCRIPT), "--worker", json.dumps(spec)])
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    if code != 0:
        raise RuntimeError(f"configuration {processes}x{threads} failed: {message}")
    record = json.loads(result.read_text())
    samples = args.steps * args.batch
    return {
        "processes": processes,
        "threads_per_process": threads,
        "global_batch": args.batch,
        "per_rank_batch": args.batch // processes,
        "steps": args.steps,
        "seconds": record["seconds"],
        "samples_per_second": samples / record["seconds"],
        "world_size": record["world_size"],
    }


def _median(rows: list[dict]) -> dict:
    """The median repeat of one configuration (by seconds; of an even count, the faster of the middle two), with
    every repeat's throughput."""
    ordered = sorted(rows, key=lambda row: row["seconds"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "repeats_samples_per_second": [row["samples_per_second"] for row in rows],
    }


def markdown(results: list[dict], args: argparse.Namespace, command: str, load: tuple, wall: float) -> str:
    base = results[0]["samples_per_second"]
    lines = [
        "# DDP throughput: cifar10-resnet18, one vs several processes",
        "",
        "```",
        command,
        "```",
        "",
        f"torch {torch.__version__} on CPU ({os.cpu_count()} cores visible), backend gloo; formulation "
        f"`{args.formulation}`, sparsity 0.9; global batch {args.batch}; {args.steps} timed `training_step`s after "
        f"{args.warmup} warm-up; generated CIFAR-10 in the python-batch format; load average before / after: "
        f"{load[0]:.1f} / {load[1]:.1f} (the machine is shared: other jobs ran at the same time); {wall:.0f} s wall.",
        "",
        "| processes x threads | per-rank batch | seconds (lower median) | "
        f"samples/s (of the lower-median seconds of {args.repeats}) | every repeat, samples/s | vs first row |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        every = ", ".join(f"{value:.1f}" for value in r["repeats_samples_per_second"])
        lines.append(
            f"| {r['processes']} x {r['threads_per_process']} | {r['per_rank_batch']} | {r['seconds']:.2f} | "
            f"{r['samples_per_second']:.1f} | {every} | {r['samples_per_second'] / base:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs every configuration, prints the table, writes ``results.md`` and ``results.json``.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        Process exit status (0).
    """
    args = parse_args(argv)
    if args.worker is not None:
        try:
            worker(json.loads(args.worker))
        except Exception as err:  # the launcher reports this rank's line
            launcher.report_error(f"{type(err).__name__}: {err}")
            raise
        return 0
    command = command_line("benchmarks/ddp_throughput.py", argv)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with scratch_dir("ddp-throughput-") as scratch:
        images = args.batch * (args.steps + args.warmup)
        data_dir = args.data_dir or write_cifar10(scratch / "cifar-10-batches-py", images)
        runs: dict[tuple[int, int], list[dict]] = {config: [] for config in args.configs}
        for repeat in range(args.repeats):
            shift = repeat % len(args.configs)
            for processes, threads in args.configs[shift:] + args.configs[:shift]:
                row = run_config(processes, threads, args, data_dir, scratch)
                runs[processes, threads].append(row)
                print(f"{processes}x{threads}: {row['samples_per_second']:.1f} samples/s", file=sys.stderr, flush=True)
    results = [_median(rows) for rows in runs.values()]
    wall = time.perf_counter() - started
    load = (load_before, os.getloadavg()[0])
    text = markdown(results, args, command, load, wall)
    payload = {
        "command": command,
        "torch": torch.__version__,
        "formulation": args.formulation,
        "load_average": load,
        "wall_seconds": wall,
        "results": results,
    }
    write_results(args.out, text, payload)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
