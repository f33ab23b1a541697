"""What an evaluation leaves as it was: the modules' train/eval modes and the global random streams.

A block that evaluates (SLR's objective on its reference batch, an accuracy, a constraint report, a MAC count)
puts the model in eval mode; after it every module gets back *its own* mode, not the model's: a layer the user
froze in eval mode inside a training model (a BatchNorm whose statistics are kept) stays frozen. A forward the
library adds to the user's run (sizing a constraint, SparsityTrainer's checks) draws from no stream the training
reads (:func:`random_states_kept`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["eval_mode", "modes_kept", "random_states_kept"]


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


@contextlib.contextmanager
def random_states_kept() -> Iterator[None]:
    """torch's CPU generator, Python's ``random`` and NumPy's global state as they were after the block."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
