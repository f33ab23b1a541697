"""Small data helpers shared by the bundled problems."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_tensors", "stratified_split"]


def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 features and int64 labels."""
    return torch.as_tensor(np.asarray(x), dtype=torch.float32), torch.as_tensor(np.asarray(y), dtype=torch.long)


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A fixed stratified train/test split (the same for every run seed, so runs compare)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        test[rng.choice(idx, size=int(round(test_fraction * len(idx))), replace=False)] = True
    return as_tensors(x[~test], y[~test]), as_tensors(x[test], y[test])
