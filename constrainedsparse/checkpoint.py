"""Atomic files and safe checkpoints.

Every file a run writes goes through a temporary file in the same directory and one rename, so a
reader sees the old file or the new one, never half of one; files get the process umask's mode
(0644 normally), like any file a program writes.

Checkpoints hold only tensors, plain containers, numbers and strings, and are read back with
``torch.load(weights_only=True)``: a checkpoint file that carries anything else (a pickled object
whose loading would run code) is refused, with one line, before anything of it is used.
"""

from __future__ import annotations

import contextlib
import enum
import glob
import json
import os
import pickle
import signal
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save

from constrainedsparse.errors import UserInputError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "directory_mode",
    "file_mode",
    "load_checkpoint",
    "optimizer_state_plain",
    "optimizer_state_typed",
    "save_checkpoint",
    "save_weights",
]

CHECKPOINT_FORMAT = "constrainedsparse-checkpoint"
CHECKPOINT_VERSION = 2


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (Linux), else by set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~_umask()


def directory_mode() -> int:
    """The mode a new directory gets under the current umask (``0o777 & ~umask``)."""
    return 0o777 & ~_umask()


def writable(folder: Path, probe: bool = True) -> bool:
    """Whether files may be created in ``folder``: ``os.access``, and (``probe``) one real try.

    ``os.access`` says yes to root on any local folder; where the run must create its directory
    anyway, a probe folder is made and removed at once (a read-only mount refuses it for root too).
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    if not probe:
        return True
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=folder))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM inside the block are held until it ends, then given to the handler in place
    (Python's raises ``KeyboardInterrupt``, the CLI's SIGTERM one ``Terminated``; the default SIGTERM action ends
    the process; an ignored one stays ignored): a file being written is finished first (only in the main thread,
    where Python handles signals; elsewhere a no-op).

    A Ctrl-C of a several-process job that reached a rank inside ``torch.save`` printed that rank's traceback
    (seen once in CI) instead of the one ``interrupted`` line.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) is not None  # None: a handler not set from Python, left alone
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        handler = previous[received[0]]
        if callable(handler):
            handler(received[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(received[0])  # the default action, now that the file is whole


def _atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupts_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, file_mode())  # mkstemp creates 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    _atomic(Path(path), lambda handle: handle.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (indented, sorted keys)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic :func:`torch.save` of a checkpoint dictionary (tensors, containers, numbers, strings).

    The file is marked with the format and version :func:`load_checkpoint` expects.
    """
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    _atomic(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Raises:
        UserInputError: With one line if the path is not a readable file, the file is not a
            checkpoint (empty, truncated, random bytes, another pickle) or it carries anything
            beyond tensors, containers, numbers and strings (nothing of it is executed).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"--resume needs {path}, which does not exist")
    if not path.is_file():
        raise UserInputError(f"--resume: {path} is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles on stderr: the error line says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling failed"
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds objects other than tensors, containers, numbers and strings (refused unread)"
        raise UserInputError(f"--resume: {path} is not a constrainedsparse checkpoint: {reason}") from None
    # Random bytes read as a legacy pickle stream fail inside torch.load with whatever the bytes decode to
    # (a KeyError for an unknown opcode's argument, an IndexError, ...): all mean an unreadable file.
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        # The bytes' own reading ("174812789" from a KeyError) means nothing without what raised it.
        detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise UserInputError(
            f"--resume: {path} is not a readable checkpoint (damaged or truncated; {detail})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(f"--resume: {path} is not a constrainedsparse checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserInputError(
            f"--resume: {path} has checkpoint version {state.get('version')!r}; this release reads "
            f"version {CHECKPOINT_VERSION}"
        )
    return state


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic ``.safetensors`` write (tensors made contiguous and moved to CPU), synced to disk before it replaces
    ``path`` and with interrupts deferred, as every other write of a run (:func:`atomic_write_bytes`); a temporary
    file that a killed writer left next to ``path`` more than an hour ago is removed."""
    path = Path(path)
    tensors = _unshared({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    _remove_stale_temporaries(path)
    _atomic(path, lambda handle: handle.write(save(tensors, metadata=metadata)))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor that shares memory with one before it (tied weights, a module under two names) as a copy of its
    own: safetensors refuses shared memory, and a plain ``load_state_dict`` of the file wants every key."""
    storages: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in storages else tensor
        if tensor.numel():
            storages.add(storage)
    return out


_STALE_SECONDS = 3600.0


def _remove_stale_temporaries(path: Path) -> None:
    """Removes ``.NAME.*.tmp`` files next to ``path`` older than :data:`_STALE_SECONDS` (a writer killed outright;
    a younger one may be another process's write under way)."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_SECONDS:
                tmp.unlink()


def optimizer_state_plain(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's ``state_dict()`` that ``torch.load(weights_only=True)`` reads: enum hyperparameters of its
    param groups (Cooper's ``nuPI`` keeps ``init_type``) as their values; :func:`optimizer_state_typed` undoes it."""
    groups = [{k: v.value if isinstance(v, enum.Enum) else v for k, v in g.items()} for g in state["param_groups"]]
    return {**state, "param_groups": groups}


def optimizer_state_typed(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (from :func:`optimizer_state_plain`) with the values of ``optimizer``'s enum hyperparameters made
    enums again, as its ``load_state_dict`` needs them."""
    groups = []
    for current, saved in zip(optimizer.param_groups, state.get("param_groups", [])):
        kinds = {k: type(v) for k, v in current.items() if isinstance(v, enum.Enum)}
        groups.append({k: kinds[k](v) if k in kinds and not isinstance(v, enum.Enum) else v for k, v in saved.items()})
    return {**state, "param_groups": groups + list(state.get("param_groups", []))[len(groups) :]}
