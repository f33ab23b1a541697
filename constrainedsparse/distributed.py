r"""Multi-process training with :mod:`torch.distributed`: DistributedDataParallel, sharded data, rank-0 I/O.

A run started by ``torchrun`` (or by ``constrainedsparse run --nproc N``, which launches the same
through torch's elastic launcher) trains with :class:`~torch.nn.parallel.DistributedDataParallel`
over ``WORLD_SIZE`` processes; backend ``gloo`` on CPU and ``nccl`` on CUDA. Cooper itself knows
nothing about several processes, so this module is where the library goes beyond it. The rule is
that **every rank runs the same code on the same state**, and only the data differ:

* **Batching.** ``batch_size`` stays the *global* batch: each of the N ranks gets ``batch_size / N``
  samples per step (``batch_size`` must be divisible by N). Global batch ``j`` of an epoch is
  exactly the batch ``j`` a one-process run draws (the same shuffled order, dealt out round-robin,
  see :class:`ShardedSampler`), so steps per epoch, learning rates and the dual schedule mean the
  same for any N and a run resumes with another world size. When the dataset size is not
  divisible by N, the last batch repeats up to N - 1 samples (as :class:`DistributedSampler` does).
* **Primal variables.** DDP averages the gradients of the whole primal Lagrangian (loss and every
  constraint term, one backward), so W, the gates' :math:`\log\alpha` and the Adam state stay
  bit-identical on every rank. The model is wrapped *per phase*, after the formulation attached
  its parametrizations (masks, gates), so DDP sees the parameters that are trained.
* **Dual variables.** Never broadcast: Z and Λ of ``slr``/``admm`` are functions of the synchronised
  W; the density constraints of ``l0`` depend only on the gates. What depends on a rank's data is
  reduced *before* any dual decision: the loss ``f`` of SLR's surrogate conditions (each rank
  evaluates its shard of the reference batch, :func:`weighted_mean`) and the violations of
  data-dependent user constraints (:func:`synchronised`), so every rank takes the same branch and
  applies the same multiplier update.
* **Gate noise.** Every rank draws the *same* hard-concrete noise (the formulation's generator has
  the same seed and is advanced the same way everywhere): an N-process ``l0`` run is the
  one-process algorithm with the global batch, and a resumed run continues the same noise stream
  with any world size.
* **Files.** Only rank 0 logs (JSONL, wandb), checkpoints and writes ``summary.json`` and weights;
  the other ranks create no files (but see :data:`ENV_DEBUG_STATE_DIR`). A resumed run reads the
  checkpoint on rank 0 and sends it to the others once.

Environment variables (deployment knobs, not hyperparameters):

* :data:`ENV_TIMEOUT` (``CONSTRAINEDSPARSE_DIST_TIMEOUT``): collective timeout in seconds (default 1800).
* :data:`ENV_FIND_UNUSED` (``CONSTRAINEDSPARSE_FIND_UNUSED_PARAMETERS=1``): DDP's
  ``find_unused_parameters``, for models with parameters that get no gradient in some steps.
* :data:`ENV_DEBUG_STATE_DIR` (``CONSTRAINEDSPARSE_DEBUG_STATE_DIR=DIR``): every rank writes
  ``DIR/<tag>-rank<r>.pt`` (masks, formulation state, model state) at the end of pruning and of
  the run, to check that ranks agree bit for bit (what the tests do).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from constrainedsparse.batches import map_tensors
from constrainedsparse.usercode import collate_fn

__all__ = [
    "ENV_DEBUG_STATE_DIR",
    "ENV_FIND_UNUSED",
    "ENV_LAUNCHED",
    "ENV_TIMEOUT",
    "ShardedSampler",
    "broadcast_buffers",
    "broadcast_module",
    "broadcast_object",
    "check_global_batch",
    "dump_rank_state",
    "env_world_size",
    "exit_process",
    "gather_objects",
    "is_distributed",
    "is_main_process",
    "joined_group",
    "loader",
    "process_group",
    "rank",
    "rank_device",
    "shard",
    "synchronised",
    "weighted_mean",
    "world_size",
    "wrap",
]

ENV_TIMEOUT = "CONSTRAINEDSPARSE_DIST_TIMEOUT"
ENV_FIND_UNUSED = "CONSTRAINEDSPARSE_FIND_UNUSED_PARAMETERS"
ENV_DEBUG_STATE_DIR = "CONSTRAINEDSPARSE_DEBUG_STATE_DIR"
ENV_LAUNCHED = "CONSTRAINEDSPARSE_LAUNCHED"
"""Set by :func:`launch` for its workers: they report errors to the launcher instead of printing them."""

_started = False  # whether this process joined a process group (errors after that are rank-specific)


# --- where am I ---------------------------------------------------------------------------------


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks: the process group's, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


_this_rank = rank


def is_main_process() -> bool:
    """Rank 0 (the only rank that writes files)."""
    return rank() == 0


def rank_device(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per process); others unchanged."""
    if device == "cuda" and env_world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def check_global_batch(batch_size: int, processes: int | None = None, *, given: bool = True) -> None:
    """Raises ``ValueError`` unless ``batch_size`` (the global batch) splits evenly over the ranks
    (``processes``, default :func:`world_size`); ``given``: the user set it (else it is the problem's default)."""
    n = world_size() if processes is None else processes
    if batch_size % n:
        what = f"--set batch_size={batch_size}" if given else f"the problem's batch size {batch_size}"
        hint = "" if given else "; choose one with --set batch_size=N"
        raise ValueError(
            f"{what} must be divisible by the number of processes ({n}): "
            f"batch_size is the global batch, split evenly over the ranks{hint}"
        )


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Joins the torchrun job's process group for the block (gloo on CPU, nccl on CUDA).

    A no-op when not launched with ``WORLD_SIZE > 1`` or when a group is already initialised (by
    the caller, who then also owns its teardown).
    """
    global _started
    if env_world_size() <= 1 or dist.is_initialized():
        yield
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    timeout = datetime.timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, "1800")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    _started = True
    yield  # on an error the group is left as is: the process is about to exit, and tearing down a
    # group whose peers are gone can block (the launcher then ends this rank)
    dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Ends the process with ``code``; a rank of a multi-process job skips interpreter finalization.

    Objects that still hold the gloo process group (a DDP reducer in a reference cycle, pending
    work) can outlive :func:`process_group`'s teardown; if they are destroyed during interpreter
    finalization, gloo's worker threads may abort the process ("terminate called without an active
    exception", SIGABRT), and the launcher then fails a job whose files are all written. Every file
    of a run is closed and the wandb run finished before this point, so a rank flushes its streams
    and logging and leaves with ``os._exit``. A single process exits normally.
    """
    if env_world_size() <= 1:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


# --- primal side: DDP and data ------------------------------------------------------------------


class _Wrapper(nn.parallel.DistributedDataParallel):
    """``DistributedDataParallel`` that remembers the parameters (names and objects) and buffer names it was
    built over."""

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
        self.layout = (list(module.named_parameters()), [n for n, _ in module.named_buffers()])


def _same_layout(model: nn.Module, wrapper: _Wrapper) -> bool:
    """Whether ``model`` trains the very parameters, under the same names, and holds the same buffers
    as when ``wrapper`` was built (registering a parametrization renames ``weight``)."""
    params, buffers = wrapper.layout
    now = list(model.named_parameters())
    return (
        len(now) == len(params)
        and all(n == m and p is q for (n, p), (m, q) in zip(now, params))
        and [n for n, _ in model.named_buffers()] == buffers
    )


def wrap(model: nn.Module, current: nn.Module | None = None) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    Wrapping broadcasts rank 0's parameters and buffers once; afterwards gradients are averaged at
    every backward and buffers (BatchNorm statistics, masks) broadcast from rank 0 at every forward.
    DDP must be built *after* parametrizations are registered (one registered later leaves its
    parameter without gradient averaging), so the engine calls this at every epoch start with the
    wrapper in use: ``current`` is returned as is while the model's parameters and buffers are
    unchanged, and a new wrapper is built when a formulation registered or removed masks or gates.
    """
    if not is_distributed():
        return model
    if isinstance(current, _Wrapper) and current.module is model and _same_layout(model, current):
        return current
    device = next(model.parameters()).device
    return _Wrapper(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=os.environ.get(ENV_FIND_UNUSED, "") not in ("", "0"),
    )


def _permutation(n: int, seed: int) -> list[int]:
    """The order a one-process run's ``DataLoader(shuffle=True, generator=seed)`` visits ``range(n)``
    (taken from a DataLoader itself, so it matches whatever that DataLoader draws from the generator)."""
    generator = torch.Generator().manual_seed(seed)
    return next(iter(DataLoader(range(n), batch_size=max(n, 1), shuffle=True, generator=generator))).tolist()


class ShardedSampler(Sampler[int]):
    """Rank ``r`` of ``N`` gets positions ``r, r + N, r + 2N, ...`` of the one-process shuffled order.

    With per-rank batches of ``B / N`` samples, per-rank batch ``j`` of every rank together is the
    one-process batch ``j`` of size ``B``. The order is padded with its first entries to a multiple
    of N so every rank runs the same number of steps.

    Args:
        size: Dataset length.
        seed: The generator seed of the one-process loader.
        num_replicas: N (default: :func:`world_size`).
        rank: r (default: :func:`rank`).
    """

    def __init__(self, size: int, seed: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.size = size
        self.seed = seed
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = _this_rank() if rank is None else rank
        self.num_samples = -(-size // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = _permutation(self.size, self.seed)
        padding = self.num_samples * self.num_replicas - len(order)
        order += (order * (padding // max(len(order), 1) + 1))[:padding]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


def loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """This rank's loader: batches of ``batch_size / N`` from :class:`ShardedSampler`."""
    sampler = ShardedSampler(len(dataset), seed)
    return DataLoader(
        dataset, batch_size=batch_size // sampler.num_replicas, sampler=sampler, collate_fn=collate_fn(dataset)
    )


def shard(batch: Any) -> Any:
    """This rank's rows ``r::N`` of every tensor of a batch every rank holds (e.g. SLR's reference batch)."""
    if not is_distributed():
        return batch
    return map_tensors(batch, lambda t: t[rank() :: world_size()])


# --- reductions before dual decisions -----------------------------------------------------------


def weighted_mean(value: torch.Tensor, count: int) -> torch.Tensor:
    """Mean over ranks of per-rank means ``value``, each weighted by its sample ``count``.

    One all-reduce of two numbers; the result is the same on every rank (identity in one process).
    """
    if not is_distributed():
        return value
    total = value.detach().to(torch.float64) * count if count else value.new_zeros((), dtype=torch.float64)
    packed = torch.stack([total, value.new_tensor(count, dtype=torch.float64)])
    dist.all_reduce(packed)
    return (packed[0] / packed[1]).to(value.dtype)


def synchronised(violation: torch.Tensor) -> torch.Tensor:
    """A data-dependent violation whose *value* is its mean over ranks and whose gradient is this rank's.

    Dual updates (and restarts) read the value, identical on every rank; the primal gradient is the
    rank's own, which DDP then averages: the gradient of the mean.
    """
    if not is_distributed():
        return violation
    mean = violation.detach().clone()
    dist.all_reduce(mean)
    mean /= world_size()
    return violation + (mean - violation).detach()


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Copies rank 0's buffers (BatchNorm statistics, masks) to every rank."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copies rank 0's parameters and buffers to every rank (once, e.g. a dense model only rank 0 loaded)."""
    if not is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled once; for one-off state such as a checkpoint)."""
    if not is_distributed():
        return obj
    holder = [obj if is_main_process() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def dump_rank_state(tag: str, state: dict[str, Any]) -> None:
    """Writes ``state`` to ``$CONSTRAINEDSPARSE_DEBUG_STATE_DIR/<tag>-rank<r>.pt`` (only when set)."""
    folder = os.environ.get(ENV_DEBUG_STATE_DIR)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(folder) / f"{tag}-rank{rank()}.pt")


def joined_group() -> bool:
    """Whether this process joined a process group (errors after that are rank-specific)."""
    return _started
