"""Dual-dynamics logging: one logger writes ``metrics.jsonl`` and a wandb run with the same keys.

Key scheme (``/`` separates a family from its member):

* ``loss/train``, ``accuracy/test``, ``accuracy/hardprune``, ``accuracy/hardprune_now`` — objective
  and metrics;
* ``multiplier/<constraint>``, ``violation/<constraint>`` — dual dynamics of user and density
  constraints (with several entries: an inequality's largest entry, an equality's norm, the multipliers' norm);
* formulation families: ``condition/*``, ``stepsize/*``, ``lagrangian/*``, ``penalty/rho``,
  ``coordination/k``, ``dual/*``, ``residual|lambda|offsupport/<param>`` (slr/admm);
  ``l0/*``, ``l0_density/<param>``, ``restart/<constraint>`` (l0);
* ``density/<param>``, ``sparsity/achieved`` — what the pruned model looks like;
* ``phase``, ``epoch`` — where in the run a row was logged (phase 0 = prune, 1 = retrain).

:func:`constrainedsparse.plots.plot_metrics` turns a ``metrics.jsonl`` into a PNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from constrainedsparse.errors import UserInputError, first_line, is_integer

__all__ = [
    "DEFAULT_PROJECT",
    "WANDB_MODES",
    "MetricsLogger",
    "NullLogger",
    "WandbMode",
    "WandbNames",
    "finish_summary",
    "metrics_file",
    "parse_tags",
    "read_metrics",
    "wandb_names",
]

WandbMode = Literal["disabled", "offline", "online"]
"""Where a run's wandb copy goes: nowhere, an offline folder, or the wandb server."""
WANDB_MODES: tuple[WandbMode, ...] = get_args(WandbMode)
DEFAULT_PROJECT = "constrainedsparse"


def _as_numpy(values: Any) -> Any:
    """The values as a 1-D float64 array: numpy cannot cut the range of float32 values a few ulps apart into
    wandb's 64 bins (``Too many bins for data range``), and gate probabilities that barely differ are such values."""
    detach = getattr(values, "detach", None)
    if detach is not None:
        return detach().cpu().reshape(-1).double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def parse_tags(text: str) -> tuple[str, ...]:
    """Comma-separated tags (``--wandb-tags a, b``, ``$WANDB_TAGS``) as ``("a", "b")``, empty items dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


WandbNames = tuple[str, str | None, tuple[str, ...]]
"""A wandb run's project, name (``None``: not given) and tags."""


def wandb_names(project: str | None, name: str | None, tags: tuple[str, ...]) -> WandbNames:
    """The wandb project, run name and tags a run uses: the given ones, else ``$WANDB_PROJECT`` (else
    :data:`DEFAULT_PROJECT`), ``$WANDB_NAME`` (else ``None``: a new run is named after its folder, see
    :func:`_open_wandb`) and ``$WANDB_TAGS``. Checkpoints keep them resolved, so that a resumed run
    continues in the same project whatever its environment."""
    return (
        project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        name or os.environ.get("WANDB_NAME") or None,
        tuple(tags) or parse_tags(os.environ.get("WANDB_TAGS", "")),
    )


@contextlib.contextmanager
def _unset_if_empty(key: str) -> Iterator[None]:
    """Within: ``$key`` unset if it is set to the empty text (restored after)."""
    empty = os.environ.get(key) == ""
    if empty:
        del os.environ[key]
    try:
        yield
    finally:
        if empty:
            os.environ[key] = ""


def _open_wandb(
    mode: str,
    names: WandbNames,
    out_dir: Path,
    config: Mapping[str, Any] | None,
    run_id: str | None,
) -> Any:
    """``wandb.init`` of the run (continued when ``run_id`` is given); what wandb refuses is one line.

    Raises:
        UserInputError: When wandb refuses the run (no login, no connection, a project or tag it does not allow).
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    project, name, tags = names
    if name is None and run_id is None:  # as transformers' Trainer names a run after output_dir: runs/digits-mlp-slr
        name = out_dir.resolve().name  # is digits-mlp-slr in wandb's list; a resumed one keeps the name it has there
    yours = wandb.run  # a run the caller has open: it stays open and active beside this one
    try:
        with _unset_if_empty("WANDB_MODE"):  # empty is unset to the CLI; wandb would refuse the text ''
            return wandb.init(
                project=project, name=name, tags=list(tags) or None, dir=str(out_dir), mode=mode,
                config=dict(config or {}), id=run_id, resume="allow" if run_id else None, reinit="create_new",
            )  # fmt: skip
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError, wandb.errors.CommError) as err:
        hint = " (or use --wandb offline)" if mode == "online" else ""
        raise UserInputError(f"--wandb {mode}: {first_line(err)}{hint}") from None
    except ValueError as err:
        if type(err).__module__.split(".")[0] != "pydantic_core":  # wandb's settings refused a value (a tag)
            raise
        message = err.errors()[0].get("msg", first_line(err)).removeprefix("Value error, ")  # type: ignore[attr-defined]
        raise UserInputError(f"--wandb {mode}: {message}") from None
    except BaseException:  # Ctrl-C inside init: stop wandb's writers before the run directory is removed
        started = wandb.run
        try:
            if started is not None and started is not yours:  # a run init had started
                started.finish()
        finally:
            if yours is None:  # the service is the caller's too while their run is open
                wandb.teardown()
        raise


class MetricsLogger:
    """Writes every logged row to ``metrics.jsonl`` and, unless disabled, to wandb.

    Args:
        out_dir: Run directory, a ``str`` or a ``Path`` (``metrics.jsonl`` and ``wandb/`` go there; created if
            missing).
        wandb_mode: ``disabled``, ``offline`` or ``online``.
        config: Run configuration sent to wandb.
        run_id: wandb run id to resume (kept in checkpoints).
        resume_step: On resume, rows with ``step > resume_step`` are dropped from the JSONL
            so the file holds each step once.
        logged_step: On resume, the last step the file held when the checkpoint was saved
            (:attr:`last_step` then). If the file now ends elsewhere (deleted, shortened by hand),
            a warning names the steps that will be missing from it and from the plot.
        project: wandb project (``None``: ``$WANDB_PROJECT``, else ``constrainedsparse``).
        name: wandb run name (``None``: ``$WANDB_NAME``, else ``out_dir``'s name for a new run).
        tags: wandb run tags (empty: ``$WANDB_TAGS``, comma-separated, if set).

    Raises:
        ValueError: For a ``wandb_mode`` that is none of the three (nothing is written then).
        UserInputError: When wandb refuses the run (``online`` without a login, no connection), in one line.

    Warns:
        UserWarning: On resume, when ``metrics.jsonl`` no longer ends at ``logged_step``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        wandb_mode: WandbMode = "disabled",
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        resume_step: int | None = None,
        logged_step: int | None = None,
        project: str | None = None,
        name: str | None = None,
        tags: tuple[str, ...] = (),
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {', '.join(WANDB_MODES)}, got {wandb_mode!r}")
        out_dir = Path(out_dir)
        self.path = out_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            text = _read_text(self.path)
            rows = _parse_rows(self.path, text, torn_last=True)  # a torn last row goes; the missing-rows check warns
            kept = [row for row in rows if row["step"] <= resume_step]
            kept_text = "".join(json.dumps(row) + "\n" for row in kept)
            if text != kept_text:  # the rows after the checkpoint go, and the offsets below hold
                self.path.write_text(kept_text)
        else:
            self.path.write_text("")
        self._file = self.path.open("r+")
        self._file.seek(0, os.SEEK_END)
        # The last written row stays open: rows logged at the same step merge into it, as in wandb.
        self._last_step: int | None = None
        self._max_step = -1  # the highest step logged, histograms included (rows before it are refused)
        self._last_row: dict[str, Any] = {}
        self._last_offset = self._file.tell()
        if kept:  # the file is exactly their serialisation (ASCII: characters are bytes)
            self._last_row = kept[-1]
            self._last_step = self._max_step = kept[-1]["step"]
            self._last_offset -= len(json.dumps(kept[-1]) + "\n")
        if logged_step is not None and self._last_step != logged_step:
            _warn_missing_rows(self.path, self._last_step, logged_step)
        self.run = None
        if wandb_mode != "disabled":
            try:
                self.run = _open_wandb(wandb_mode, wandb_names(project, name, tags), out_dir, config, run_id)
            except BaseException:
                self._file.close()
                raise

    @property
    def last_step(self) -> int | None:
        """The step of the last row written (``None`` before the first)."""
        return self._last_step

    @property
    def run_id(self) -> str | None:
        """The wandb run id (``None`` when disabled)."""
        return self.run.id if self.run is not None else None

    def where(self) -> str | None:
        """Where the wandb run went: its offline folder and the ``wandb sync`` command, or its URL."""
        if self.run is None:
            return None
        if self.run.settings.mode == "offline":
            # A resumed offline run goes on in a folder of its own (same id; "-1" appended when started in the
            # same second): name them all, in order.
            folder, run_id = Path(self.run.dir).parent, self.run.id
            found = [*folder.parent.glob(f"offline-run-*-{run_id}"), *folder.parent.glob(f"offline-run-*-{run_id}-*")]
            folders = " ".join(shlex.quote(str(f)) for f in sorted(set(found))) or shlex.quote(str(folder))
            return f"wandb offline run {folders} (upload it: wandb sync {folders})"  # quoted: a command to paste
        return f"wandb run {self.run.url}"

    def set_summary(self, summary: Mapping[str, Any]) -> None:
        """Puts a run's final figures into the wandb run's summary (the same keys as ``summary.json``)."""
        if self.run is not None:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs ``metrics`` at ``step``; non-finite values are written as ``null`` in JSON.

        Rows logged at the same step merge into one JSONL object (later keys win), matching the
        one history row wandb keeps per step.

        Raises:
            ValueError: For a step that is not an integer >= 0, or below a step logged already.
        """
        self._check_step(step)
        row = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        if step == self._last_step:
            row = {**self._last_row, **row}
            self._file.seek(self._last_offset)
            self._file.truncate()
        else:
            self._last_offset = self._file.tell()
        row = {**row, "step": step}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._last_step, self._last_row = step, row
        self._max_step = max(self._max_step, step)
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def _check_step(self, step: int) -> None:
        """Refuses a step that is not an integer >= 0 or is before one logged already (wandb drops such rows,
        saying so only in its debug log)."""
        if not is_integer(step) or step < 0:
            raise ValueError(f"log step must be an integer >= 0, got {step!r}")
        if step < self._max_step:
            raise ValueError(
                f"log step {step} is before step {self._max_step}, logged already: steps must not decrease (wandb "
                f"would drop the row); log at step >= {self._max_step}"
            )

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        """Sends ``{key: 1-D array of values}`` to wandb as histograms at ``step`` (wandb only).

        The JSONL keeps scalar summaries instead (a formulation logs those next to the histograms).

        Raises:
            ValueError: For a step that is not an integer >= 0, or below a step logged already.
        """
        self._check_step(step)
        if self.run is None or not values:
            return
        self._max_step = max(self._max_step, step)
        import wandb

        self.run.log({key: wandb.Histogram(_as_numpy(v)) for key, v in values.items()}, step=step)

    def close(self) -> None:
        """Flushes and closes the JSONL file and finishes the wandb run (again: nothing)."""
        self._file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        """Closes the logger also when the loop inside raised: its file closed, its wandb run finished (as failed,
        exit code 1, when the loop raised)."""
        if error_type is not None and self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None
        self.close()


class NullLogger:
    """A logger that records nothing: what ranks other than 0 log to (they create no files)."""

    run_id = None
    last_step = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Drops ``metrics``."""

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        """Drops ``values``."""

    def where(self) -> None:
        """No run."""

    def set_summary(self, summary: Mapping[str, Any]) -> None:
        """Drops ``summary``."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Nothing to close."""


def _warn_missing_rows(path: Path, held: int | None, logged: int) -> None:
    """Warns that a resumed ``metrics.jsonl`` lost rows the checkpoint's run had logged."""
    now = "is empty" if held is None else f"ends at step {held}"
    warnings.warn(
        f"{path} {now}, but it held rows up to step {logged} when the checkpoint was saved (deleted or "
        f"shortened since?): the steps in between stay missing from it and from metrics.png; wandb keeps its own",
        stacklevel=3,
    )


def finish_summary(logger: MetricsLogger | NullLogger, summary: dict[str, Any]) -> None:
    """Puts ``summary`` into the wandb run's summary, then adds where that run went (``wandb_run``) to it."""
    logger.set_summary(summary)
    where = logger.where()
    if where is not None:
        summary["wandb_run"] = where


def metrics_file(path: str | os.PathLike[str]) -> Path:
    """The ``metrics.jsonl`` that ``path`` names: ``path`` itself, or the one inside it for a run directory."""
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl``, one dict per logged step (``step`` and the metrics logged at it).

    Args:
        path: The ``metrics.jsonl`` file, or the run directory holding it (a ``str`` or a ``Path``).

    Returns:
        The rows in file order.

    Raises:
        ValueError: For a path that is no ``str``/path, names no file, or a line that is not JSON (the file and
            line named).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"read_metrics: path must be a metrics.jsonl or a run folder (str or Path), got {path!r}")
    file = metrics_file(path)
    if not file.is_file():
        raise ValueError(f"metrics file {str(file)!r} does not exist")
    return _parse_rows(file, _read_text(file))


def _not_metrics(file: Path) -> str:
    return f"{str(file)!r} is not a metrics.jsonl written by a run"


def _read_text(file: Path) -> str:
    """The text of a metrics file.

    Raises:
        ValueError: For bytes that are not text (the file named).
    """
    try:
        return file.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{_not_metrics(file)} (not text: {first_line(err)})") from None


def _parse_rows(file: Path, text: str, torn_last: bool = False) -> list[dict[str, Any]]:
    """The rows of ``file``'s ``text``; with ``torn_last`` a last line cut short is left out (a resumed run's file,
    whose last write a crash or a full disk may have cut).

    Raises:
        ValueError: For a line that is not JSON (the file and line named).
    """
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if torn_last and number == len(lines):
                break
            raise ValueError(f"{_not_metrics(file)} (line {number}: {first_line(err)})") from None
    return rows
