"""The run scaffold both runners share: one configuration, one run directory, one resume rule.

A run is ``validate → claim the directory → (resume) → execute → summary → plot``
(:func:`constrainedsparse.runners.run`). The two runners (:mod:`constrainedsparse.engine` for
problems that train, :mod:`constrainedsparse.layerwise.runner` for pretrained models pruned layer
by layer) supply only ``prepare`` (validate, nothing written) and ``execute`` (the work) and use
the pieces here for everything that touches the run directory.

**The run directory** (``--out``) belongs to one run:

* a directory that holds anything is refused unless the run resumes (``--resume``) or replaces it
  (``--overwrite``, which removes the files a run writes and nothing else);
* an advisory lock (``fcntl.flock`` on ``OUT/.lock``) is held for the whole run: a second run into
  a busy directory is refused with the holder's pid; the OS drops the lock of a killed run, so a
  ``--resume`` after a crash is never blocked;
* nothing in an existing directory is touched before the run has decided it may use it;
* a run that fails before its first checkpoint removes the directory it created.

**Resume.** Every checkpoint stores the run's configuration. ``RunConfig.resumed(out, given)``
(:mod:`constrainedsparse.runconfig`) rebuilds it from ``OUT/checkpoint.pt``; options given again must
match, and a mismatch names the differing keys.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from constrainedsparse import distributed
from constrainedsparse.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint, writable
from constrainedsparse.errors import UserInputError
from constrainedsparse.logger import MetricsLogger, NullLogger
from constrainedsparse.plots import plot_metrics, run_title
from constrainedsparse.runconfig import (  # noqa: F401  (importable from here as before the split)
    CHECKPOINT,
    IDENTITY_FIELDS,
    VOLATILE_SETTINGS,
    RunConfig,
    finished_error,
    setting_text,
    settings_text,
)

# RunConfig, CHECKPOINT and settings_text live in runconfig (the configuration and its resume rule); they stay
# importable from here, where the run scaffold's users look for them.

__all__ = ["CHECKPOINT", "RUN_FILES", "RunConfig", "RunDirectory", "environment", "open_logger", "settings_text"]

LOCK = ".lock"
RUN_FILES = (
    CHECKPOINT,
    "summary.json",
    "metrics.jsonl",
    "metrics.png",
    "layers.csv",
    "model.safetensors",
    "purged.safetensors",
    "model",
    "compressed",
    "blocks",
    "wandb",
)
"""What a run writes into its directory (``--overwrite`` removes these and nothing else)."""


def environment() -> dict[str, Any]:
    """What a summary records of the software, the CPU threads per process and the processes a run used
    (``versions``, ``threads``, ``processes``): with ``seed`` and ``effective_settings`` what reproduces it."""
    from constrainedsparse import __version__

    versions = {"constrainedsparse": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("cooper-optim", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"versions": versions, "threads": torch.get_num_threads(), "processes": distributed.world_size()}


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _held(lock: Path) -> bool:
    """Whether another process holds ``lock`` now (a lock file left by a killed run is not held)."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock if it was taken
    return False


def _describe_holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


class RunDirectory:
    """One run's directory: the decision to use it, its lock, its checkpoint and its final files.

    Args:
        out: The directory (created by :meth:`claim` if missing).
        resume: The run continues from ``out/checkpoint.pt``.
        overwrite: The run replaces the files of a previous run in ``out``.
        keywords: Messages name ``out=`` and ``overwrite=True`` (Python callers) instead of the flags.
    """

    def __init__(
        self, out: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False, keywords: bool = False
    ) -> None:
        self.out = Path(out)
        self.resume = resume
        self.overwrite = overwrite
        # How messages name the folder and the way to replace it: CLI flags, or Python keywords (prune_layerwise).
        self._out, self._overwrite = ("out=", "overwrite=True") if keywords else ("--out ", "--overwrite")
        self.created = False
        self._created_parents: list[Path] = []
        self._lock_fd: int | None = None

    @property
    def checkpoint_path(self) -> Path:
        """``out/checkpoint.pt``."""
        return self.out / CHECKPOINT

    def check(self) -> None:
        """Decides whether the run may use the directory, touching nothing.

        Raises:
            UserInputError: For an unusable path (a file, under a file, not writable, the empty
                path), a non-empty directory without ``--resume``/``--overwrite``, ``--resume``
                without a checkpoint or of a finished run (``summary.json``), or both flags.
        """
        out = self.out
        if str(out) in ("", "."):
            raise UserInputError("--out must name a run directory, got the current directory")
        if self.resume and self.overwrite:
            raise UserInputError("give either --resume or --overwrite, not both")
        limit = _name_max(next((p for p in out.parents if _exists(p)), Path(".")))
        long = next((part for part in out.parts if len(part.encode()) > limit), None)
        if long is not None:
            raise UserInputError(
                f"{self._out}{out}: the name {long[:24]!r}... is longer than the filesystem allows ({limit})"
            )
        if out.exists() and not out.is_dir():
            raise UserInputError(f"{self._out}{out} is a file, not a directory")
        parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
        if not parent.is_dir():
            raise UserInputError(f"{self._out}{out}: {parent} is a file, not a directory")
        if not writable(parent, probe=parent != out):
            raise UserInputError(f"{self._out}{out}: {parent} is not writable")
        if _held(out / LOCK):
            raise self._busy(out / LOCK)
        if self.resume:
            if not self.checkpoint_path.exists():
                raise UserInputError(f"--resume needs {self.checkpoint_path}, which does not exist")
            if (out / "summary.json").is_file():
                raise finished_error(out, self._overwrite)
            return
        held = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
        if held and not self.overwrite:
            what, resume = f"other files ({', '.join(held[:3])})", ""
            if "summary.json" in held:
                what = "a finished run"
            elif CHECKPOINT in held:
                what, resume = "a run", "continue it with --resume, " if self._out == "--out " else ""
            elif any(name in RUN_FILES for name in held):
                what = "a run stopped before its first checkpoint (nothing to resume)"
            raise UserInputError(
                f"{self._out}{out} already holds {what}; {resume}replace the run's files with {self._overwrite} "
                "(other files stay), or choose another folder"
            )

    def _busy(self, lock: Path) -> UserInputError:
        return UserInputError(
            f"{self._out}{self.out} is in use by another run ({_describe_holder(lock)}); wait for it or choose "
            "another folder"
        )

    def mark_created(self) -> None:
        """Notes what of ``out`` and its parents does not exist yet: what :meth:`discard_if_unused` may remove
        (the parents innermost first, each only if empty then)."""
        self.created = not self.out.exists()
        self._created_parents = [p for p in self.out.absolute().parents if not p.exists()]

    def claim(self) -> None:
        """Creates the directory if needed, takes its lock, and clears what must go before the run.

        Rank 0 only (other ranks never write). Removes orphan temporary files of a killed write
        and, with ``overwrite``, the previous run's files (:data:`RUN_FILES`).

        Raises:
            UserInputError: If another process holds the directory's lock, or the directory cannot
                be created.
        """
        if not distributed.is_main_process():
            return
        try:
            self.mark_created()
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserInputError(f"{self._out}{self.out} cannot be created: {err.strerror or err}") from None
        self._lock()
        for orphan in self.out.glob(".*.tmp"):
            orphan.unlink(missing_ok=True)
        if self.overwrite:
            for name in RUN_FILES:
                target = self.out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)

    def _lock(self) -> None:
        """Takes ``OUT/.lock`` (exclusive, non-blocking); the file is removed again by :meth:`release`.

        A lock file that was removed between our open and our lock (its holder released it) is
        not the directory's lock any more: then the lock is taken again on the new file.
        """
        import fcntl

        path = self.out / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy(path) from None
                raise
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        """Removes the lock file and drops the lock (a finished run leaves only its own files)."""
        fd, self._lock_fd = self._lock_fd, None  # first: a signal in between must not let a second call close it
        if fd is not None:
            (self.out / LOCK).unlink(missing_ok=True)
            os.close(fd)

    def discard_if_unused(self) -> None:
        """After a failure: removes the directory if this run created it and wrote no checkpoint, and the
        parents it created with it (``runs/`` of the default ``runs/NAME``) if they are empty now."""
        self.release()
        if self.created and distributed.is_main_process() and not self.checkpoint_path.is_file():
            shutil.rmtree(self.out, ignore_errors=True)
            for parent in self._created_parents:
                try:
                    parent.rmdir()  # only if empty: a folder something else wrote into stays
                except OSError:
                    break

    def load(self, config: RunConfig) -> dict[str, Any] | None:
        """The checkpoint to resume from (``None`` unless resuming), checked against ``config``.

        Raises:
            UserInputError: If the checkpoint is unreadable or belongs to another run.
        """
        if not self.resume:
            return None
        state = distributed.broadcast_object(
            load_checkpoint(self.checkpoint_path) if distributed.is_main_process() else None
        )
        stored = state.get("config", {})
        mine = config.identity()
        theirs = RunConfig(**{**stored, "settings": stored.get("settings", {})}).identity() if stored else {}
        if theirs != mine:
            raise UserInputError(f"--resume: the checkpoint in {self.out} is of another run ({theirs}), not {mine}")
        return state

    def save(self, config: RunConfig, state: dict[str, Any]) -> None:
        """Writes a checkpoint atomically (rank 0), with the run's configuration."""
        if distributed.is_main_process():
            save_checkpoint(self.checkpoint_path, {"config": config.stored(), **state})

    def finish(self, summary: dict[str, Any]) -> None:
        """Writes ``metrics.png`` then ``summary.json`` (rank 0), then drops the lock.

        ``summary.json`` comes last: its presence marks a finished run (``--resume`` refuses one).
        """
        if distributed.is_main_process():
            plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png", title=run_title(summary))
            atomic_write_json(self.out / "summary.json", summary)
        self.release()


def open_logger(
    directory: RunDirectory, run: RunConfig, config: Mapping[str, Any], state: Mapping[str, Any] | None
) -> MetricsLogger | NullLogger:
    """The run's logger: ``metrics.jsonl`` (+ wandb) on rank 0, a :class:`NullLogger` elsewhere.

    On resume the wandb run id, the step and the last logged step come from the checkpoint ``state``.
    """
    if not distributed.is_main_process():
        return NullLogger()
    return MetricsLogger(
        directory.out,
        run.wandb,
        config=dict(config),
        run_id=state["wandb_id"] if state else None,
        resume_step=state["step"] if state else None,
        logged_step=state.get("logged_step") if state else None,
        project=run.wandb_project,
        name=run.wandb_name,
        tags=tuple(run.wandb_tags),
    )
