"""The two failures a run reports in one line: bad input, and a loss that stopped being finite.

Everything a user can get wrong (a flag, a ``--set`` value, a problem file, a checkpoint that is not
ours) is raised as :class:`UserInputError` at the input boundary; the CLI turns only that, and
:class:`NonFiniteLossError`, into ``error: ...`` with exit code 2. Any other exception is a bug of
ours and keeps its traceback. :class:`UserInputError` is a :class:`ValueError`, so Python callers
catch it as one.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from collections.abc import Iterator

__all__ = [
    "DEBUG_ENV",
    "NonFiniteLossError",
    "Terminated",
    "UserInputError",
    "as_float",
    "as_int",
    "debugging",
    "first_line",
    "failed_pattern",
    "is_integer",
    "is_number",
    "is_ours",
    "plugin_code",
    "raised_in_forward",
    "user_input",
    "user_stacklevel",
]


class UserInputError(ValueError):
    """A value given by the user (flag, setting, file, problem code) is unusable; the message says why."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler, ``docker stop``): unwound like Ctrl-C, so a run killed before
    its first checkpoint removes its folder too."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


def is_integer(value: object) -> bool:
    """Whether ``value`` is an ``int`` that is not a ``bool`` (``True`` is an int to Python, not to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def as_int(value: object) -> int | None:
    """``value`` as a Python ``int`` when it is an integer of Python's or NumPy's (``np.int64(2)``, what
    ``np.ceil(...).astype(int)`` gives), ``None`` for anything else (a bool, a float, a string, a tensor)."""
    if type(value) is int:  # the common case, without the ABC check (once per training step)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_float(value: object) -> float | None:
    """``value`` as a Python ``float`` when it is a real number of Python's or NumPy's (``np.float32(0.5)``),
    ``None`` for anything else (a bool, a string, a tensor)."""
    if type(value) is float or type(value) is int:  # the common cases, without the ABC check (every backward())
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def is_number(value: object) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` that is not a ``bool`` (not a string, not a tensor)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextlib.contextmanager
def user_input(prefix: str = "", suffix: str = "") -> Iterator[None]:
    """Turns a ``ValueError`` raised inside the block into a :class:`UserInputError` (first line kept).

    Use it around validation of user input only, so that a ``ValueError`` elsewhere stays a bug.

    Args:
        prefix: Prepended to the message (``"blocks.0.attn.q.weight: "``).
        suffix: Appended to it (a hint that holds for every error of the block).
    """
    try:
        yield
    except UserInputError as err:
        if (not prefix or str(err).startswith(prefix)) and (not suffix or str(err).endswith(suffix)):
            raise  # already says it (a problem's guarded function names the problem itself)
        text = str(err).removeprefix(prefix).removesuffix(suffix)
        raise UserInputError(f"{prefix}{text}{suffix}") from err
    except ValueError as err:
        raise UserInputError(f"{prefix}{first_line(err)}{suffix}") from err


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


DEBUG_ENV = "CONSTRAINEDSPARSE_DEBUG"


def debugging() -> bool:
    """Whether the user's tracebacks are wanted (``--debug`` sets ``CONSTRAINEDSPARSE_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def is_ours(cls: type) -> bool:
    """Whether ``cls`` is defined in this package (a built-in solver or formulation), not by a user."""
    return cls.__module__.split(".")[0] == __name__.split(".")[0]


def failed_pattern(err: BaseException) -> str | None:
    """The one line for an exception raised inside a sparsity pattern registered outside this package (its
    ``mask``, ``at_level``, ...), found on the traceback; ``None`` if no such pattern's code is on it."""
    try:
        culprit = _pattern_frame_owner(err)
    except Exception:  # the error handler itself never fails
        return None
    if culprit is None:
        return None
    return (
        f"pattern {getattr(culprit, 'kind', culprit.__name__)!r} failed: {_detail(err)} (--debug shows the traceback)"
    )


def raised_in_forward(err: BaseException, model: object) -> bool:
    """Whether ``err`` was raised inside ``model``'s forward by the model itself: a call of ``model`` is on its
    traceback and none of this package's code below it (a mask or gate of ours in the forward keeps the
    traceback of a bug of ours)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    tb, inside = err.__traceback__, False
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("_call_impl", "_wrapped_call_impl") and frame.f_locals.get("self") is model:
            inside = True
        elif inside and frame.f_code.co_filename.startswith(package):
            return False
        tb = tb.tb_next
    return inside


def _detail(err: BaseException) -> str:
    """An exception of code of the user's, in one line: a ``ValueError``'s message (raised on purpose), else its
    type and message."""
    return first_line(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {first_line(err)}"


def _pattern_frame_owner(err: BaseException) -> type | None:
    """The user's pattern class whose own code is the deepest pattern code on ``err``'s traceback (its module's
    methods, decorated ones and helpers too); ``None`` when that deepest pattern code is ours (a method it
    inherits: a bug of ours keeps its traceback) or no pattern ran."""
    tb, culprit = err.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self", frame.f_locals.get("cls"))
        cls = owner if isinstance(owner, type) else type(owner)
        if any(base.__name__ == "FeasibleSet" and is_ours(base) for base in cls.__mro__[1:]):
            module = frame.f_globals.get("__name__")
            theirs = [k for k in cls.__mro__ if not is_ours(k) and k.__module__ == module]
            if theirs or str(module).split(".")[0] == __name__.split(".")[0]:  # not a decorator's frame (torch)
                culprit = theirs[0] if theirs else None
        tb = tb.tb_next
    return culprit


@contextlib.contextmanager
def plugin_code(cls: type, what: str) -> Iterator[None]:
    """Reports an exception raised by code of a user's class (a solver or formulation registered outside
    this package) as one :class:`UserInputError` line: ``{what} failed: <Type>: <message>``.

    A built-in class's exception is a bug of ours and keeps its traceback, as does every exception
    under ``--debug``; a :class:`UserInputError` or :class:`NonFiniteLossError` passes as it is.
    """
    try:
        yield
    except (UserInputError, NonFiniteLossError):
        raise
    except Exception as err:
        if is_ours(cls) or debugging():
            raise
        raise UserInputError(f"{what} failed: {_detail(err)} (--debug shows the traceback)") from err


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the function that calls this: the first frame outside the package
    and torch (the user's line, whichever of our entry points led there, through torch's autograd hooks or the
    wrappers of :func:`~constrainedsparse.compiling.outside_compile`)."""
    import torch  # loaded already: the warnings come from code that runs on it

    ours = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(ours):
        frame, level = frame.f_back, level + 1
    return level
