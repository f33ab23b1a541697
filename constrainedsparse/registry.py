"""One registry of algorithms keyed by (kind, name): training formulations and layer-wise solvers.

``--formulation NAME`` picks from the kind the problem needs (``training`` for a problem with data
and a loss, ``layerwise`` for a pretrained model with calibration data). A name may exist in both
kinds (``magnitude``: gradual magnitude pruning while training, one-shot magnitude per layer).
:func:`constrainedsparse.catalog.describe` lists an entry's hyperparameters from its ``Config``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from constrainedsparse.config import Hyperparameters

__all__ = ["KINDS", "REGISTRY", "Registry", "same_definition"]

KINDS = {"training": "formulation", "layerwise": "layer-wise solver"}


def same_definition(a: type, b: type) -> bool:
    """Whether two classes are one definition loaded twice (same module and qualified name: a problem file
    run again), which may register again and replace the earlier class."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


class Registry:
    """Classes registered under unique (kind, name) pairs, each with a one-line ``description``."""

    def __init__(self) -> None:
        self._classes: dict[tuple[str, str], type] = {}

    def register(self, kind: str, name: str, base: type | None = None) -> Callable[[type], type]:
        """Class decorator adding the class as ``(kind, name)`` (and setting its ``name``).

        The same definition loaded again (a problem file that registers a solver, loaded twice in one
        process: same module and class name) replaces the earlier class.

        Args:
            kind: ``training`` or ``layerwise``.
            name: What ``--formulation`` and ``make``/``prune_layerwise`` call it: letters, digits and
                ``-_.+``, starting with a letter or digit.
            base: The class every entry of this kind subclasses, if checked.

        Raises:
            ValueError: If the kind or the name is not valid, the class is no subclass of ``base``, has no
                one-line ``description``, a ``Config`` that is no ``Hyperparameters`` class or an abstract
                method left, is registered under another name, or the pair is already registered by another
                class.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise ValueError(
                f"a {KINDS[kind]} name is letters, digits and -_.+ (what --formulation takes), got {name!r}"
            )

        def decorate(cls: type) -> type:
            if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
                wanted = f"a {base.__name__} subclass" if base is not None else "a class"
                raise ValueError(f"register {KINDS[kind]} {name!r}: it takes {wanted}, got {cls!r}")
            description = getattr(cls, "description", None)
            if not isinstance(description, str) or not description.strip():
                raise ValueError(
                    f"{KINDS[kind]} {name!r} ({cls.__qualname__}) needs a one-line `description` string (what "
                    "`constrainedsparse formulations` and describe() print)"
                )
            known = self._classes.get((kind, name))
            if known is not None and not same_definition(known, cls):
                raise ValueError(
                    f"{KINDS[kind]} {name!r} is already registered (by {known.__module__}.{known.__qualname__})"
                )
            other = next((n for (k, n), c in self._classes.items() if k == kind and c is cls and n != name), None)
            if other is not None:  # its name would change under the first registration
                raise ValueError(
                    f"{cls.__qualname__} is already registered as {KINDS[kind]} {other!r}: register a subclass "
                    f"under {name!r} (class Other({cls.__qualname__}): ...)"
                )
            config = getattr(cls, "Config", None)
            if config is not None and not (isinstance(config, type) and issubclass(config, Hyperparameters)):
                raise ValueError(
                    f"{KINDS[kind]} {name!r} ({cls.__qualname__}): Config must be a Hyperparameters dataclass "
                    f"(constrainedsparse.config), got {config!r}"
                )
            if config is not None:
                try:
                    config.keys()
                except TypeError as err:  # a key without a default, or declared twice
                    raise ValueError(f"{KINDS[kind]} {name!r} ({cls.__qualname__}): {err}") from None
            missing = sorted(getattr(cls, "__abstractmethods__", ()))
            if missing:
                methods = ", ".join(m + "()" for m in missing)
                owner = base.__name__ if base is not None else "its base class"
                raise ValueError(f"{KINDS[kind]} {name!r} ({cls.__qualname__}) does not implement {methods} of {owner}")
            cls.name = name
            self._classes[(kind, name)] = cls
            return cls

        return decorate

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``, sorted."""
        return sorted(name for k, name in self._classes if k == kind)

    def kinds_of(self, name: str) -> list[str]:
        """The kinds under which ``name`` is registered (in :data:`KINDS` order)."""
        return [kind for kind in KINDS if (kind, name) in self._classes]

    def describe(self, kind: str) -> dict[str, str]:
        """``{name: one-line description}`` of ``kind``."""
        return {name: self._classes[(kind, name)].description for name in self.names(kind)}

    def get(self, kind: str, name: str) -> type:
        """The class registered as ``(kind, name)``.

        Raises:
            ValueError: For an unknown name, listing the known ones of that kind.
        """
        if (kind, name) not in self._classes:
            known = ", ".join(self.names(kind))
            if kind == "training":
                raise ValueError(f"unknown formulation {name!r}; available: {known}")
            raise ValueError(f"unknown layer-wise solver {name!r}; choose one of {known}")
        return self._classes[(kind, name)]


REGISTRY = Registry()
