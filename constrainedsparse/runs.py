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
rebuilds it from ``OUT/checkpoint.pt``; options given again must match, and a mismatch names the
differing keys.
"""

from __future__ import annotations

import dataclasses
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
from constrainedsparse.logger import MetricsLogger, NullLogger, WandbMode
from constrainedsparse.plots import plot_metrics
from constrainedsparse.settings import parse_value

__all__ = ["CHECKPOINT", "RUN_FILES", "RunConfig", "RunDirectory", "open_logger"]

CHECKPOINT = "checkpoint.pt"
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
VOLATILE_SETTINGS = ("device", "allow_empty_layers")
"""``--set`` keys that may differ when a run resumes (where it runs, not what it computes)."""
IDENTITY_FIELDS = (
    "problem",
    "formulation",
    "sparsity",
    "pattern",
    "epochs",
    "pretrain_epochs",
    "retrain_epochs",
    "seed",
)


@dataclasses.dataclass
class RunConfig:
    """Everything ``constrainedsparse run`` takes (see the CLI reference for each field).

    Attributes:
        problem: Bundled problem name or path of a problem file.
        formulation: Training formulation or layer-wise solver name.
        sparsity: ``--sparsity`` (``None``: the problem kind's default).
        pattern: ``--pattern`` (``None``: unstructured at ``sparsity``).
        epochs: Pruning epochs (``None``: the problem's default).
        pretrain_epochs: Dense pre-training epochs (``None``: the problem's default).
        retrain_epochs: Masked retraining epochs after hard pruning.
        seed: Seed of everything random.
        out: The run directory: a ``str`` or a path-like, always a ``Path`` once the config is built.
        wandb: ``disabled``, ``offline`` or ``online``.
        wandb_project: wandb project (``None``: ``$WANDB_PROJECT`` or ``constrainedsparse``).
        wandb_name: wandb run name (``None``: ``$WANDB_NAME`` or wandb's).
        wandb_tags: wandb run tags (``$WANDB_TAGS`` when empty).
        settings: ``--set KEY=VALUE`` text by key.
        resume: Continue from ``out/checkpoint.pt``.
        overwrite: Replace the run in ``out`` (its files are removed first).
        progress: Show progress (bars on a terminal, one line per epoch otherwise).
        stop_after_epochs: Stop (with a checkpoint) after this many epochs (blocks, for layer-wise
            problems) of this invocation.
    """

    problem: str = "digits-mlp"
    formulation: str = "slr"
    sparsity: float | None = None
    pattern: str | None = None
    epochs: int | None = None
    pretrain_epochs: int | None = None
    retrain_epochs: int = 0
    seed: int = 0
    out: str | os.PathLike[str] = Path("runs/latest")
    wandb: WandbMode = "disabled"
    wandb_project: str | None = None
    wandb_name: str | None = None
    wandb_tags: tuple[str, ...] = ()
    settings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    stop_after_epochs: int | None = None

    def __post_init__(self) -> None:
        """``out`` as a ``Path`` (a ``str`` given for it is converted), after the checks of the fields' types.

        Raises:
            UserInputError: For a field of another type than its own (``overwrite="no"`` is no ``False``).
        """
        for name in ("problem", "out"):
            if not isinstance(getattr(self, name), (str, os.PathLike)):
                raise UserInputError(f"RunConfig({name}=...) must be a str or a path, got {getattr(self, name)!r}")
        if not isinstance(self.formulation, str):
            raise UserInputError(f"RunConfig(formulation=...) must be a name (str), got {self.formulation!r}")
        for name in ("resume", "overwrite", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise UserInputError(f"RunConfig({name}=...) must be True or False, got {getattr(self, name)!r}")
        settings = self.settings
        if not isinstance(settings, Mapping) or not all(isinstance(key, str) for key in settings):
            raise UserInputError(f"RunConfig(settings=...) must be a dict like {{'rho': '0.05'}}, got {settings!r}")
        self.out = Path(self.out)

    def stored(self) -> dict[str, Any]:
        """What a checkpoint keeps of the configuration (plain types only)."""
        values = {key: getattr(self, key) for key in (*IDENTITY_FIELDS, "wandb")}
        return {**values, "settings": dict(sorted(self.settings.items()))}

    def identity(self) -> dict[str, Any]:
        """What must be the same for a checkpoint to belong to this run."""
        settings = {k: v for k, v in sorted(self.settings.items()) if k not in VOLATILE_SETTINGS}
        return {**{key: getattr(self, key) for key in IDENTITY_FIELDS}, "settings": settings}

    @classmethod
    def resumed(cls, out: Path, given: Mapping[str, Any]) -> RunConfig:
        """The configuration stored in ``out/checkpoint.pt``, with the options ``given`` again.

        Args:
            out: The run directory.
            given: Options given on the command line this time (``{field: value}``; fields that
                were not given are absent). ``settings`` may name some keys: each must mean its
                stored value (``0.20`` for ``0.2``; the stored text is kept), the others keep theirs;
                volatile keys (``device``, ``allow_empty_layers``) may differ.

        Raises:
            UserInputError: Without a readable checkpoint, or when a given option differs from
                the stored one (naming every differing key).
        """
        if (Path(out) / "summary.json").is_file():  # finished: that, before any option that differs
            raise finished_error(Path(out), "--overwrite")
        state = load_checkpoint(Path(out) / CHECKPOINT)
        stored = state.get("config")
        if not isinstance(stored, dict):
            raise UserInputError(f"--resume: {Path(out) / CHECKPOINT} holds no run configuration")
        differing = [
            f"{key} ({value!r}, stored {_stored_text(key, stored)})"
            for key, value in given.items()
            if key != "settings" and key in stored and not _same_option(key, value, stored)
        ]
        theirs = dict(stored.get("settings", {}))
        effective = state.get("effective_settings") or {}
        settings = dict(theirs)
        unknown = [
            k for k in given.get("settings", {}) if effective and k not in {*effective, *theirs, *VOLATILE_SETTINGS}
        ]
        if unknown:  # every key the run knows is in effect: this one means nothing to it
            raise UserInputError(
                f"unknown --set key {unknown[0]!r} for the run in {out} (formulation {stored.get('formulation')!r}); "
                f"allowed: {', '.join(sorted(effective))}"
            )
        for key, value in sorted(given.get("settings", {}).items()):
            if key in VOLATILE_SETTINGS:
                settings[key] = value
            elif key not in theirs and key in effective and _same_setting(value, effective[key]):
                continue  # the value the run already uses (a default): nothing changes
            elif key not in theirs:
                in_effect = f"; in effect {effective[key]}" if key in effective else ""
                differing.append(f"--set {key} ({value}, not set at the start{in_effect})")
            elif not _same_setting(value, theirs[key]):
                differing.append(f"--set {key} ({value}, stored {theirs[key]})")
        if differing:
            raise UserInputError(
                f"--resume: the run in {out} was started with other options: {', '.join(differing)}; give the "
                "stored ones or none"
            )
        fields = {key: stored[key] for key in (*IDENTITY_FIELDS, "wandb") if key in stored}
        extra = {k: v for k, v in given.items() if k not in fields and k != "settings"}
        return cls(**{**fields, **extra, "settings": settings, "out": Path(out), "resume": True})


def finished_error(out: Path, overwrite: str) -> UserInputError:
    """``--resume`` of a finished run (its ``summary.json`` written); ``overwrite`` names the flag or keyword."""
    return UserInputError(
        f"--resume: the run in {out} has finished ({out / 'summary.json'}); there is nothing to continue: run it "
        f"again with {overwrite}, or choose another folder"
    )


def _stored_text(key: str, stored: Mapping[str, Any]) -> str:
    """A stored option for a message: ``none`` for an unset one (a run with ``--pattern`` stores no sparsity)."""
    value = stored[key]
    if value is not None:
        return repr(value)
    pattern = stored.get("pattern")
    return f"none: the run used --pattern {pattern}" if key == "sparsity" and pattern else "none"


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


def settings_text(*groups: Mapping[str, Any]) -> dict[str, str]:
    """Every ``--set`` key's value in effect as text, from the runner's groups of settings (checkpoints keep it so
    that ``--resume`` accepts a key given again with the value the run already uses)."""
    return {key: setting_text(value) for group in groups for key, value in group.items()}


def setting_text(value: Any) -> str:
    """A ``--set`` value as text (``true``/``false`` for a bool, as ``--set`` takes it)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _same_setting(given: str, stored: str) -> bool:
    """Whether a ``--set`` value given again means the stored one (``0.20`` is ``0.2``, ``yes`` is ``true``)."""
    if given == stored:
        return True
    if stored in ("true", "false"):  # a bool, read the way --set reads one
        try:
            return parse_value("", given, bool) == (stored == "true")
        except ValueError:
            return False
    try:
        return float(given) == float(stored)
    except (TypeError, ValueError):
        return False


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
            plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png")
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


def _same_option(key: str, value: Any, stored: Mapping[str, Any]) -> bool:
    """Whether an option given on ``--resume`` means the stored one: equal, or ``--pattern unstructured`` for a
    training run started without ``--pattern`` (its default; a layer-wise run's default is the row scope)."""
    if stored[key] == value:
        return True
    if key == "pattern" and value == "unstructured" and stored[key] is None:
        from constrainedsparse.formulations.factory import available_formulations

        return stored.get("formulation") in available_formulations()
    return False
