"""``constrainedsparse`` command line: ``run``, ``formulations``, ``problems``, ``plot``, ``export``.

Every bad input ends with one ``error: ...`` line on stderr and exit code 2: the CLI turns a
:class:`~constrainedsparse.errors.UserInputError` (and a loss that stopped being finite) into that
line; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constrainedsparse import __version__, distributed, launcher
from constrainedsparse.catalog import describe
from constrainedsparse.config import HyperparameterInfo, describe_table
from constrainedsparse.errors import (
    NonFiniteLossError,
    Terminated,
    UserInputError,
    debugging,
    failed_pattern,
    first_line,
    user_input,
)
from constrainedsparse.export import COMPRESSED_DIR, EXPORT_FORMATS, export_compressed
from constrainedsparse.formulations import describe_formulations
from constrainedsparse.layerwise.base import describe_solvers
from constrainedsparse.logger import WANDB_MODES, parse_tags
from constrainedsparse.plots import check_png, metrics_rows, plot_metrics
from constrainedsparse.runconfig import WANDB_FIELDS
from constrainedsparse.runners import check_options, execute, runner_for, validate
from constrainedsparse.runs import CHECKPOINT, RunConfig, RunDirectory
from constrainedsparse.spec import DEBUG_ENV, LayerwiseProblem, Problem, bundled_problems, load_problem
from constrainedsparse.summary_text import print_summary

__all__ = ["main"]

DEFAULTS = {"problem": "digits-mlp", "retrain_epochs": 0, "seed": 0, "wandb": "offline"}
"""Defaults of the run flags that are ``None`` when not given (so that ``--resume`` can tell)."""
_RESOLVED_OUT: dict[str, Path] = {}
"""The run directory this process resolved (``--out`` or the default), for the Ctrl-C hint."""
_STARTED: dict[str, float] = {}
"""When :func:`main` started (an interrupt names a ``summary.json`` written since as this run's)."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parse_settings(items: Sequence[str]) -> dict[str, str]:
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--set expects KEY=VALUE, got {item!r}")
        settings[key.strip()] = value.strip()  # a key given again overrides (the last one wins)
    return settings


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="constrainedsparse", description="Pruning as constrained optimization on Cooper.")
    parser.add_argument("--version", action="version", version=f"constrainedsparse {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("run", help="prune a problem with a formulation")
    p.add_argument("problem", nargs="?", help="bundled name or path to a problem file (default digits-mlp)")
    p.add_argument(
        "--formulation", help="formulation name (see `formulations`; default slr, or fw for layer-wise problems)"
    )
    p.add_argument("--sparsity", type=float, help="fraction of zeros in [0, 1) (default 0.9; 0.5 layer-wise)")
    p.add_argument(
        "--pattern",
        help="unstructured (default), row, N:M (e.g. 2:4: its own level), structured:rows, structured:columns, "
        "block:RxC",
    )
    p.add_argument("--epochs", type=int, help="pruning epochs (problem default)")
    p.add_argument("--pretrain-epochs", type=int, help="dense pre-training epochs (problem default; cached)")
    p.add_argument("--retrain-epochs", type=int, help="masked retraining epochs after hard pruning (default 0)")
    p.add_argument("--seed", type=int, help="seed of everything random (default 0)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<problem>-<formulation>)")
    p.add_argument("--wandb", choices=WANDB_MODES, help="wandb mode (default $WANDB_MODE, else offline)")
    p.add_argument("--wandb-project", help="wandb project (default $WANDB_PROJECT or constrainedsparse)")
    p.add_argument("--wandb-name", help="wandb run name (default $WANDB_NAME, else the --out folder's name)")
    p.add_argument("--wandb-tags", help="comma-separated wandb tags (default $WANDB_TAGS)")
    p.add_argument("--verbose", action="store_true", help="print the per-layer table (also in OUT/layers.csv)")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter, training setting or problem option (repeatable; --set help lists every key)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in OUT with its stored options")
    p.add_argument("--overwrite", action="store_true", help="replace the run in OUT (its files are removed)")
    p.add_argument("--no-progress", action="store_true", help="hide progress (bars and per-epoch lines)")
    p.add_argument(
        "--nproc",
        type=int,
        help="run on N local processes through torch's elastic launcher (DDP training; layer-wise: calibration "
        "split, layers dealt out)",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error in a problem file")
    listing = sub.add_parser("formulations", help="list formulations, or describe one")
    listing.add_argument("name", nargs="?", help="a formulation or layer-wise solver: list its hyperparameters")
    sub.add_parser("problems", help="list bundled problems")
    add_export_command(sub)
    plot = sub.add_parser("plot", help="plot a metrics.jsonl (or a run directory's) to PNG")
    plot.add_argument("metrics", type=Path, help="a metrics.jsonl, or a run directory holding one")
    plot.add_argument("--png", type=Path, help="the PNG to write (default metrics.png beside the metrics file)")
    return parser


def _given(args: argparse.Namespace, settings: dict[str, str]) -> dict[str, Any]:
    """The run options given on the command line (a flag left out is absent)."""
    fields = ("problem", "formulation", "sparsity", "pattern", "epochs", "pretrain_epochs", "retrain_epochs", "seed")
    given = {key: getattr(args, key) for key in (*fields, *WANDB_FIELDS) if getattr(args, key) is not None}
    if args.wandb_tags is not None:
        given["wandb_tags"] = parse_tags(args.wandb_tags)
    if settings:
        given["settings"] = settings
    return given


def _default_wandb_mode() -> str:
    """``--wandb`` when it is not given: ``$WANDB_MODE`` if set (one of the modes, or wandb's ``dryrun`` and ``run``
    for ``offline`` and ``online``), else ``offline``.

    Raises:
        UserInputError: For a ``$WANDB_MODE`` that is none of the modes.
    """
    mode = os.environ.get("WANDB_MODE") or DEFAULTS["wandb"]
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's older names of the modes
    if mode not in WANDB_MODES:
        raise UserInputError(
            f"$WANDB_MODE is {mode!r}, none of the --wandb modes ({', '.join(WANDB_MODES)}): set one, or give --wandb"
        )
    return mode


def _run_config(args: argparse.Namespace) -> tuple[RunConfig, Problem | LayerwiseProblem]:
    """The configuration of ``run``: from the flags, or (``--resume``) from the checkpoint plus the flags."""
    settings = _parse_settings(args.settings)
    given = _given(args, settings)
    common = {"progress": not args.no_progress, "overwrite": args.overwrite}
    if args.resume:
        if args.overwrite:
            raise UserInputError("give either --resume or --overwrite, not both")
        problem = load_problem(args.problem) if args.problem is not None else None
        named = args.formulation or default_formulation(problem or load_problem(DEFAULTS["problem"]))
        default_out = Path("runs") / f"{Path(args.problem or DEFAULTS['problem']).stem}-{named}"
        config = RunConfig.resumed(args.out or default_out, given, check_options)
        config = RunConfig(**{**config.__dict__, **common})
        return config, problem if problem is not None else load_problem(config.problem)
    problem = load_problem(args.problem or DEFAULTS["problem"])
    formulation = args.formulation or default_formulation(problem)
    out = (
        args.out
        if args.out is not None
        else Path("runs") / f"{Path(args.problem or DEFAULTS['problem']).stem}-{formulation}"
    )
    if "wandb" not in given:
        given["wandb"] = _default_wandb_mode()
    values = {**DEFAULTS, **given, "formulation": formulation, "settings": settings}
    return RunConfig(**values, out=out, **common), problem


def default_formulation(problem: Problem | LayerwiseProblem) -> str:
    """The formulation a run uses when none is named: ``slr`` for training problems, ``fw`` for layer-wise ones."""
    return "fw" if isinstance(problem, LayerwiseProblem) else "slr"


def _settings_help(config: RunConfig, problem: Problem | LayerwiseProblem) -> None:
    """``--set help``: every key this formulation and problem accept."""
    runner = runner_for(problem)
    kind = "layerwise" if isinstance(problem, LayerwiseProblem) else "training"
    with user_input():  # a solver named for a training problem (or the reverse): one line, as run says it
        print(describe(config.formulation, kind))
    runner_keys = runner.settings.keys()
    if isinstance(problem, Problem):  # lr, dual_lr, batch_size: the problem's own defaults
        runner_keys = {
            key: dataclasses.replace(info, default=getattr(problem, key)) if hasattr(problem, key) else info
            for key, info in runner_keys.items()
        }
    print("runner (--set):")
    print(describe_table(list(runner_keys.values())))
    print(f"problem {problem.name!r} options (--set):")
    rows = [HyperparameterInfo(k, type(v), v, problem.option_help.get(k, "problem option"))
            for k, v in problem.options.items()]  # fmt: skip
    print(describe_table(rows))


def _command_run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    if "help" in args.settings:
        config, problem = _run_config(argparse.Namespace(**{**vars(args), "settings": []}))  # --resume: the run's
        _settings_help(config, problem)
        return 0
    config, problem = _run_config(args)
    _RESOLVED_OUT["run"] = Path(config.out)
    launcher.die_with_launcher()  # a rank that --nproc started: stopped if the launcher is killed
    if args.nproc is not None and not os.environ.get(distributed.ENV_LAUNCHED):
        _check_nproc(args.nproc)
        if args.nproc > 1:
            return _launch(args.nproc, config, problem, argv)
    summary = execute(config, problem)
    if summary is not None and distributed.is_main_process():
        print_summary(summary, Path(config.out), args.verbose)
    return 0


def _command_formulations(args: argparse.Namespace) -> int:
    if args.name is not None:
        with user_input():
            print(describe(args.name))
        return 0
    print("training (problems with data and a loss):")
    for name, text in describe_formulations().items():
        print(f"  {name:<12} {text}")
    print("layer-wise (pretrained models, calibration data):")
    for name, text in describe_solvers().items():
        print(f"  {name:<12} {text}")
    return 0


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "formulations":
        return _command_formulations(args)
    if args.command == "problems":
        for name in bundled_problems():
            print(f"{name:<16} {load_problem(name).description}")
        return 0
    if args.command == "export":
        with user_input():
            export_command(args)
        return 0
    if args.command == "plot":
        with user_input():
            path, rows = metrics_rows(args.metrics)
        png = args.png or path.with_suffix(".png")
        with user_input("--png "):
            check_png(png)
        print(plot_metrics(path, png, rows))
        return 0
    return _command_run(args, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``constrainedsparse`` console script.

    What one call sets for itself (``--debug``'s environment variable, the run folder an interrupt names) is
    undone when it returns: a notebook's or a test session's later calls are not in debug mode.
    """
    debug = os.environ.get(DEBUG_ENV)
    _RESOLVED_OUT.clear()
    try:
        return _main(argv)
    finally:
        if debug is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = debug


def _main(argv: Sequence[str] | None) -> int:
    _STARTED["main"] = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]  # `constrainedsparse [--flags]` means `constrainedsparse run [--flags]`
    args = _build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(), _sigterm_interrupts(getattr(args, "nproc", 1)):  # restored at the end
            warnings.showwarning = _show_warning
            return _dispatch(args, argv)
    except (UserInputError, NonFiniteLossError) as err:
        message = first_line(err)
        if isinstance(err, UserInputError) and "checkpoint" not in message:  # unless the line says it already
            message += _kept_checkpoint(getattr(args, "out", None) or _RESOLVED_OUT.get("run"))
        if distributed.env_world_size() > 1:
            launcher.report_error(message, code=2)
            raise SystemExit(2) from None
        _fail(message)
    except KeyboardInterrupt as stop:
        if debugging():
            raise
        code, what = (143, "terminated") if isinstance(stop, Terminated) else (130, "interrupted")
        if not _speaks_for_the_run():
            return code  # the launcher (or rank 0 under torchrun) says it once
        print(f"{what}{_resume_hint(getattr(args, 'out', None) or _RESOLVED_OUT.get('run'))}", file=sys.stderr)
        return code  # the shell's code for SIGINT (130) or SIGTERM (143)
    except BrokenPipeError:  # the reader went away (`| head`): quiet, with the shell's code for SIGPIPE, as cat
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        if err.errno not in _REFUSED_BY_THE_SYSTEM or debugging():
            raise  # a bug of ours: the traceback follows
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror} (the file system refused it)")
    except Exception as err:
        pattern_line = None if debugging() else failed_pattern(err)
        if pattern_line is not None:  # a pattern of the user's raised: one line, as a solver of theirs gets
            if distributed.env_world_size() > 1:
                launcher.report_error(pattern_line, code=2)
                raise SystemExit(2) from None
            _fail(pattern_line)
        if distributed.env_world_size() > 1:
            if launcher.lost_peer(err):  # another rank failed first: its error is the one to report
                launcher.report_error(f"stopped after another rank failed ({type(err).__name__})", peer=True)
                raise SystemExit(1) from None
            launcher.report_error(f"{type(err).__name__}: {first_line(err)}")
        raise  # a bug: the traceback follows
    return 0


_REFUSED_BY_THE_SYSTEM = {errno.ENOSPC, errno.ENAMETOOLONG, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}
"""What a path or a disk refuses (full, read-only, a name too long): the user's environment, one line, exit 2."""


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A warning during a command: one ``warning: ...`` line on stderr, as errors are one ``error: ...`` line."""
    print(f"warning: {message}", file=sys.stderr)


def _speaks_for_the_run() -> bool:
    """Whether this process reports an interrupt: not a rank that ``--nproc`` started, not rank > 0 under torchrun."""
    return not os.environ.get(distributed.ENV_LAUNCHED) and distributed.rank() == 0


@contextlib.contextmanager
def _sigterm_interrupts(nproc: Any) -> Any:
    """Within: SIGTERM raises :class:`Terminated` (main thread of a single process only: under torchrun or
    ``--nproc N`` the launcher owns the signals); the previous handler is restored on exit (tests call main)."""
    launched = distributed.env_world_size() > 1 or nproc not in (None, 1)
    if launched or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resume_hint(out: Any) -> str:
    """What to do after an interrupt: nothing if the run had finished, resume if a checkpoint was written, else run
    again (nothing was kept)."""
    if not out:
        return ""
    summary = Path(out) / "summary.json"
    if summary.is_file() and summary.stat().st_mtime >= _STARTED.get("main", float("inf")):  # this run's, not a
        return f" after the run had finished: its results are in {out} (summary.json)"  # replaced run's
    if (Path(out) / CHECKPOINT).is_file():
        return f"; continue from the last checkpoint with --resume --out {shlex.quote(str(out))}"
    return " before the first checkpoint: nothing to resume, start the run again"


def _kept_checkpoint(out: Any) -> str:
    """After an error in the middle of a run (the user's code failing at epoch 3): that the checkpoint this command
    wrote is kept and how to go on from it; nothing where it wrote none (an error before the first checkpoint, or
    a refused option, whatever an earlier command left there)."""
    checkpoint = Path(out) / CHECKPOINT if out else None
    try:
        if checkpoint is None or checkpoint.stat().st_mtime < _STARTED.get("main", math.inf):
            return ""
    except OSError:  # none there (or a path the system refuses)
        return ""
    return f" (the last checkpoint is kept: once that is fixed, continue with --resume --out {shlex.quote(str(out))})"


def _check_nproc(nproc: int) -> None:
    if nproc < 1:
        _fail(f"--nproc must be an integer >= 1, got {nproc}")
    if distributed.env_world_size() > 1:
        _fail("--nproc cannot be combined with torchrun (torchrun already started the processes)")


def _launch(nproc: int, config: RunConfig, problem: Problem | LayerwiseProblem, argv: list[str]) -> int:
    """``run --nproc N``: validates once here, then runs ``argv`` on N processes (see :func:`launcher.launch`)."""
    validate(config, problem, nproc)  # bad input: one line and exit 2 before any process starts
    directory = RunDirectory(config.out)
    directory.mark_created()  # a failed or interrupted job leaves no directory it made
    try:
        code, message = launcher.launch(nproc, ["-m", "constrainedsparse", *argv])
    except BaseException:
        directory.discard_if_unused()
        raise
    if code != 0:
        directory.discard_if_unused()  # rank 0 may have been stopped before it could clean up
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
    return code


def add_export_command(subparsers: Any) -> None:
    """Adds ``export SOURCE [--format compressed] [--to DIR]`` to the CLI's subparsers."""
    parser = subparsers.add_parser("export", help="write a pruned model in a deployable format")
    parser.add_argument(
        "run_dir",
        type=Path,
        metavar="SOURCE",
        help="a finished layer-wise run directory (with model/), or a saved transformers model folder (with --to)",
    )
    parser.add_argument(
        "--format",
        dest="export_format",
        choices=EXPORT_FORMATS,
        default="compressed",
        help="compressed: a compressed-tensors checkpoint (sparse-24-bitmask for 2:4, sparse-bitmask otherwise)",
    )
    parser.add_argument("--to", type=Path, help=f"output folder (default RUN_DIR/{COMPRESSED_DIR} for a run)")


def export_command(args: Any) -> None:
    """Runs a parsed ``export`` command and prints its size report (``ValueError`` on bad input)."""
    report = export_compressed(args.run_dir, args.to)
    rows = [
        ("format", report["format"] + (f" ({report['format_note']})" if report.get("format_note") else "")),
        ("pruned layers", f"{len(report['layers'])}"),
        ("pruned bytes", f"{report['pruned_compressed_bytes']:,} of {report['pruned_dense_bytes']:,} dense "
                         f"({report['pruned_ratio']:.3f}x)"),
        ("safetensors bytes", f"{report['compressed_safetensors_bytes']:,} vs dense "
                              f"{report['dense_safetensors_bytes']:,} ({report['safetensors_ratio']:.3f}x)"),
        ("folder bytes", f"{report['compressed_folder_bytes']:,} (with configuration and tokenizer files)"),
        ("load with", "constrainedsparse.export.load_compressed_model(folder) (transformers' from_pretrained does "
                      "not decompress it: its weights would be random)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    written = sorted(path.name for path in Path(report["folder"]).iterdir())
    print(f"  wrote {report['folder']}/ ({', '.join(written)})")


if __name__ == "__main__":
    sys.exit(main())
