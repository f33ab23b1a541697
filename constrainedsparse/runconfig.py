"""A run's configuration: what ``constrainedsparse run`` takes, what a checkpoint keeps of it, and the resume rule.

``RunConfig.resumed(out, given)`` rebuilds the configuration from ``OUT/checkpoint.pt``; options given again
must mean the stored ones (``0.20`` for ``0.2``), and a mismatch names every differing key. The run directory
that holds the checkpoint is :mod:`constrainedsparse.runs`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from constrainedsparse.checkpoint import load_checkpoint
from constrainedsparse.errors import UserInputError
from constrainedsparse.logger import WandbMode, wandb_names
from constrainedsparse.settings import parse_value

__all__ = ["CHECKPOINT", "RunConfig", "finished_error", "settings_text", "setting_text"]

CHECKPOINT = "checkpoint.pt"
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

WANDB_FIELDS = ("wandb", "wandb_project", "wandb_name")
"""Where the run's wandb run lives and what it is called: kept by a checkpoint (as the run resolved them from the
options or the environment), so that ``--resume`` continues the same wandb run under the same project, name (and
``wandb_tags``) without the flags or the environment given again."""


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
        wandb_name: wandb run name (``None``: ``$WANDB_NAME``, else ``out``'s folder name).
        wandb_tags: wandb run tags (``$WANDB_TAGS`` when empty).
        settings: ``--set KEY=VALUE`` text by key.
        resume: Continue from ``out/checkpoint.pt``.
        overwrite: Replace the run in ``out`` (its files are removed first).
        progress: Show progress (bars on a terminal, one line per epoch otherwise).
        stop_after_epochs: Stop (with a checkpoint) after this many epochs (blocks, for layer-wise
            problems) of this invocation.
    """

    problem: str | os.PathLike[str] = "digits-mlp"
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
        """``out`` as a ``Path`` (a ``str`` given for it is converted) and ``problem`` as a ``str`` (a path given
        for it: checkpoints keep plain types), after the checks of the fields' types.

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
        _check_wandb_names(self.wandb_project, self.wandb_name, self.wandb_tags)
        settings = self.settings
        if not isinstance(settings, Mapping) or not all(isinstance(key, str) for key in settings):
            raise UserInputError(f"RunConfig(settings=...) must be a dict like {{'rho': '0.05'}}, got {settings!r}")
        self.out = Path(self.out)
        self.problem = os.fspath(self.problem)

    def stored(self) -> dict[str, Any]:
        """What a checkpoint keeps of the configuration (plain types only)."""
        values = {key: getattr(self, key) for key in IDENTITY_FIELDS}
        project, name, tags = wandb_names(self.wandb_project, self.wandb_name, self.wandb_tags)  # as the run uses them
        wandb = {"wandb": self.wandb, "wandb_project": project, "wandb_name": name, "wandb_tags": list(tags)}
        return {**values, **wandb, "settings": dict(sorted(self.settings.items()))}

    def with_stored_wandb(self, stored: Mapping[str, Any]) -> RunConfig:
        """This configuration with the wandb project, name and tags a checkpoint's ``stored`` configuration keeps
        where none is given (a resumed run goes on under the names it started with, whatever its environment).

        Raises:
            UserInputError: When a given one differs from the stored one (as ``--resume`` refuses it on the
                command line: the wandb run would be continued under another project or name).
        """
        given = {"wandb_project": self.wandb_project, "wandb_name": self.wandb_name}
        given["wandb_tags"] = list(self.wandb_tags)
        differing = [
            f"{key} ({value!r}, stored {stored[key]!r})"
            for key, value in given.items()
            if value and key in stored and value != stored[key]
        ]
        _refuse_other_options(self.out, differing)
        names = {
            "wandb_project": self.wandb_project or stored.get("wandb_project"),
            "wandb_name": self.wandb_name or stored.get("wandb_name"),
            "wandb_tags": tuple(self.wandb_tags) or tuple(stored.get("wandb_tags") or ()),
        }
        return dataclasses.replace(self, **names)

    def identity(self) -> dict[str, Any]:
        """What must be the same for a checkpoint to belong to this run."""
        settings = {k: v for k, v in sorted(self.settings.items()) if k not in VOLATILE_SETTINGS}
        return {**{key: getattr(self, key) for key in IDENTITY_FIELDS}, "settings": settings}

    @classmethod
    def resumed(
        cls, out: Path, given: Mapping[str, Any], check: Callable[[RunConfig], None] | None = None
    ) -> RunConfig:
        """The configuration stored in ``out/checkpoint.pt``, with the options ``given`` again.

        Args:
            out: The run directory.
            given: Options given on the command line this time (``{field: value}``; fields that
                were not given are absent). ``settings`` may name some keys: each must mean its
                stored value (``0.20`` for ``0.2``; the stored text is kept), the others keep theirs;
                volatile keys (``device``, ``allow_empty_layers``) may differ.
            check: Checks the options of a configuration (:func:`~constrainedsparse.runners.check_options`):
                called on the stored one with the given options when some differ, so that a value bad in
                itself (``--set rho=abc``) is reported as such, not as a difference (not when another problem
                or formulation is given: the stored options are not theirs, the difference is the message).

        Raises:
            UserInputError: Without a readable checkpoint, for ``out`` a file, or when a given option differs
                from the stored one (naming every differing key).
        """
        if Path(out).exists() and not Path(out).is_dir():
            raise UserInputError(f"--out {out} is a file, not a directory")
        if (Path(out) / "summary.json").is_file():  # finished: that, before any option that differs
            raise finished_error(Path(out), "--overwrite")
        state = load_checkpoint(Path(out) / CHECKPOINT)
        stored = state.get("config")
        if not isinstance(stored, dict):
            raise UserInputError(f"--resume: {Path(out) / CHECKPOINT} holds no run configuration")
        other = [
            key for key in given if key != "settings" and key in stored and not _same_option(key, given[key], stored)
        ]
        differing = [f"{key} ({given[key]!r}, stored {_stored_text(key, stored)})" for key in other]
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
        fields = {key: stored[key] for key in (*IDENTITY_FIELDS, *WANDB_FIELDS) if key in stored}
        if "wandb_tags" in stored:  # a checkpoint keeps a list
            fields["wandb_tags"] = tuple(stored["wandb_tags"])
        other_run = {"problem", "formulation"} & set(other)
        if differing and check is not None and not other_run:  # the values first (docs/cli.md), then how they differ
            target = {"sparsity": None, "pattern": None} if {"sparsity", "pattern"} & set(given) else {}
            values = {**fields, **target, **given, "settings": {**settings, **given.get("settings", {})}}
            check(cls(**values, out=Path(out)))  # a given target replaces the stored one: not both at once
        _refuse_other_options(out, differing)
        extra = {k: v for k, v in given.items() if k not in fields and k != "settings"}
        return cls(**{**fields, **extra, "settings": settings, "out": Path(out), "resume": True})

    def continued(self, check: Callable[[RunConfig], None] | None = None) -> RunConfig:
        """What ``run(RunConfig(out=..., resume=True))`` resumes: the configuration stored in ``out``, with the options
        of this one that differ from :class:`RunConfig`'s defaults given again (as flags on the command line: each
        must mean its stored value); ``progress``, ``overwrite`` and ``stop_after_epochs`` are this one's.

        Raises:
            UserInputError: As :meth:`resumed` (given ``check``).
        """
        defaults = RunConfig()
        given: dict[str, Any] = {
            key: getattr(self, key)
            for key in (*IDENTITY_FIELDS, *WANDB_FIELDS, "wandb_tags")
            if getattr(self, key) != getattr(defaults, key)
        }
        if self.settings:
            given["settings"] = dict(self.settings)
        stored = RunConfig.resumed(Path(self.out), given, check)
        return dataclasses.replace(
            stored, progress=self.progress, overwrite=self.overwrite, stop_after_epochs=self.stop_after_epochs
        )


WANDB_PROJECT_FORBIDDEN = "/\\#?%:"
"""Characters wandb refuses in a project name (and at most 128 characters); a tag has 1 to 64 characters."""


def _check_wandb_names(project: Any, name: Any, tags: Any) -> None:
    """wandb's rules for the project, name and tags, checked when the run is configured: wandb checks them when the
    run opens its logger, after the dense pre-training.

    Raises:
        UserInputError: Naming the option and what wandb allows.
    """
    forbidden = WANDB_PROJECT_FORBIDDEN
    if project is not None and (
        not isinstance(project, str) or not 0 < len(project) <= 128 or any(c in project for c in forbidden)
    ):
        raise UserInputError(
            f"wandb_project (--wandb-project) must be 1 to 128 characters, none of {' '.join(forbidden)}; "
            f"got {project!r}"
        )
    if name is not None and not isinstance(name, str):
        raise UserInputError(f"wandb_name (--wandb-name) must be a str, got {name!r}")
    if isinstance(tags, str) or not isinstance(tags, (tuple, list)) or not all(isinstance(t, str) for t in tags):
        raise UserInputError(f"wandb_tags must be a tuple of str, got {tags!r}")
    for tag in tags:
        if not 0 < len(tag) <= 64:
            raise UserInputError(f"wandb_tags (--wandb-tags): a tag has 1 to 64 characters, got {tag!r} ({len(tag)})")


def finished_error(out: Path, overwrite: str) -> UserInputError:
    """``--resume`` of a finished run (its ``summary.json`` written); ``overwrite`` names the flag or keyword."""
    return UserInputError(
        f"--resume: the run in {out} has finished ({out / 'summary.json'}); there is nothing to continue: run it "
        f"again with {overwrite}, or choose another folder"
    )


def _refuse_other_options(out: Path, differing: list[str]) -> None:
    """A resume given options other than the stored ones (``differing``: each ``key (given, stored ...)``) stops.

    Raises:
        UserInputError: Naming every differing option.
    """
    if differing:
        raise UserInputError(
            f"--resume: the run in {out} was started with other options: {', '.join(differing)}; give the stored "
            "ones or none"
        )


def _stored_text(key: str, stored: Mapping[str, Any]) -> str:
    """A stored option for a message: ``none`` for an unset one (a run with ``--pattern`` stores no sparsity)."""
    value = stored[key]
    if value is not None:
        return repr(value)
    pattern = stored.get("pattern")
    return f"none: the run used --pattern {pattern}" if key == "sparsity" and pattern else "none"


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


def _same_option(key: str, value: Any, stored: Mapping[str, Any]) -> bool:
    """Whether an option given on ``--resume`` means the stored one: equal, or ``--pattern unstructured`` for a
    training run started without ``--pattern`` (its default; a layer-wise run's default is the row scope)."""
    if stored[key] == value or (key == "wandb_tags" and list(stored[key]) == list(value)):
        return True
    if key == "pattern" and value == "unstructured" and stored[key] is None:
        from constrainedsparse.formulations.factory import available_formulations

        return stored.get("formulation") in available_formulations()
    return False
