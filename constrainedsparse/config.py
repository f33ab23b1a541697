r"""Hyperparameters declared once: type, default, bounds and one line of meaning, checked by one validator.

A formulation's or solver's ``Config`` is a dataclass deriving from :class:`Hyperparameters` whose
fields are declared with :func:`hyperparameter` (or :func:`nested` for a group of related keys).
Everything a user can get wrong about a single value — its type, a bound, a choice, a non-finite
number — is checked here, by :meth:`Hyperparameters.validate`, from the declaration; a class only
adds the checks that relate several fields (:meth:`Hyperparameters.check`).

Keys stay flat for users whatever the nesting: ``make("fw-like", problem, tabu_steps=100)``,
``--set tabu_steps=100`` and :meth:`Hyperparameters.from_values` route a key into the nested group
that declares it. Every key is unique across a config's groups.

Example::

    @dataclasses.dataclass
    class MyConfig(Hyperparameters):
        rho: float = hyperparameter(0.1, "penalty coefficient", Bounds(low=0, low_inclusive=False))
        unit: str = hyperparameter("step", "interval unit", OneOf(("epoch", "step")))

    MyConfig(rho=0.0).validate()  # ValueError: rho must be > 0, got 0.0
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from constrainedsparse.errors import is_integer, is_number

__all__ = [
    "Bounds",
    "DeviceName",
    "Check",
    "HyperparameterInfo",
    "Hyperparameters",
    "OneOf",
    "check_config",
    "hyperparameter",
    "nested",
]

_TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str"}


class Check(abc.ABC):
    """A declarative rule on one value, rendering its own error message."""

    @abc.abstractmethod
    def accepts(self, value: Any) -> bool:
        """Whether ``value`` satisfies the rule."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What is allowed, as the end of "``key`` must be ...": ``> 0``, ``one of a, b``."""


def _fmt(bound: float) -> str:
    return f"{bound:g}"


@dataclasses.dataclass(frozen=True)
class Bounds(Check):
    """A numeric range, open or closed at either end; optionally integers only or finite only.

    Args:
        low: Lower bound (``None``: none).
        high: Upper bound (``None``: none).
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.
        integer: Only Python integers (never ``bool``) are allowed.
        finite: Said in the message ("a finite number >= 0"); non-finite floats are refused
            whatever this flag (see :meth:`Hyperparameters.validate`).
    """

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    integer: bool = False
    finite: bool = False

    def accepts(self, value: Any) -> bool:
        if self.integer and not is_integer(value):
            return False
        if not is_number(value) or math.isnan(value):
            return False
        if self.low is not None and not (value >= self.low if self.low_inclusive else value > self.low):
            return False
        return self.high is None or (value <= self.high if self.high_inclusive else value < self.high)

    def describe(self, finite: bool | None = None) -> str:
        finite = self.finite if finite is None else finite
        noun = "an integer " if self.integer else ("a finite number " if finite else "")
        if self.low is not None and self.high is not None:
            left, right = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
            return f"{noun}in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        if self.low is not None:
            return f"{noun}{'>=' if self.low_inclusive else '>'} {_fmt(self.low)}"
        if self.high is not None:
            return f"{noun}{'<=' if self.high_inclusive else '<'} {_fmt(self.high)}"
        return noun.strip() or "a number"


@dataclasses.dataclass(frozen=True)
class OneOf(Check):
    """One of a fixed set of values.

    Args:
        options: The allowed values, in the order the message lists them.
        style: ``"list"`` renders "one of a, b"; ``"or"`` renders "'a' or 'b'".
    """

    options: tuple[Any, ...]
    style: str = "list"

    def accepts(self, value: Any) -> bool:
        return any(value == option and type(value) is type(option) for option in self.options)

    def describe(self) -> str:
        if self.style == "or":
            return " or ".join(repr(option) for option in self.options)
        return "one of " + ", ".join(str(option) for option in self.options)


@dataclasses.dataclass(frozen=True)
class DeviceName(Check):
    """A device a run can name: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (whether it exists is checked when used)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?", value) is not None

    def describe(self) -> str:
        return "cpu, cuda, cuda:N or auto"


def hyperparameter(default: Any, help: str, check: Check | None = None) -> Any:
    """Declares a hyperparameter field: its default, one line of meaning and its rule.

    Args:
        default: Default value (its annotation gives the type).
        help: One line for :func:`constrainedsparse.describe` and ``--set help``.
        check: The rule a value must satisfy (``None``: any value of the type).
    """
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


def nested(cls: type, help: str) -> Any:
    """Declares a group of hyperparameters (a nested :class:`Hyperparameters` dataclass)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "nested": True})


@dataclasses.dataclass(frozen=True)
class HyperparameterInfo:
    """What :func:`constrainedsparse.describe` lists for one key."""

    key: str
    type: type
    default: Any
    help: str
    check: Check | None = None
    group: str = ""

    @property
    def allowed(self) -> str:
        """The rule in words ("> 0", "one of a, b", "true or false"), or the type's name."""
        if self.type is bool:
            return "true or false"
        return self.check.describe() if self.check is not None else _TYPE_NAMES.get(self.type, self.type.__name__)

    @property
    def type_name(self) -> str:
        """``float``, ``int``, ``bool`` or ``str``."""
        return _TYPE_NAMES.get(self.type, self.type.__name__)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_H = TypeVar("_H", bound="Hyperparameters")


class Hyperparameters:
    """Mixin of hyperparameter dataclasses: flat keys, coercion, declarative validation, description.

    Attributes:
        error_prefix: Prepended to every error message (``"fw: "``), empty by default.
    """

    error_prefix: ClassVar[str] = ""

    # --- declaration ------------------------------------------------------------------------------

    @classmethod
    def keys(cls) -> dict[str, HyperparameterInfo]:
        """Every flat key, in declaration order (nested groups expanded in place).

        Raises:
            TypeError: If two groups declare the same key, or a key has no default (bugs in the declaration:
                ``make()`` and ``--set`` give only the keys they change).
        """
        found: dict[str, HyperparameterInfo] = {}
        hints = _hints(cls)
        for field in dataclasses.fields(cls):
            if field.metadata.get("nested"):
                for key, info in hints[field.name].keys().items():
                    if key in found:
                        raise TypeError(f"{cls.__name__}: key {key!r} is declared twice")
                    found[key] = dataclasses.replace(info, group=field.name)
                continue
            if field.name in found:
                raise TypeError(f"{cls.__name__}: key {field.name!r} is declared twice")
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise TypeError(
                    f"{cls.__name__}: hyperparameter {field.name!r} needs a default "
                    "(make() and --set give only the keys they change)"
                )
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            found[field.name] = HyperparameterInfo(
                field.name, hints[field.name], default, field.metadata.get("help", ""), field.metadata.get("check")
            )
        return found

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """``{flat key: type}`` (what ``--set`` parses text into)."""
        return {key: info.type for key, info in cls.keys().items()}

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def from_values(cls: type[_H], values: Mapping[str, Any] | None = None, *, where: str = "") -> _H:
        """Builds the config from flat ``{key: value}`` (routed into nested groups), without validating.

        Ints are accepted for float keys; other type mismatches are left to :meth:`validate` where a
        rule renders them (an int key given 2.5), else refused here.

        Args:
            values: Flat keys and values (Python values, not text).
            where: Context for the unknown-key message (``" for formulation 'slr'"``).

        Raises:
            ValueError: For an unknown key (listing every allowed one) or a value of the wrong type.
        """
        values = dict(values or {})
        keys = cls.keys()
        unknown = [key for key in values if key not in keys]
        if unknown:
            raise ValueError(
                f"{cls.error_prefix}unknown hyperparameter {unknown[0]!r}{where}; "
                + (f"allowed: {', '.join(sorted(keys))}" if keys else "it takes none")
            )
        typed = {key: _coerce(cls.error_prefix, key, value, keys[key]) for key, value in values.items()}
        return cls._build(typed)

    @classmethod
    def _build(cls: type[_H], typed: Mapping[str, Any]) -> _H:
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.metadata.get("nested"):
                sub = hints[field.name]
                mine = {k: v for k, v in typed.items() if k in sub.keys()}
                kwargs[field.name] = sub._build(mine)
            elif field.name in typed:
                kwargs[field.name] = typed[field.name]
        return cls(**kwargs)

    def values(self) -> dict[str, Any]:
        """The current values by flat key (what runs log and checkpoints store)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get("nested"):
                out.update(value.values())
            else:
                out[field.name] = value
        return out

    # --- validation -------------------------------------------------------------------------------

    def validate(self) -> None:
        """Checks every value against its declaration, then the cross-field rules of :meth:`check`.

        A float that is infinite where its range would allow it is refused too: every
        hyperparameter is a finite number.

        Raises:
            ValueError: Naming the first bad value and what is allowed.
        """
        hints = _hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get("nested"):
                value.validate()
                continue
            _check_value(self.error_prefix, field.name, value, hints[field.name], field.metadata.get("check"))
        self.check()

    def check(self) -> None:
        """Rules that relate several fields (none by default); raise ``ValueError`` naming the value."""

    # --- description ------------------------------------------------------------------------------

    @classmethod
    def describe_keys(cls) -> list[str]:
        """One line per key: ``key (type, default D): meaning; allowed: rule``."""
        lines = []
        for key, info in cls.keys().items():
            lines.append(f"{key} ({info.type_name}, default {info.default!r}): {info.help}; {info.allowed}")
        return lines


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a hyperparameter beyond it is inf in the tensors it scales."""


def _coerce(prefix: str, key: str, value: Any, info: HyperparameterInfo) -> Any:
    kind = info.type
    if kind is float and is_number(value):
        return float(value)
    if kind is float or (kind is str and not isinstance(value, str)):
        raise ValueError(f"{prefix}{key}={value!r} must be a {_TYPE_NAMES[kind]}")
    if kind is int and info.check is None and not is_integer(value):
        raise ValueError(f"{prefix}{key}={value!r} must be an int")
    return value


def _check_value(prefix: str, key: str, value: Any, kind: Any, check: Check | None) -> None:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{prefix}{key} must be true or false, got {value!r}")
        return
    if isinstance(value, float) and not math.isfinite(value):  # nan and inf alike ("in [0, 1)" says finite already)
        if isinstance(check, Bounds):
            allowed = check.describe(finite=check.low is None or check.high is None)
        else:
            allowed = check.describe() if check is not None else "a finite number"
        raise ValueError(f"{prefix}{key} must be {allowed}, got {value!r}")
    if check is not None and not check.accepts(value):
        raise ValueError(f"{prefix}{key} must be {check.describe()}, got {value!r}")
    if kind is int and not _matches(value, int):
        raise ValueError(f"{prefix}{key} must be an integer, got {value!r}")
    if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # it would become inf in the float32 tensors it meets
        raise ValueError(f"{prefix}{key} must be at most {FLOAT32_MAX:.3g} in size (float32's largest), got {value!r}")
    if kind in (int, float, str) and check is None and not _matches(value, kind):
        raise ValueError(f"{prefix}{key} must be {'an' if kind is int else 'a'} {_TYPE_NAMES[kind]}, got {value!r}")


def _matches(value: Any, kind: type) -> bool:
    if kind is float:
        return is_number(value)
    if kind is int:
        return is_integer(value)
    return isinstance(value, kind)


def describe_table(rows: Sequence[HyperparameterInfo]) -> str:
    """A fixed-width table of keys: key, type, default, allowed values and meaning."""
    if not rows:
        return "  (no hyperparameters)"
    cells = [(r.key, r.type_name, repr(r.default), r.allowed, r.help) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join(
        f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {a:<{widths[3]}}  {h}" for k, t, d, a, h in cells
    )


def check_config(name: str, expected: type, config: Any) -> None:
    """``config`` is an instance of a formulation's or solver's ``Config`` class ``expected`` with no keys of its own.

    Raises:
        ValueError: For another class, or a subclass that adds keys (``SLRConfig`` given to ``admm``: its ``M``
            would be ignored).
    """
    if not isinstance(config, expected):
        raise ValueError(f"{name}: config must be a {expected.__name__}, got {type(config).__name__}")
    extra = sorted({f.name for f in dataclasses.fields(config)} - {f.name for f in dataclasses.fields(expected)})
    if extra:
        raise ValueError(
            f"{name}: config must be a {expected.__name__}, got {type(config).__name__}, whose "
            f"{', '.join(extra)} mean nothing to {name}"
        )
