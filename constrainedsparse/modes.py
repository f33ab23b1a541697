"""Train/eval modes of a model's modules, kept across a block that changes them.

A block that evaluates (SLR's objective on its reference batch, an accuracy, a constraint report, a MAC count)
puts the model in eval mode; after it every module gets back *its own* mode, not the model's: a layer the user
froze in eval mode inside a training model (a BatchNorm whose statistics are kept) stays frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode", "modes_kept"]


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in the mode it had before the block, after it (also when it raises)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training  # not train(): an override of it would change other modules


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, every module in its own mode after it."""
    with modes_kept(model):
        model.eval()
        yield
