"""Problem files: what a user writes to prune their own model.

A problem file is a plain Python file that defines ``problem = Problem(...)``: the model, the
data, the loss, the metric, which layers to prune and any constraints of the user's. The bundled
problems live in ``constrainedsparse/problems/`` and are loaded by path exactly like a user's.

A problem file is Python code that runs, like any script: load only files you trust.

**One rule for the user's code.** An exception raised by the problem file itself — while it loads,
or later in its ``model``, ``data``, ``calibration``, ``held_out``, ``check`` or loss functions
when the runner calls them — ends the run with one line naming the problem, the function and the
error (exit code 2 from the CLI); ``--debug`` (or ``CONSTRAINEDSPARSE_DEBUG=1``) shows the full
traceback instead, since it is the user's code. ``sys.exit()`` inside a problem file is an error too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import sys
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from constrainedsparse.errors import DEBUG_ENV, UserInputError, debugging, first_line, is_integer, is_number
from constrainedsparse.layerwise.layers import find_blocks, layer_module_types
from constrainedsparse.metrics import ACCURACY, Metric, accuracy, as_metric
from constrainedsparse.problem import UserConstraint, checked_loss, pair_of
from constrainedsparse.targets import Targets
from constrainedsparse.usercode import call_user, guard, user_code_failed

__all__ = [
    "BUNDLED_DIR",
    "DEBUG_ENV",
    "LayerwiseProblem",
    "Problem",
    "accuracy",
    "bundled_problems",
    "call_user",
    "guard",
    "load_problem",
    "user_code_failed",
]

BUNDLED_DIR = Path(__file__).parent / "problems"


def _check_dataset(problem_name: str, which: str, dataset: Any) -> None:
    """A DataLoader, or an ``(x, y)`` pair of arrays, where a dataset belongs: one line saying what to return."""
    from torch.utils.data import DataLoader

    where = f"problem {problem_name!r}: data(options) returned"
    if isinstance(dataset, DataLoader):
        raise UserInputError(
            f"{where} a DataLoader as the {which} set: return the dataset itself (e.g. TensorDataset(x, y)); the "
            "runner batches it (--set batch_size)"
        )
    if isinstance(dataset, (tuple, list)) and dataset and all(hasattr(a, "shape") for a in dataset):
        kinds = ", ".join(type(a).__name__ for a in dataset)
        raise UserInputError(
            f"{where} a ({kinds}) tuple as the {which} set, not a dataset: wrap the arrays as "
            "TensorDataset(torch.as_tensor(x), torch.as_tensor(y))"
        )


def _is_default(fn: Callable[..., Any], default: Callable[..., Any]) -> bool:
    """Whether a problem's function (maybe :func:`guard`-wrapped) is the field's default."""
    return getattr(fn, "__wrapped__", fn) is default


def _kind(value: Any) -> str:
    """A value's class name, or the class itself for a class given instead of an instance."""
    return f"the class {value.__name__}" if isinstance(value, type) else f"a {type(value).__name__}"


def check_options(options: Any, option_help: Any = types.MappingProxyType({})) -> None:
    """Problem options: a dict whose defaults give ``--set`` the type to parse (so none is ``None``), and what
    ``--set help`` says of them (``option_help``: ``{key: text}`` for some or all of them).

    Raises:
        ValueError: For another container, a default ``--set`` could not parse a value for, or help for a key that
            is no option.
    """
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict {{key: default}}, got {_kind(options)}")
    if not isinstance(option_help, Mapping):
        raise ValueError(f"option_help must be a dict {{option: text}}, got {_kind(option_help)}")
    for key, text in option_help.items():
        if key not in options:
            raise ValueError(f"option_help names {key!r}, which is not in options")
        if not isinstance(text, str):
            raise ValueError(f"option_help[{key!r}] must be a str (what --set help says of it), got {_kind(text)}")
    for key, default in options.items():
        if not isinstance(key, str) or not key or "=" in key or key != key.strip():
            raise ValueError(f"option {key!r}: an option's name is a str without '=' or surrounding spaces (what "
                             "--set NAME=VALUE sets)")  # fmt: skip
        if isinstance(default, float) and math.isnan(default):
            raise ValueError(f"option {key!r} has default nan: give a number")
        if not isinstance(default, (bool, int, float, str)):
            raise ValueError(
                f"option {key!r} has default {default!r}: give a bool, int, float or str default (its type is the "
                "one --set parses)"
            )


def predict_pair(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """``(model(x), y)`` of an ``(x, y)`` batch: what the metric compares (the default ``predict``)."""
    x, y = pair_of(batch, "give the Problem predict(model, batch)", "the default predict, (model(x), y),")
    return model(x), y


@dataclass
class Problem:
    """A pruning problem.

    Args:
        name: Short name (used in cache keys and summaries).
        description: One line for ``constrainedsparse problems``.
        model: ``model(options) -> nn.Module``; called after seeding, so initialisation is
            reproducible.
        data: ``data(options) -> (train_dataset, test_dataset)`` of ``(x, y)`` pairs (any sample
            structure with ``compute_loss`` and ``predict``).
        loss: ``loss(output, y) -> scalar`` (cross-entropy by default) for ``(x, y)`` batches.
        metric: What the test set reports: a :class:`~constrainedsparse.metrics.Metric` (name,
            ``fn(outputs, targets)`` over the whole test set, direction) or a plain function of
            all outputs and targets (named by the function). Accuracy by default.
        compute_loss: ``compute_loss(model, batch) -> scalar tensor`` for batches that are not
            ``(x, y)`` pairs (dicts, triples); replaces ``loss``.
        predict: ``predict(model, batch) -> (output, y)``, what ``metric`` compares
            (``(model(x), y)`` by default).
        targets: Which parameters to prune (Linear/Conv weights by default).
        constraints: User constraints by name (see :class:`UserConstraint`).
        pretrain_epochs: Dense training epochs before pruning (``--pretrain-epochs``).
        epochs: Default pruning epochs (``--epochs``).
        batch_size: Minibatch size.
        lr: Adam learning rate of the primal variables.
        dual_lr: Learning rate of gradient ascent on user-constraint multipliers.
        options: Problem options settable with ``--set KEY=VALUE`` (defaults give the types).
        option_help: What each option means and allows, ``{key: text}``: the meaning ``--set help`` shows.
        check: Optional ``check(options)`` raising ``ValueError`` for unusable options (a missing
            data folder, ...); called before anything is written or trained.
        source: The path of the problem file it was loaded from (set by :func:`load_problem`; empty for a
            problem built in Python). The dense-model cache key hashes that file.
    """

    name: str
    description: str
    model: Callable[[Mapping[str, Any]], nn.Module]
    data: Callable[[Mapping[str, Any]], tuple[Dataset, Dataset]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metric: Metric | Callable[[Any, Any], float] = ACCURACY
    compute_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None
    predict: Callable[[nn.Module, Any], tuple[Any, Any]] = predict_pair
    targets: Targets = field(default_factory=Targets)
    constraints: Mapping[str, UserConstraint] = field(default_factory=dict)
    pretrain_epochs: int = 20
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    dual_lr: float = 1e-2
    options: Mapping[str, Any] = field(default_factory=dict)
    option_help: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        """Every field of the right kind, named as the problem file writes it (a ``ValueError`` there
        is the file's one-line load error)."""
        _check_common_fields(self, ("model", "data", "loss", "predict"), ("compute_loss", "check"))
        as_metric(self.metric)
        if not isinstance(self.constraints, Mapping):
            raise ValueError(
                f"Problem.constraints must be a dict {{name: UserConstraint(...)}}, got {_kind(self.constraints)}"
            )
        for key, c in self.constraints.items():
            if not isinstance(c, UserConstraint):
                hint = f": wrap it as UserConstraint({getattr(c, '__name__', 'fn')}, '<=')" if callable(c) else ""
                raise ValueError(f"Problem.constraints[{key!r}] must be a UserConstraint(...), got {_kind(c)}{hint}")
        for key, low in (("pretrain_epochs", 0), ("epochs", 0), ("batch_size", 1)):
            value = getattr(self, key)
            if not is_integer(value) or value < low:
                raise ValueError(f"Problem.{key} must be an integer >= {low}, got {value!r}")
        for key in ("lr", "dual_lr"):
            value = getattr(self, key)
            if not is_number(value) or not 0 < value < float("inf"):
                raise ValueError(f"Problem.{key} must be a finite number > 0, got {value!r}")
        check_options(self.options, self.option_help)

    def guarded(self) -> Problem:
        """A copy whose user functions report their exceptions as one line (see :func:`call_user`)."""
        name = self.name
        constraints = {
            key: dataclasses.replace(  # its sense, restarts and dual_lr too
                c,
                fn=guard(name, f"constraint {key!r}", c.fn),
                strict_fn=None if c.strict_fn is None else guard(name, f"constraint {key!r} strict_fn", c.strict_fn),
            )
            for key, c in self.constraints.items()
        }
        return dataclasses.replace(
            self,
            model=guard(name, "model(options)", self.model),
            data=guard(name, "data(options)", self.data),
            loss=guard(name, "loss(output, y)", self.loss),
            metric=dataclasses.replace(
                as_metric(self.metric), fn=guard(name, "metric(outputs, y)", as_metric(self.metric).fn)
            ),
            compute_loss=guard(name, "compute_loss(model, batch)", self.compute_loss),
            predict=guard(name, "predict(model, batch)", self.predict),
            check=guard(name, "check(options)", self.check),
            constraints=constraints,
        )

    @property
    def test_metric(self) -> Metric:
        """:attr:`metric` as a :class:`~constrainedsparse.metrics.Metric`."""
        return as_metric(self.metric)

    def datasets(self, options: Mapping[str, Any]) -> tuple[Dataset, Dataset]:
        """``data(options)``'s ``(train, test)``, checked to be two datasets with a length.

        Raises:
            UserInputError: For anything else (one set alone, ``None``, a DataLoader in place of a dataset).
        """
        returned = self.data(options)
        if isinstance(returned, (tuple, list)) and len(returned) == 2:
            for which, dataset in zip(("train", "test"), returned):
                _check_dataset(self.name, which, dataset)
                if not hasattr(dataset, "__len__"):
                    raise UserInputError(
                        f"problem {self.name!r}: data(options) returned a {which} set without a length "
                        f"({type(dataset).__name__}): the runner needs map-style datasets (len and indexing), e.g. "
                        "TensorDataset(x, y)"
                    )
            return returned[0], returned[1]
        count = f" of {len(returned)}" if isinstance(returned, (tuple, list)) else ""
        raise UserInputError(
            f"problem {self.name!r}: data(options) must return (train_dataset, test_dataset), two datasets with a "
            f"length, got {type(returned).__name__}{count}"
        )

    def built_model(self, options: Mapping[str, Any]) -> nn.Module:
        """``model(options)``, checked to be an ``nn.Module``.

        Raises:
            UserInputError: For anything else (``None``, a function, a class).
        """
        model = self.model(options)
        if not isinstance(model, nn.Module):
            raise UserInputError(f"problem {self.name!r}: model(options) must return an nn.Module, got {_kind(model)}")
        return model

    def predicted(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict(model, batch)``, checked to be an ``(output, y)`` pair of tensors.

        Raises:
            UserInputError: For anything else (the output alone, a dict, a list of labels).
        """
        returned = self.predict(model, batch)
        pair = isinstance(returned, (tuple, list)) and len(returned) == 2
        if pair and _is_default(self.predict, predict_pair) and not isinstance(returned[0], torch.Tensor):
            raise UserInputError(
                f"problem {self.name!r}: the model returned a {type(returned[0]).__name__}, not the output tensor the "
                "metric compares: give the Problem predict(model, batch) -> (output, y) that picks it"
            )
        if not (pair and all(isinstance(t, torch.Tensor) for t in returned)):
            got = (
                f"a {type(returned).__name__} of {', '.join(type(t).__name__ for t in returned)}"
                if isinstance(returned, (tuple, list))
                else _kind(returned)
            )
            raise UserInputError(
                f"problem {self.name!r}: predict(model, batch) must return (output, y), two tensors the metric "
                f"compares, got {got}"
            )
        return returned[0], returned[1]

    def batch_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of ``model`` on ``batch``: ``compute_loss(model, batch)`` or ``loss(model(x), y)``.

        Raises:
            UserInputError: For a batch that is no ``(x, y)`` pair without ``compute_loss``, a model that
                fails on the batch, or a loss that is not a differentiable scalar.
        """
        if self.compute_loss is not None:
            return checked_loss(self.compute_loss(model, batch), "compute_loss(model, batch)")
        x, y = pair_of(
            batch, "give the Problem compute_loss(model, batch) and predict(model, batch)", "loss(model(x), y)"
        )
        output = call_user(self.name, "the model on a training batch, model(x)", model, x)
        if _is_default(self.loss, F.cross_entropy) and not isinstance(output, torch.Tensor):
            raise UserInputError(
                f"problem {self.name!r}: the model returned a {type(output).__name__}, which the default loss "
                "(cross-entropy) cannot take: give the Problem loss(output, y) or compute_loss(model, batch), and "
                "predict(model, batch)"
            )
        return checked_loss(self.loss(output, y), "loss(output, y)")

    def cache_tag(self) -> str:
        """Identifies the problem's definition for the dense-model cache."""
        digest = hashlib.sha256(Path(self.source).read_bytes()).hexdigest()[:12] if self.source else "0"
        return f"{self.name}-{digest}"


def _check_common_fields(
    problem: Problem | LayerwiseProblem, functions: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    """The fields both kinds of problem share: ``name``, the functions (``optional`` ones may be ``None``) and
    ``targets`` (each caller checks ``options`` after its own fields).

    Raises:
        ValueError: Naming the field as the problem file writes it (``Problem.model``, ``LayerwiseProblem.targets``).
    """
    kind, name = type(problem).__name__, problem.name
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name:
        raise ValueError(
            f"{kind}.name must be a non-empty name without '/' (it names the run and the dense-model cache file), "
            f"got {name!r}"
        )
    for key in functions + optional:
        value = getattr(problem, key)
        if not callable(value) and (value is not None or key not in optional):
            allowed = "a function or None" if key in optional else "a function"
            raise ValueError(f"{kind}.{key} must be {allowed}, got {type(value).__name__}")
    if not isinstance(problem.targets, Targets):
        raise ValueError(f"{kind}.targets must be a Targets(...), got {_kind(problem.targets)}")


def _default_layerwise_targets() -> Targets:
    return Targets(module_types=layer_module_types())


@dataclass
class LayerwiseProblem:
    """A layer-wise pruning problem: a pretrained model, calibration data and held-out metrics.

    Nothing is trained: the layer-wise driver prunes the model's blocks one after another from
    calibration Gram matrices (``--formulation fw|wanda|sparsegpt|magnitude``).

    Args:
        name: Short name.
        description: One line for ``constrainedsparse problems``.
        model: ``model(options) -> nn.Module``, the pretrained model (raise ``ValueError`` with one
            line if it cannot be loaded).
        calibration: ``calibration(options, seed) -> [batch, ...]``, each batch the keyword
            arguments of ``model(**batch)``; an ``attention_mask`` entry marks padding tokens.
        held_out: ``held_out(model, options) -> tensor`` of outputs on held-out data (sentence
            embeddings, per-token losses, ...), computed on the dense and on the pruned model.
        score: ``score(dense_outputs, pruned_outputs) -> {metric: value}`` for the summary.
        blocks: ``blocks(model) -> [block, ...]`` (a list or an ``nn.ModuleList``) in execution order
            (the largest ``ModuleList`` of identical modules by default).
        targets: Which layers inside a block are pruned (``nn.Linear`` and GPT-2 ``Conv1D`` weights).
        options: Problem options settable with ``--set KEY=VALUE`` (defaults give the types).
        option_help: What each option means and allows, ``{key: text}``: the meaning ``--set help`` shows.
        source: The path of the problem file it was loaded from (set by :func:`load_problem`; empty for a
            problem built in Python).
    """

    name: str
    description: str
    model: Callable[[Mapping[str, Any]], nn.Module]
    calibration: Callable[[Mapping[str, Any], int], list[dict[str, Any]]]
    held_out: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None
    score: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None
    blocks: Callable[[nn.Module], Sequence[nn.Module] | nn.ModuleList] | None = None
    targets: Targets = field(default_factory=_default_layerwise_targets)
    options: Mapping[str, Any] = field(default_factory=dict)
    option_help: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        """Every field of the right kind, named as the problem file writes it (a ``ValueError`` there
        is the file's one-line load error)."""
        _check_common_fields(self, ("model", "calibration"), ("held_out", "score", "blocks"))
        if self.score is not None and self.held_out is None:
            raise ValueError(
                "LayerwiseProblem.score compares the outputs held_out(model, options) computes: give held_out too"
            )
        check_options(self.options, self.option_help)

    def guarded(self) -> LayerwiseProblem:
        """A copy whose user functions report their exceptions as one line (see :func:`call_user`)."""
        name = self.name
        return dataclasses.replace(
            self,
            model=guard(name, "model(options)", self.model),
            calibration=guard(name, "calibration(options, seed)", self.calibration),
            held_out=guard(name, "held_out(model, options)", self.held_out),
            score=guard(name, "score(dense, pruned)", self.score),
            blocks=guard(name, "blocks(model)", self.blocks),
        )

    def held_out_outputs(self, model: nn.Module, options: Mapping[str, Any]) -> Any:
        """``held_out(model, options)``, checked to be something (what ``score`` compares).

        Raises:
            UserInputError: For ``None`` (a function that forgot its ``return``).
        """
        outputs = self.held_out(model, options)
        if outputs is None:
            raise UserInputError(
                f"problem {self.name!r}: held_out(model, options) returned None: it must return the outputs "
                "score(dense, pruned) compares"
            )
        return outputs

    def model_blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The blocks to prune, in order (a ``ModuleList`` as a list of its modules)."""
        blocks = self.blocks(model) if self.blocks is not None else find_blocks(model)
        return list(blocks) if isinstance(blocks, nn.ModuleList) else blocks


def _load_failure(err: BaseException, path: Path) -> str:
    """What :func:`load_problem` says of an exception while the file ran: the file's line it came from, and (but
    for ``sys.exit`` and a ``ValueError``, raised on purpose) where the traceback is."""
    if isinstance(err, SystemExit):
        return f": sys.exit({err.code!r})"
    frames = traceback.extract_tb(err.__traceback__)
    lines = [frame.lineno for frame in frames if Path(frame.filename).resolve() == path.resolve()]
    own = isinstance(err, SyntaxError) and err.filename and Path(err.filename).resolve() == path.resolve()
    line = err.lineno if own else (lines[-1] if lines else None)  # a module it imports: the file's import line
    where = f" at line {line}" if line is not None else ""
    hint = "" if isinstance(err, ValueError) else " (--debug shows the traceback)"
    return f"{where}: {type(err).__name__}: {first_line(err)}{hint}"


def bundled_problems() -> dict[str, Path]:
    """``{name: path}`` of the problems shipped with the package."""
    return {p.stem.replace("_", "-"): p for p in sorted(BUNDLED_DIR.glob("*.py"))}


def load_problem(name_or_path: str | os.PathLike[str]) -> Problem | LayerwiseProblem:
    """Loads a bundled problem by name, or a user's problem file by path (a ``str`` or a ``Path``).

    Raises:
        UserInputError: If the name is unknown, the file is missing, fails to load (an exception or
            ``sys.exit()`` while it runs) or defines no ``problem``.
    """
    bundled = bundled_problems()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise UserInputError(f"load_problem: give a problem name or a problem file's path, got {name_or_path!r}")
    if isinstance(name_or_path, str) and name_or_path in bundled:
        path = bundled[name_or_path]
    else:
        path = Path(name_or_path)
        if path.suffix == ".py" and not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise UserInputError(f"problem file {name_or_path} {what} (bundled problems: {', '.join(bundled)})")
        if path.suffix != ".py":
            raise UserInputError(
                f"unknown problem {name_or_path!r}; bundled problems: {', '.join(bundled)} "
                "(or give the path of a .py problem file)"
            )
    module_name = f"constrainedsparse_problem_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # In sys.modules while it runs, as an import would be: dataclasses (and pickling) look the module up
    # there, e.g. a Config dataclass under `from __future__ import annotations`.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # a user's file: report it on the one-line error path
        sys.modules.pop(module_name, None)
        if debugging():
            raise
        raise UserInputError(f"problem file {str(path)!r} failed to load{_load_failure(err, path)}") from err
    problem = getattr(module, "problem", None)
    if not isinstance(problem, (Problem, LayerwiseProblem)):
        found = "" if problem is None else f", its `problem` is {_kind(problem)}"
        raise UserInputError(
            f"problem file {str(path)!r} must define `problem = Problem(...)` or `LayerwiseProblem(...)`{found}"
        )
    problem.source = str(path)
    return problem
