"""Wall time of ``TopK(k).project(x)`` against one ``x.abs()`` pass and a naive reference.

For every data kind and sparsity the script times, over the same float32 tensor and in one run:

* ``abs``: one elementwise pass, ``x.abs()`` — the floor any magnitude projection must pay (it
  allocates its result, as ``project`` does);
* ``project``: :meth:`constrainedsparse.sets.TopK.project`, which allocates its result;
* ``project(out=)``: the same into a preallocated buffer (``project(x, out=buffer)``), as a caller
  that owns one (SLR's duplicate variable Z) can call it;
* ``naive``: a ``kthvalue`` threshold and a mask,
  ``a = x.abs(); t = a.kthvalue(n - k + 1).values; x * (a >= t)``.

The data kinds (``--data``): ``randn`` (Gaussian; a tie at the threshold is rare), ``ties``
(integers 1..8 with random signs: every threshold is tied by about 1/8 of the entries) and
``quantized`` (Gaussian rounded to multiples of 1/16: a few hundred levels, every threshold tied).
The timings are interleaved (their order rotates every repeat) after a warm-up, and the median of
each is reported; the load average is recorded before and after (the machine may be shared). Both
projections are checked against the naive result and the script exits with status 1 when one
differs. With ties at the threshold the naive mask keeps every tied entry while the projection
keeps exactly ``k`` (lower flat index first); the check then compares with the naive threshold
plus that tie-breaking rule and says so in the ``check`` column.

Usage::

    .venv/bin/python benchmarks/projection.py                      # 16M entries, sparsity 0.9, randn
    .venv/bin/python benchmarks/projection.py --quick              # 1M entries, few repeats
    .venv/bin/python benchmarks/projection.py --data randn ties quantized --sparsity 0.5 0.9 0.99 --repeats 15 \\
        --out benchmarks/results/projection
    .venv/bin/python benchmarks/projection.py --device cuda        # if a GPU is available
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from common import (
    checked,
    command_line,
    non_negative_int,
    out_folder,
    positive_int,
    sparsity_level,
    thread_count,
    write_results,
)

from constrainedsparse.sets import TopK, keep_count
from constrainedsparse.settings import resolve_device

FULL_NUMEL = 16 * 1024 * 1024
QUICK_NUMEL = 1024 * 1024
DATA = ("randn", "ties", "quantized")
GOAL = 2.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed namespace, with ``numel`` and ``repeats`` resolved for ``--quick``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M entries and few repeats")
    parser.add_argument("--numel", type=positive_int, default=None, help=f"entries (default {FULL_NUMEL})")
    parser.add_argument("--data", nargs="+", default=["randn"], choices=DATA, help="data kinds (default randn)")
    parser.add_argument("--sparsity", type=sparsity_level, nargs="+", default=[0.9], help="one or more, in [0, 1)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats (default 15)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds first")
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True, help="time the reference")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=out_folder, default=None, help="write results.md and results.json here")
    args = parser.parse_args(argv)
    if args.numel is None:
        args.numel = QUICK_NUMEL if args.quick else FULL_NUMEL
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    args.device = checked(parser, resolve_device, args.device, "--device")  # one this machine lacks too
    return args


def make_data(kind: str, numel: int, seed: int) -> torch.Tensor:
    """The float32 tensor of a data kind (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(numel, generator=gen)
    if kind == "ties":
        signs = torch.randint(0, 2, (numel,), generator=gen).float() * 2 - 1
        return torch.randint(1, 9, (numel,), generator=gen).float() * signs
    if kind == "quantized":
        return torch.round(torch.randn(numel, generator=gen) * 16) / 16
    raise ValueError(f"data must be one of {', '.join(DATA)}, got {kind!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_project(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference projection: ``kthvalue`` threshold on ``|x|``, ties at the threshold all kept.

    Args:
        x: Tensor to project.
        k: Number of entries to keep, ``1 <= k <= x.numel()``.

    Returns:
        ``x * (|x| >= t)`` with ``t`` the k-th largest magnitude.
    """
    a = x.abs()
    t = a.reshape(-1).kthvalue(x.numel() - k + 1).values
    return x * (a >= t)


def check(x: torch.Tensor, k: int, got: torch.Tensor, naive: torch.Tensor) -> tuple[bool, str, int]:
    """Compares the projection with the naive reference.

    Args:
        x: The projected tensor.
        k: Keep count.
        got: ``TopK(k).project(x)``.
        naive: :func:`naive_project` of ``x``.

    Returns:
        ``(ok, how, ties)``: whether they agree, a short word on how they were compared, and how many
        entries have the k-th largest magnitude.
    """
    a = x.abs().reshape(-1)
    t = a.kthvalue(a.numel() - k + 1).values
    above = a > t
    tied = a == t
    ties = int(tied.sum())
    if int(above.sum()) + ties == k:
        return torch.equal(got, naive), "exact", ties
    # Ties at the threshold: keep the lowest flat indices among them, as sets.py documents.
    room = k - int(above.sum())
    keep = above | (tied & (torch.cumsum(tied.to(torch.int64), 0) <= room))
    ok = torch.equal(got, x * keep.reshape(x.shape)) and bool(((naive != got).reshape(-1) <= tied).all())
    return ok, f"ties({ties})", ties


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median wall time in milliseconds of each callable, measured interleaved.

    Args:
        fns: Name to zero-argument callable.
        repeats: Timed rounds; every round runs each callable once, in a rotating order.
        warmup: Untimed rounds first.
        device: Synchronised around every call when it is a CUDA device.

    Returns:
        Name to median milliseconds.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            result = fns[name]()
            _sync(device)
            elapsed = time.perf_counter() - start
            del result
            if round_ >= warmup:
                samples[name].append(elapsed * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def _row(args: argparse.Namespace, kind: str, x: torch.Tensor, sparsity: float, device: torch.device) -> dict | None:
    """Times and checks one data kind at one sparsity (``None`` when it keeps no entry)."""
    k = keep_count(args.numel, sparsity)
    if k < 1:
        print(f"skipping sparsity {sparsity}: keeps no entry", file=sys.stderr)
        return None
    projector = TopK(k)
    buffer = torch.empty_like(x)
    got = projector.project(x)
    naive = naive_project(x, k)
    ok, how, ties = check(x, k, got, naive)
    into = projector.project(x, out=buffer)
    ok_out = into is buffer and torch.equal(into, got)
    del got, naive, into
    fns: dict[str, Callable[[], object]] = {
        "abs": x.abs,
        "project": lambda: projector.project(x),
        "project_out": lambda: projector.project(x, out=buffer),
    }
    if args.naive:
        fns["naive"] = lambda: naive_project(x, k)
    ms = time_interleaved(fns, args.repeats, args.warmup, device)
    return {
        "data": kind,
        "sparsity": sparsity,
        "k": k,
        "ties_at_threshold": ties,
        "abs_ms": ms["abs"],
        "project_ms": ms["project"],
        "ratio_project_abs": ms["project"] / ms["abs"],
        "project_out_ms": ms["project_out"],
        "ratio_project_out_abs": ms["project_out"] / ms["abs"],
        "naive_ms": ms.get("naive"),
        "ratio_naive_abs": ms["naive"] / ms["abs"] if "naive" in ms else None,
        "correct": ok and ok_out,
        "check": how + ("" if ok_out else ", out= differs"),
    }


def _cell(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(args: argparse.Namespace, rows: list[dict], meta: dict) -> str:
    """The results page: one table row per data kind and sparsity, the goal verdict per column."""
    lines = [
        "# Top-k projection against one `abs()` pass",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"n = {args.numel} float32 on {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"{args.repeats} interleaved repeats (median) after {args.warmup} warm-up; load average (1, 5, 15 min) "
        f"{meta['load_before']} before, {meta['load_after']} after. `project` allocates its result (as `abs` "
        "does); `project(out=)` writes into a preallocated buffer. Goal: ≤ 2× one `abs()` pass.",
        "",
        "| data | sparsity | entries tied at the threshold | abs ms | project ms | project/abs | project(out=) ms "
        "| out=/abs | naive ms | naive/abs | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['sparsity']:g} | {r['ties_at_threshold']} | {r['abs_ms']:.1f} | {r['project_ms']:.1f} "
            f"| {r['ratio_project_abs']:.2f} | {r['project_out_ms']:.1f} | {r['ratio_project_out_abs']:.2f} "
            f"| {_cell(r['naive_ms'], 1)} | {_cell(r['ratio_naive_abs'])} | {'ok' if r['correct'] else 'FAIL'} "
            f"{r['check']} |"
        )
    if rows:
        worst = max(r["ratio_project_abs"] for r in rows)
        worst_out = max(r["ratio_project_out_abs"] for r in rows)
        lines += [
            "",
            f"Worst ratio: project {worst:.2f}× (goal ≤ {GOAL:g}×: {'met' if worst <= GOAL else 'not met'}), "
            f"project(out=) {worst_out:.2f}× ({'met' if worst_out <= GOAL else 'not met'}).",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints the markdown table and writes it under ``--out`` if given.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        Process exit status: 0 when every projection matched the reference, else 1.
    """
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        load_before = [round(v, 2) for v in os.getloadavg()]
        rows = []
        for kind in args.data:
            x = make_data(kind, args.numel, args.seed).to(device)
            for sparsity in args.sparsity:
                row = _row(args, kind, x, sparsity, device)
                if row is not None:
                    rows.append(row)
                    print(
                        f"{kind} {sparsity:g}: project/abs {row['ratio_project_abs']:.2f}, "
                        f"out=/abs {row['ratio_project_out_abs']:.2f} ({row['check']})",
                        file=sys.stderr,
                    )
            del x
        meta = {
            "command": command_line("benchmarks/projection.py", argv),
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_before": load_before,
            "load_after": [round(v, 2) for v in os.getloadavg()],
        }
    finally:
        torch.set_num_threads(previous_threads)
    text = markdown(args, rows, meta)
    print(text)
    if args.out is not None:
        payload = {**meta, "numel": args.numel, "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup}
        write_results(args.out, text, {**payload, "results": rows})
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
