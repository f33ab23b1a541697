"""The problem file's code called by the runners: its exceptions become one line naming the problem and the call
(:func:`call_user`, :class:`GuardedDataset` for its datasets); ``--debug`` shows the traceback instead (the user's
code, not a bug of ours)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset, Subset, default_collate

from constrainedsparse.errors import UserInputError, debugging, first_line

__all__ = ["GuardedDataset", "call_user", "collate_fn", "guard", "user_code_failed"]


def guard(problem_name: str, what: str, fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``fn`` (a function of a problem file) with its exceptions turned into one line (:func:`call_user`).

    The wrapper keeps ``fn``'s signature (a constraint's arity tells whether it takes the batch).
    """
    if fn is None:
        return None

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        return call_user(problem_name, what, functools.partial(fn, **kwargs), *args)

    return guarded


def call_user(problem_name: str, what: str | Callable[[], str], fn: Callable[..., Any], *args: Any) -> Any:
    """Calls a function of a problem file; its exceptions become one :class:`UserInputError` line.

    A ``ValueError`` of a call that reads the options (``model(options)``, ``data(options)``, ...) is
    taken as raised on purpose (a bad option) and keeps its message as the line; elsewhere (a
    constraint, the loss, a metric: often an unpacking mistake) the message is prefixed with the
    problem and the call. Any other exception is reported with the problem, the call and its type.
    With ``--debug`` the exception propagates with its traceback.

    Args:
        problem_name: The problem's name, for the message.
        what: What was called (``"data(options)"``), or a function giving it (built only on an exception: a
            dataset's item reads are called per sample).
        fn: The user's function.
        *args: Its arguments.
    """
    try:
        return fn(*args)
    except UserInputError:
        raise
    except (Exception, SystemExit) as err:
        if debugging():
            raise
        raise user_code_failed(problem_name, what if isinstance(what, str) else what(), err) from err


def user_code_failed(problem_name: str, what: str, err: BaseException) -> UserInputError:
    """The one line of :func:`call_user` for ``err``, raised by the problem's ``what``."""
    hint = (  # BatchNorm in training mode on a batch of one sample: what torch's message does not say
        " (a training batch of 1 sample: an epoch's last batch holds 1 when the training set is 1 more than a multiple "
        "of batch_size; change --set batch_size)"
        if "Expected more than 1 value per channel when training" in str(err)
        else ""
    )
    if isinstance(err, ValueError):
        if "options" in what:
            return UserInputError(first_line(err))
        return UserInputError(f"problem {problem_name!r}: {what} failed: {first_line(err)}{hint}")
    detail = f"sys.exit({err.code!r})" if isinstance(err, SystemExit) else f"{type(err).__name__}: {first_line(err)}"
    return UserInputError(f"problem {problem_name!r}: {what} failed: {detail}{hint} (--debug shows the traceback)")


class GuardedDataset(Dataset):
    """A problem's dataset as the runner reads it: an exception of the user's item reads or of batching its items is
    one line naming the problem and the item (:func:`user_code_failed`), not a traceback from inside a DataLoader.

    Args:
        dataset: The problem's map-style dataset (``data(options)``'s).
        problem_name: The problem's name, for the message.
        which: ``"training"`` or ``"test"``, for the message.
    """

    def __init__(self, dataset: Any, problem_name: str, which: str) -> None:
        self.dataset, self.problem_name, self.which = dataset, problem_name, which

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        what = lambda: f"reading item {index} of the {self.which} set"  # noqa: E731 (built only on an error)
        return call_user(self.problem_name, what, self.dataset.__getitem__, index)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """The items at ``indices`` (the dataset's own ``__getitems__`` where it has one, as a DataLoader calls it)."""
        many = getattr(self.dataset, "__getitems__", None)
        if many is None:
            return [self[index] for index in indices]
        return call_user(self.problem_name, f"reading items of the {self.which} set", many, indices)

    def collate(self, samples: list[Any]) -> Any:
        """``default_collate`` of the samples (items of different sizes fail there)."""
        what = f"batching samples of the {self.which} set (default_collate)"
        return call_user(self.problem_name, what, default_collate, samples)


def collate_fn(dataset: Any) -> Callable[[list[Any]], Any] | None:
    """The collate function a DataLoader of ``dataset`` takes: a :class:`GuardedDataset`'s (also under a
    ``Subset``), else ``None`` (the DataLoader's default)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return base.collate if isinstance(base, GuardedDataset) else None
