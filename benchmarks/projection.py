"""Wall time of ``TopK(k).project(x)`` against one ``x.abs()`` pass and a naive reference.

For every sparsity the script times, over the same float32 tensor and in one run:

* ``abs``: one elementwise pass, ``x.abs()`` — the floor any magnitude projection must pay;
* ``project``: :meth:`constrainedsparse.sets.TopK.project`;
* ``naive``: a ``kthvalue`` threshold and a mask,
  ``a = x.abs(); t = a.kthvalue(n - k + 1).values; x * (a >= t)``.

The three are interleaved (their order rotates every repeat) after a warm-up, and the median of
each is reported. The projection is checked against the naive result and the script exits with
status 1 when they differ. With exact float ties at the threshold the naive mask keeps every tied
entry while the projection keeps exactly ``k`` (lower flat index first); the check then compares
with the naive threshold plus that tie-breaking rule and says so in the ``check`` column.

Usage::

    .venv/bin/python benchmarks/projection.py                      # 16M entries, sparsity 0.9
    .venv/bin/python benchmarks/projection.py --quick              # 1M entries, few repeats
    .venv/bin/python benchmarks/projection.py --sparsity 0.5 0.9 0.99 --repeats 21
    .venv/bin/python benchmarks/projection.py --json results.json --threads 4
    .venv/bin/python benchmarks/projection.py --device cuda        # if a GPU is available
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from constrainedsparse.sets import TopK, keep_count

FULL_NUMEL = 16 * 1024 * 1024
QUICK_NUMEL = 1024 * 1024


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed namespace, with ``numel`` and ``repeats`` resolved for ``--quick``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M entries and few repeats")
    parser.add_argument("--numel", type=int, default=None, help=f"entries (default {FULL_NUMEL})")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9], help="one or more sparsities")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.numel is None:
        args.numel = QUICK_NUMEL if args.quick else FULL_NUMEL
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    if args.numel < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--numel and --repeats must be >= 1, --warmup >= 0")
    return args


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


def check(x: torch.Tensor, k: int, got: torch.Tensor, naive: torch.Tensor) -> tuple[bool, str]:
    """Compares the projection with the naive reference.

    Args:
        x: The projected tensor.
        k: Keep count.
        got: ``TopK(k).project(x)``.
        naive: :func:`naive_project` of ``x``.

    Returns:
        ``(ok, how)``: whether they agree and a short word on how they were compared.
    """
    a = x.abs().reshape(-1)
    t = a.kthvalue(a.numel() - k + 1).values
    above = a > t
    tied = a == t
    if int(above.sum()) + int(tied.sum()) == k:
        return torch.equal(got, naive), "exact"
    # Ties at the threshold: keep the lowest flat indices among them, as sets.py documents.
    room = k - int(above.sum())
    keep = above | (tied & (torch.cumsum(tied.to(torch.int64), 0) <= room))
    ok = torch.equal(got, x * keep.reshape(x.shape)) and bool(((naive != got).reshape(-1) <= tied).all())
    return ok, f"ties({int(tied.sum())})"


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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints a markdown table.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        Process exit status: 0 when every projection matched the reference, else 1.
    """
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.numel, generator=gen, dtype=torch.float32).to(device)
    threads = torch.get_num_threads()
    print(
        f"TopK.project benchmark: n={args.numel} float32 on {device}, "
        f"repeats={args.repeats} (median), warmup={args.warmup}"
    )
    print()
    print("| sparsity | abs ms | project ms | project/abs | naive ms | naive/abs | check | torch | threads |")
    print("|---:|---:|---:|---:|---:|---:|:---|:---|---:|")
    rows = []
    failed = False
    for sparsity in args.sparsity:
        k = keep_count(args.numel, sparsity)
        if k < 1:
            print(f"skipping sparsity {sparsity}: keeps no entry", file=sys.stderr)
            continue
        projector = TopK(k)
        got = projector.project(x)
        naive = naive_project(x, k)
        ok, how = check(x, k, got, naive)
        del got, naive
        if not ok:
            failed = True
            print(f"MISMATCH at sparsity {sparsity}: project differs from naive", file=sys.stderr)
        ms = time_interleaved(
            {
                "abs": x.abs,
                "project": lambda p=projector: p.project(x),
                "naive": lambda k=k: naive_project(x, k),
            },
            args.repeats,
            args.warmup,
            device,
        )
        row = {
            "sparsity": sparsity,
            "k": k,
            "abs_ms": ms["abs"],
            "project_ms": ms["project"],
            "ratio_project_abs": ms["project"] / ms["abs"],
            "naive_ms": ms["naive"],
            "ratio_naive_abs": ms["naive"] / ms["abs"],
            "correct": ok,
            "check": how,
        }
        rows.append(row)
        print(
            f"| {sparsity:g} | {row['abs_ms']:.2f} | {row['project_ms']:.2f} "
            f"| {row['ratio_project_abs']:.2f} | {row['naive_ms']:.2f} "
            f"| {row['ratio_naive_abs']:.2f} | {'ok' if ok else 'FAIL'} {how} "
            f"| {torch.__version__} | {threads} |"
        )
    if args.json:
        payload = {
            "numel": args.numel,
            "dtype": "float32",
            "device": str(device),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "threads": threads,
            "results": rows,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
