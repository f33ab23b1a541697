"""``constrainedsparse`` command line: ``run``, ``formulations``, ``problems``, ``plot``.

Every bad input ends with one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from constrainedsparse import distributed
from constrainedsparse.engine import NonFiniteLossError, RunConfig, default_formulation, prepare, run
from constrainedsparse.formulations import describe_formulations
from constrainedsparse.layerwise import describe_solvers
from constrainedsparse.layerwise import run as layerwise_run
from constrainedsparse.logger import WANDB_MODES, plot_metrics
from constrainedsparse.spec import LayerwiseProblem, Problem, bundled_problems, load_problem

__all__ = ["main"]

LAYERWISE_SCORES = ("fidelity", "dense_perplexity", "perplexity")


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
        settings[key.strip()] = value.strip()
    return settings


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="constrainedsparse", description="Pruning as constrained optimization on Cooper.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("run", help="prune a problem with a formulation")
    p.add_argument("problem", nargs="?", default="digits-mlp", help="bundled name or path to a problem file")
    p.add_argument(
        "--formulation", help="formulation name (see `formulations`; default slr, or fw for layer-wise problems)"
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="fraction of zeros in [0, 1) (default 0.9)")
    target.add_argument("--pattern", help="N:M pattern along the input dimension, e.g. 2:4")
    p.add_argument("--epochs", type=int, help="pruning epochs (problem default)")
    p.add_argument("--pretrain-epochs", type=int, help="dense pre-training epochs (problem default; cached)")
    p.add_argument("--retrain-epochs", type=int, default=0, help="masked retraining epochs after hard pruning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="run directory (default runs/<problem>-<formulation>)")
    p.add_argument("--wandb", choices=WANDB_MODES, default="offline", help="wandb mode (default offline)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--nproc", type=int, help="train on N local processes (DDP through torch's elastic launcher)")
    sub.add_parser("formulations", help="list formulations")
    sub.add_parser("problems", help="list bundled problems")
    plot = sub.add_parser("plot", help="plot a metrics.jsonl to PNG")
    plot.add_argument("metrics", type=Path)
    plot.add_argument("--png", type=Path)
    return parser


def _print_summary(summary: dict) -> None:
    rows = [("problem", summary["problem"]), ("formulation", summary["formulation"])]
    rows.append(("target", summary.get("pattern", summary.get("target_sparsity"))))
    rows.append(("achieved sparsity", f"{summary['achieved_sparsity']:.4f}"))
    for key in ("dense_accuracy", "hardprune_accuracy", "retrain_accuracy"):
        if summary.get(key) is not None:
            rows.append((key.replace("_", " "), f"{100 * summary[key]:.2f} %"))
    for key in ("mean_layer_error", *LAYERWISE_SCORES):
        if summary.get(key) is not None:
            rows.append((key.replace("_", " "), f"{summary[key]:.4f}"))
    rows.append(("seconds", f"{summary['seconds']:.1f}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``constrainedsparse`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # `constrainedsparse [--flags]` means `constrainedsparse run [--flags]`
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "formulations":
            print("training (problems with data and a loss):")
            for name, text in describe_formulations().items():
                print(f"  {name:<12} {text}")
            print("layer-wise (pretrained models, calibration data):")
            for name, text in describe_solvers().items():
                print(f"  {name:<12} {text}")
        elif args.command == "problems":
            for name in bundled_problems():
                print(f"{name:<16} {load_problem(name).description}")
        elif args.command == "plot":
            if not args.metrics.is_file():
                _fail(f"metrics file {str(args.metrics)!r} does not exist")
            print(plot_metrics(args.metrics, args.png or args.metrics.with_suffix(".png")))
        else:
            problem = load_problem(args.problem)
            formulation = args.formulation or default_formulation(problem)
            out = args.out or Path("runs") / f"{Path(args.problem).stem}-{formulation}"
            config = RunConfig(
                problem=args.problem,
                formulation=formulation,
                sparsity=args.sparsity,
                pattern=args.pattern,
                epochs=args.epochs,
                pretrain_epochs=args.pretrain_epochs,
                retrain_epochs=args.retrain_epochs,
                seed=args.seed,
                out=out,
                wandb=args.wandb,
                settings=_parse_settings(args.settings),
                resume=args.resume,
                progress=not args.no_progress,
            )
            if args.nproc is not None and not os.environ.get(distributed.ENV_LAUNCHED):
                _check_nproc(args.nproc)
                if args.nproc > 1:
                    return _launch(args.nproc, config, problem, argv)
            summary = run(config, problem)
            if summary is not None and distributed.is_main_process():
                _print_summary(summary)
                weights = summary.get("saved_model", "model.safetensors")
                purged = ", purged.safetensors" if "purged_params" in summary else ""
                print(f"  wrote {out}/summary.json, metrics.jsonl, metrics.png, {weights}{purged}")
    except (ValueError, NonFiniteLossError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if distributed.env_world_size() > 1:
            distributed.report_error(message)
            raise SystemExit(2) from None
        _fail(message)
    except Exception as err:
        if distributed.env_world_size() > 1:
            if distributed.lost_peer(err):  # another rank failed first: its error is the one to report
                distributed.report_error(f"stopped after another rank failed ({type(err).__name__})", peer=True)
                raise SystemExit(1) from None
            distributed.report_error(f"{type(err).__name__}: {_first_line(err)}")
        raise  # a bug: the traceback follows
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_nproc(nproc: int) -> None:
    if nproc < 1:
        _fail(f"--nproc must be an integer >= 1, got {nproc}")
    if distributed.env_world_size() > 1:
        _fail("--nproc cannot be combined with torchrun (torchrun already started the processes)")


def _launch(nproc: int, config: RunConfig, problem: Problem | LayerwiseProblem, argv: list[str]) -> int:
    """``run --nproc N``: validates once here, then runs ``argv`` on N processes (see :func:`distributed.launch`)."""
    if isinstance(problem, LayerwiseProblem):  # bad input: one line and exit 2 before any process starts
        layerwise_run.prepare(config, problem)
    else:
        prepared = prepare(config, problem)
        distributed.check_global_batch(prepared.training["batch_size"], nproc)
    code, message = distributed.launch(nproc, ["-m", "constrainedsparse", *argv])
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
