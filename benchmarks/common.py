"""Pieces the benchmark scripts share: the command line, how results are written, one run in a child process."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch

__all__ = [
    "ChildRun",
    "RunRefused",
    "checked",
    "command_line",
    "key_value",
    "non_negative_int",
    "out_folder",
    "positive_float",
    "positive_int",
    "problem_of_kind",
    "run_child",
    "scratch_dir",
    "sparsity_level",
    "sweep_child",
    "thread_count",
    "torch_threads",
    "usage_error",
    "write_results",
]

T = TypeVar("T")


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type; a bad value is the parser's one-line error, exit 2)."""
    return _int_at_least(text, 1)


thread_count = positive_int
"""``--threads``: an integer >= 1 (argparse type)."""


def non_negative_int(text: str) -> int:
    """An integer >= 0 (argparse type), e.g. a block index."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def sparsity_level(text: str) -> float:
    """A sparsity level in ``[0, 1)`` (argparse type; the range is the library's own check)."""
    from constrainedsparse.sets import check_sparsity

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    try:
        return check_sparsity(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def key_value(text: str) -> str:
    """``KEY=VALUE`` with a non-empty key (argparse type of ``--set``; the key itself is checked by the run)."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def checked(parser: argparse.ArgumentParser, call: Callable[..., T], *args: Any, flag: str = "") -> T:
    """``call(*args)``, a ``ValueError`` it raises (the library's own check of a value) as the parser's one-line
    error (usage, exit 2; after ``flag: `` if given), before any expensive work."""
    try:
        return call(*args)
    except ValueError as err:
        parser.error(f"{flag}: {err}" if flag else str(err))


def problem_of_kind(parser: argparse.ArgumentParser, flag: str, name: str, layerwise: bool) -> Any:
    """The problem ``name`` (bundled or a file, as ``constrainedsparse run`` reads it), refused by the parser's
    one-line error when unknown or not of the kind the benchmark runs (layer-wise or trained)."""
    from constrainedsparse.spec import LayerwiseProblem, load_problem

    problem = checked(parser, load_problem, name, flag=flag)
    if isinstance(problem, LayerwiseProblem) != layerwise:
        kind, other = ("layer-wise", "trained") if layerwise else ("trained", "layer-wise")
        parser.error(f"{flag} {name!r} is a {other} problem: this benchmark runs {kind} problems")
    return problem


def usage_error(message: str) -> NoReturn:
    """Ends the benchmark as ``parser.error`` does, for a user error found after parsing: ``PROG: error: ...``
    on stderr, exit status 2, no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def out_folder(text: str) -> Path:
    """``--out``: a folder, existing or to be made, not a file nor under one, where a folder can be made (argparse
    type: refused before the work, not by a traceback when the results are written at the end). Checked by
    making and removing an empty folder in the nearest existing one; nothing is left behind."""
    path = Path(text)
    for part in (path, *path.parents):
        if not part.exists():
            continue
        if not part.is_dir():
            raise argparse.ArgumentTypeError(f"{part} is a file, not a folder")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=part))
        except OSError as err:
            raise argparse.ArgumentTypeError(f"{text}: cannot make a folder in {part} ({err.strerror})") from None
        break
    return path


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as a user would retype it: interpreter, script and arguments, shell-quoted.

    Args:
        script: The script path to show when ``argv`` is given (``main`` called from Python).
        argv: The arguments given to ``main``; ``None`` means ``sys.argv``.
    """
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return shlex.join([python, *(sys.argv if argv is None else [script, *argv])])


def sweep_parser(
    description: str, settings: Sequence[str], methods: Sequence[str], out: Path
) -> argparse.ArgumentParser:
    """The command line of a settings x methods sweep run in child processes (``--quick``, ``--settings``,
    ``--methods``, ``--set``, ``--threads``, ``--seed``, ``--out``); see :func:`sweep_defaults`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="50 %% only, wanda and fw, tiny calibration")
    parser.add_argument("--settings", nargs="+", choices=list(settings), help="default: all (quick: 50%%)")
    parser.add_argument("--methods", nargs="+", choices=list(methods), help="default: all (quick: wanda fw)")
    parser.add_argument("--set", dest="extra", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                        help="passed to every run (e.g. calibration_samples=64)")  # fmt: skip
    parser.add_argument("--threads", type=thread_count, help="OMP/torch threads of each run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="every run's --seed: its calibration sample (default 0)")
    parser.add_argument("--out", type=out_folder, help=f"default: {out} (--quick: a folder in the system's temp dir)")
    parser.set_defaults(results_default=out)
    return parser


def sweep_defaults(
    args: argparse.Namespace,
    settings: tuple[Sequence[str], Sequence[str]],
    methods: tuple[Sequence[str], Sequence[str]],
    quick_extra: Sequence[str],
) -> argparse.Namespace:
    """Fills ``--settings`` and ``--methods`` with ``(all, quick)`` defaults and puts ``quick_extra``
    before the ``--set`` items under ``--quick``."""
    if args.settings is None:
        args.settings = list(settings[1] if args.quick else settings[0])
    if args.methods is None:
        args.methods = list(methods[1] if args.quick else methods[0])
    if args.quick:
        args.extra = [*quick_extra, *args.extra]
    args.out = results_dir(args.out, args.results_default, args.quick)
    return args


def results_dir(out: Path | None, default: Path, quick: bool) -> Path:
    """``--out`` if given; else the committed results folder ``default``, or for a ``--quick`` run a folder in
    the system's temp dir (a quick check never overwrites the committed results)."""
    if out is not None:
        return out
    return Path(tempfile.gettempdir()) / "constrainedsparse-benchmarks" / f"{default.name}-quick" if quick else default


def write_results(out: Path, markdown: str, payload: dict[str, Any]) -> None:
    """Writes ``results.md`` and ``results.json`` (indented, newline-terminated) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder for the runs, removed on exit, also when the benchmark is stopped by SIGTERM
    (``kill``, a job scheduler's time limit): the signal leaves as ``SystemExit(143)`` while the folder
    is open, so cleanups run (Python's default for SIGTERM ends the process where it stands)."""

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit) if main_thread else None
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            yield Path(folder)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[int]:
    """Runs the block with ``torch.set_num_threads(count)`` (as is if ``None``); yields the count in
    effect and restores the previous one on exit."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """What :func:`run_child` measured.

    Args:
        summary: The run's ``summary.json``.
        peak_rss_mb: The child's own peak resident memory (``os.wait4``), MB.
        wall_seconds: Seconds from the start of the process to its end (imports and model loading included).
    """

    summary: dict[str, Any]
    peak_rss_mb: float
    wall_seconds: float


class RunRefused(RuntimeError):
    """A run of :func:`run_child` refused its arguments (exit status 2, a user error).

    Args:
        message: What failed, as for any failed run.
        line: The run's own error message (its ``error:`` line without the prefix).
    """

    def __init__(self, message: str, line: str) -> None:
        super().__init__(message)
        self.line = line


def sweep_child(problem: str, args: Sequence[str], out: Path, threads: int | None = None) -> ChildRun:
    """:func:`run_child` for a sweep whose ``--set`` items every run takes: a refused run ends the benchmark
    as the parser would (its own error line, exit status 2, no traceback) before the next run starts."""
    try:
        return run_child(problem, args, out, threads)
    except RunRefused as err:
        usage_error(err.line)


def run_child(problem: str, args: Sequence[str], out: Path, threads: int | None = None) -> ChildRun:
    """Runs ``python -m constrainedsparse run PROBLEM ARGS`` in a child process, as a user types it.

    The run writes into ``out`` (``--wandb disabled --no-progress``) and its output into
    ``out.log`` next to it. Peak memory is the child's own (``os.wait4``), so every configuration is
    measured alone.

    Args:
        problem: A bundled problem name or a problem file.
        args: The run's options (``--formulation``, ``--sparsity``/``--pattern``, ``--set``, ...).
        out: The run directory.
        threads: ``OMP_NUM_THREADS`` of the child (``None``: torch's default).

    Raises:
        RuntimeError: If the run fails (the message holds the last line of its log).
        RunRefused: If the run refused its arguments (exit 2: a user error, e.g. an unknown ``--set`` key).
    """
    command = [sys.executable, "-m", "constrainedsparse", "run", problem, *args]
    command += ["--out", str(out), "--wandb", "disabled", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:  # wait4, not wait(): it returns this child's own resource usage (peak RSS).
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # stopped (Ctrl-C, SIGTERM): the run stops too, before its folder goes
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a run that ignores SIGTERM
                process.kill()
                process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        last = log_path.read_text().strip().splitlines()[-1:]
        message = f"{problem} {' '.join(args)} failed with exit code {process.returncode}: {last}"
        if process.returncode == 2 and last:  # the run refused its arguments: the user's error, in its own words
            raise RunRefused(message, last[0].removeprefix("error: "))
        raise RuntimeError(message)
    summary = json.loads((out / "summary.json").read_text())
    return ChildRun(summary, usage.ru_maxrss / 1024, wall)  # ru_maxrss: kilobytes on Linux
