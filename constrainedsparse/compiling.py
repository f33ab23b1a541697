"""The library's bookkeeping kept out of a step function you compile with ``torch.compile``.

A step function compiled around ``f.backward(batch)`` traces the formulation's Python too. Traced, its
bookkeeping (caches keyed on in-place versions, one hook per pruned tensor) put guards on values that change at
every step or differ per tensor: a recompile per step or per layer until torch's recompile limit, then eager
frames that still check every guard (an ``slr`` step 7 × slower than eager on a 12-layer MLP). Functions marked
:func:`outside_compile` run eagerly between the compiled graphs instead.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["outside_compile"]

F = TypeVar("F", bound=Callable[..., Any])


def outside_compile(fn: F) -> F:
    """``fn`` as ``torch.compiler.disable(fn)`` runs it: a graph break, then eager inside, nested calls too.

    Disabled at once when ``torch._dynamo`` is loaded (any ``torch.optim`` optimizer loads it), else on first use
    once it is: it takes about a second to import, and nothing compiles without it. That first-use wrapper is a
    frame the compiler traces, so it specializes on its arguments: give it ones that do not change per call.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.disable(fn)

    disabled: list[Callable[..., Any]] = []  # built at the first call that finds torch._dynamo loaded

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call  # type: ignore[return-value]
