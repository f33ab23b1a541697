"""The README's own-run figures: the default ``constrainedsparse run`` (cold and cached dense model), the
``--set rho_growth=1.1`` example on mnist1d-mlp, and the dense accuracies of the bundled-problems table.

Every run is the CLI as a user types it, in a subprocess, with a fresh dense-model cache (``CONSTRAINEDSPARSE_CACHE``
in a temporary folder) unless the row says cached; figures are read back from each run's ``summary.json`` and
the wall seconds include the interpreter's start-up, as a user's ``time`` would. ``--threads`` sets
``OMP_NUM_THREADS`` and torch's threads (the README's figures: 2, the machine's cores); the load average is
recorded, since seconds on a shared machine move with it.

Usage::

    .venv/bin/python benchmarks/readme_runs.py                    # writes benchmarks/results/readme_runs/
    .venv/bin/python benchmarks/readme_runs.py --quick --out /tmp/readme_runs   # one run of 1 + 1 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import out_folder, results_dir, scratch_dir, thread_count

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "readme_runs"


def _run(args: list[str], cache: Path, out: Path, threads: int) -> tuple[dict, float, str]:
    """One CLI run; its summary, wall seconds and command line."""
    env = {**os.environ, "CONSTRAINEDSPARSE_CACHE": str(cache), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}  # fmt: skip
    command = [sys.executable, "-m", "constrainedsparse", "run", *args, "--out", str(out), "--wandb", "disabled",
               "--no-progress", "--overwrite"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    shown = " ".join(["constrainedsparse", "run", *args])
    return json.loads((out / "summary.json").read_text()), seconds, shown


def _rows(quick: bool, threads: int, scratch: Path) -> list[dict]:
    cold = scratch / "cold"
    runs = [
        ("default run, empty cache", [], cold),
        ("default run, dense model cached", [], cold),
        ("mnist1d-mlp defaults", ["mnist1d-mlp"], scratch / "m1"),
        ("mnist1d-mlp --set rho_growth=1.1", ["mnist1d-mlp", "--set", "rho_growth=1.1"], scratch / "m2"),
        ("mnist1d-cnn dense (--epochs 0)", ["mnist1d-cnn", "--epochs", "0"], scratch / "c"),
    ]
    if quick:  # one short run through the same path
        runs = [("default run, 1 + 1 epochs", ["--epochs", "1", "--pretrain-epochs", "1"], cold)]
    rows = []
    for label, args, cache in runs:
        summary, seconds, shown = _run(args, cache, scratch / "run", threads)
        metric = summary.get("metric", {}).get("name", "accuracy")
        rows.append({
            "run": label, "command": shown, "wall_seconds": round(seconds, 1),
            "dense": summary.get(f"dense_{metric}"), "hardprune": summary.get(f"hardprune_{metric}"),
            "cache_loaded": summary.get("dense_cache", {}).get("loaded"),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one default run of 1 + 1 epochs (a test's check)")
    parser.add_argument("--threads", type=thread_count, default=2, help="OMP/torch threads of every run (default 2)")
    parser.add_argument(
        "--out",
        type=out_folder,
        help="results directory (default: benchmarks/results/readme_runs; --quick: a temp folder)",
    )
    args = parser.parse_args(argv)
    args.out = results_dir(args.out, DEFAULT_OUT, args.quick)
    load = os.getloadavg()[0]
    with scratch_dir("readme-runs-") as scratch:
        rows = _rows(args.quick, args.threads, scratch)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/readme_runs.py" + (" --quick" if args.quick else ""),
              "threads": args.threads, "load_before": load, "load_after": os.getloadavg()[0], "rows": rows}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    after = record["load_after"]
    header = f"`{record['command']}` (threads {args.threads}; load average {load:.1f} before, {after:.1f} after)"
    lines = [header, "", "| run | command | dense | hard-prune | wall s |", "|---|---|---|---|---|"]
    for row in rows:
        hard = "—" if row["hardprune"] is None else f"{100 * row['hardprune']:.1f} %"
        lines.append(
            f"| {row['run']} | `{row['command']}` | {100 * row['dense']:.1f} % | {hard} | {row['wall_seconds']} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
