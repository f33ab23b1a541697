"""A name -> class registry: training formulations and layer-wise solvers are picked by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes registered under unique names, each with a one-line ``description``.

    Args:
        kind: What the entries are, for error messages (``"formulation"``, ``"layer-wise solver"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator adding the class under ``name`` (and setting its ``name``).

        Raises:
            ValueError: If ``name`` is already registered.
        """

        def decorate(cls: T) -> T:
            if name in self._classes:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def describe(self) -> dict[str, str]:
        """``{name: one-line description}``."""
        return {name: self._classes[name].description for name in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def get(self, name: str, unknown: str) -> T:
        """The class registered as ``name``.

        Args:
            name: The name looked up.
            unknown: Error message prefix for an unknown name; the known names are appended.

        Raises:
            ValueError: For an unknown name, listing the known ones.
        """
        if name not in self._classes:
            raise ValueError(f"{unknown}{', '.join(self.names())}")
        return self._classes[name]
