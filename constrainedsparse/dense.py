"""The dense model a training run starts from, cached; data order and evaluation of training runs.

The dense model is the problem's model trained for ``--pretrain-epochs`` with Adam, cached per
(problem file, options, lr, batch size, device kind, seed, epochs) under :func:`cache_dir`; a damaged
cache file (a partial copy) is detected, removed and retrained. Every random choice derives from
the run's seed (the constants below), so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from constrainedsparse import distributed
from constrainedsparse.batches import to_device
from constrainedsparse.checkpoint import save_weights, writable
from constrainedsparse.errors import NonFiniteLossError, UserInputError
from constrainedsparse.modes import eval_mode
from constrainedsparse.progress import Progress
from constrainedsparse.spec import Problem
from constrainedsparse.usercode import collate_fn

__all__ = ["DenseRecipe", "cache_dir", "dense_model", "evaluate", "loader", "reference_batch", "seed_everything"]

EVAL_BATCH = 1024
# Seeds derived from --seed: the dense model uses the seed itself, pruning seed + PRUNE_SEED_OFFSET,
# every epoch's shuffling (seed, phase, epoch) through LOADER_SEED_* and the reference batch REFERENCE_SEED_*.
PRUNE_SEED_OFFSET = 1
LOADER_SEED_MULTIPLIER, LOADER_PHASE_MULTIPLIER = 1_000_003, 10_007
REFERENCE_SEED_MULTIPLIER, REFERENCE_SEED_OFFSET = 7_919, 13
DENSE_PHASE, PRUNE_PHASE, RETRAIN_PHASE = -1, 0, 1
BATCHNORM_PHASE = 2
"""Loader phase of the batches that re-estimate BatchNorm statistics after the hard prune."""


def cache_dir() -> Path:
    """Where dense models are cached: ``$CONSTRAINEDSPARSE_CACHE`` or ``~/.cache/constrainedsparse``."""
    return Path(os.environ.get("CONSTRAINEDSPARSE_CACHE", Path.home() / ".cache" / "constrainedsparse"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def random_states() -> dict[str, Any]:
    """The global generators' states (torch's CPU one and, once used, the current CUDA device's; Python's;
    NumPy's) in the types a ``torch.load(weights_only=True)`` reads back: what a resumed run restores. The
    CUDA state is the current device's only: every process of a run seeds its device alike, and each restores
    its own device from rank 0's."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(states: dict[str, Any] | torch.Tensor) -> None:
    """Restores what :func:`random_states` returned (an earlier version's checkpoint holds torch's CPU state only)."""
    if isinstance(states, torch.Tensor):
        torch.set_rng_state(states)
        return
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def loader(dataset: Dataset, batch_size: int, seed: int, phase: int, epoch: int) -> DataLoader:
    """Shuffled batches whose order depends only on (seed, phase, epoch): resumable.

    Under torchrun each rank gets its share of every (global) batch, see :func:`distributed.loader`.
    """
    generator_seed = seed * LOADER_SEED_MULTIPLIER + phase * LOADER_PHASE_MULTIPLIER + epoch
    if distributed.is_distributed():
        return distributed.loader(dataset, batch_size, generator_seed)
    generator = torch.Generator().manual_seed(generator_seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate_fn(dataset))


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module, dataset: Dataset) -> float:
    """The problem's metric over the whole of ``dataset`` (on the model's device), computed once.

    The outputs and targets of every batch are concatenated and the metric is evaluated on all of
    them (a mean of batch values is wrong for R², AUC or F1). Under torchrun every rank predicts a
    shard (with rank 0's buffers) and the shards are gathered before the metric.
    """
    device = next(model.parameters()).device
    distributed.broadcast_buffers(model)
    if distributed.is_distributed():
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    outputs, targets = [], []
    # Its own generator: an evaluation takes no draw from the global one (training's dropout stream).
    with eval_mode(model):
        for batch in DataLoader(
            dataset, batch_size=EVAL_BATCH, generator=torch.Generator(), collate_fn=collate_fn(dataset)
        ):
            output, y = problem.predicted(model, to_device(batch, device))
            outputs.append(output.detach().cpu())
            targets.append(y.detach().cpu())
    if distributed.is_distributed():
        shards = distributed.gather_objects((outputs, targets))
        outputs = [o for shard_outputs, _ in shards for o in shard_outputs]
        targets = [t for _, shard_targets in shards for t in shard_targets]
    outputs = torch.cat(outputs)
    bad = int(outputs.isnan().sum()) if outputs.is_floating_point() else 0
    if bad:  # the metric of nan outputs is a number that means nothing (accuracy takes argmax of nan); -inf is a mask
        raise UserInputError(
            f"problem {problem.name!r}: {bad} of the model's {outputs.numel()} outputs on the test set are nan (from "
            "nan in the test set's inputs, or in the model)"
        )
    return problem.test_metric(outputs, torch.cat(targets))


@dataclasses.dataclass(frozen=True)
class DenseRecipe:
    """Everything that shapes a problem's dense model (and so its cache key).

    Attributes:
        problem: The problem (its model, data, loss).
        options: The problem options.
        lr: Adam's learning rate.
        batch_size: The minibatch size.
        device: Where it trains (a CUDA-trained model is not the CPU one: the kind is in the key).
        seed: The seed.
        pretrain_epochs: Training epochs.
        progress: Show progress.
    """

    problem: Problem
    options: dict[str, Any]
    lr: float
    batch_size: int
    device: str
    seed: int
    pretrain_epochs: int
    progress: bool = True


def dense_cache_path(recipe: DenseRecipe) -> Path:
    """The cache file of the recipe's dense model.

    Its key holds the problem file's bytes (not the modules it imports, nor data files it reads), the
    options, ``lr``, ``batch_size``, the device type and the torch and constrainedsparse versions (the
    pre-training loop and the bundled data generators are theirs); the seed and pre-training epochs name
    the file. Not the thread or process count: those change a dense model's last digits only, and a run
    resumed on other threads or with another ``--nproc`` must find the dense model it started from.
    """
    from constrainedsparse import __version__

    device = torch.device(recipe.device).type
    key = json.dumps(
        {
            "options": recipe.options,
            "lr": recipe.lr,
            "batch": recipe.batch_size,
            # CUDA kernels round differently: a GPU-trained dense model is not the CPU one.
            "device": device,
            "torch": torch.__version__,
            "constrainedsparse": __version__,
        },
        sort_keys=True,
        default=str,
    )
    tag = f"{recipe.problem.cache_tag()}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return cache_dir() / "dense" / f"{tag}-seed{recipe.seed}-pre{recipe.pretrain_epochs}.safetensors"


def _trained_with() -> dict[str, int]:
    """What a cache file records of the run that trained it: its threads and processes (its last digits)."""
    return {"threads": torch.get_num_threads(), "processes": distributed.world_size()}


def _recorded(path: Path) -> dict[str, int]:
    """The threads and processes a cached dense model was trained with (none for a file written before they were
    recorded)."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return {key: int(metadata[key]) for key in ("threads", "processes") if metadata.get(key, "").isdigit()}


def _load_cached(model: nn.Module, path: Path, device: str) -> bool:
    """Loads a cached dense model; a damaged file (partial copy, other shapes) is removed and retrained."""
    try:
        model.load_state_dict(load_file(path, device=str(device)))
        return True
    except (SafetensorError, RuntimeError, OSError, KeyError, ValueError) as err:
        print(
            f"warning: the cached dense model {path} is damaged ({type(err).__name__}); retraining it", file=sys.stderr
        )
        path.unlink(missing_ok=True)
        return False


def _unwritable(folder: Path) -> str | None:
    """Why the dense-model cache ``folder`` cannot take a file, or ``None`` if it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        reason = None if writable(folder) else "not writable"
    except OSError as err:
        reason = err.strerror or type(err).__name__
    if reason is None:
        return None
    return (
        f"the dense-model cache {folder} cannot be written ({reason}): set CONSTRAINEDSPARSE_CACHE to a writable folder"
    )


def dense_model(recipe: DenseRecipe, train: Dataset, test: Dataset) -> tuple[nn.Module, float, dict[str, Any]]:
    """The problem's dense model after pre-training, its test metric, and its cache file with whether it was
    loaded from it and the threads and processes that trained it (``{"file", "loaded", "threads", "processes"}``,
    :func:`dense_cache_path`; a file from before they were recorded has neither)."""
    problem, seed, device = recipe.problem, recipe.seed, recipe.device
    seed_everything(seed)
    model = problem.built_model(recipe.options).to(device)
    path = dense_cache_path(recipe)
    if distributed.broadcast_object(path.is_file()):  # rank 0's cache decides (multi-node: caches may differ)
        loaded = _load_cached(model, path, device) if distributed.is_main_process() else True
        if distributed.broadcast_object(loaded):
            distributed.broadcast_module(model)
            trained = distributed.broadcast_object(_recorded(path) if distributed.is_main_process() else None)
            return model, evaluate(problem, model, test), {"file": str(path), "loaded": True, **trained}
        seed_everything(seed)
        model = problem.built_model(recipe.options).to(device)
    unwritable = distributed.broadcast_object(_unwritable(path.parent) if distributed.is_main_process() else None)
    if unwritable:  # before pre-training, not after it
        raise UserInputError(unwritable)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    forward = distributed.wrap(model)
    progress = Progress(recipe.pretrain_epochs, f"dense {problem.name}", recipe.progress)
    for epoch in range(recipe.pretrain_epochs):
        for batch in loader(train, recipe.batch_size, seed, DENSE_PHASE, epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = problem.batch_loss(forward, to_device(batch, device))
            loss.backward()
            optimizer.step()
        if not math.isfinite(loss.item()):
            progress.close()
            raise NonFiniteLossError(
                f"dense pre-training loss became {loss.item()} in epoch {epoch + 1}; nothing was cached "
                "(lower --set lr, or check the training set for nan/inf)"
            )
        progress.epoch_done(loss=loss.item())
    progress.close()
    trained = _trained_with()
    if distributed.is_main_process():  # safetensors metadata holds text
        save_weights(path, model.state_dict(), metadata={key: str(value) for key, value in trained.items()})
    return model, evaluate(problem, model, test), {"file": str(path), "loaded": False, **trained}


def collate_samples(dataset: Dataset, indices: Iterable[int]) -> Any:
    """The samples at ``indices`` as one batch, collated as a ``DataLoader`` would, without one: a
    ``DataLoader``'s iterator draws a seed from torch's global generator, which a resumed run has just
    restored (dropout after a resume would then take other draws)."""
    return (collate_fn(dataset) or default_collate)([dataset[index] for index in indices])


def reference_batch(train: Dataset, seed: int, size: int) -> Any:
    """A fixed batch of ``min(size, len(train))`` training samples drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed * REFERENCE_SEED_MULTIPLIER + REFERENCE_SEED_OFFSET)
    return collate_samples(train, torch.randperm(len(train), generator=generator)[:size].tolist())
