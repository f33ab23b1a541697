"""``run --nproc N``: the elastic launcher, and how a failing rank's one line reaches the user.

:func:`launch` starts ``python -m constrainedsparse run ...`` on N local processes with torch's
elastic launcher (what ``torchrun --standalone`` does); every rank reports its own error with
:func:`report_error`, and the launcher prints the line of the rank that failed first on its own
(:func:`root_cause`), not of the ranks that merely lost it as a peer. The collectives themselves
are in :mod:`constrainedsparse.distributed`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from constrainedsparse.distributed import ENV_LAUNCHED, is_main_process, joined_group, rank
from constrainedsparse.errors import Terminated

__all__ = ["ENV_LAUNCHER_PID", "die_with_launcher", "launch", "lost_peer", "report_error", "root_cause"]


def report_error(message: str, *, peer: bool = False, code: int = 1) -> None:
    """Reports a rank's one-line error: to the elastic error file, and on stderr.

    Under :func:`launch` nothing is printed (the launcher prints the first failing rank's line).
    Under plain torchrun an error raised before the process group existed (bad input, the same on
    every rank) is printed by rank 0 only; later errors by the rank that raised them.

    Args:
        message: The one-line message.
        peer: True if this rank stopped because another rank failed (never reported as the cause
            when a rank that raised on its own exists).
        code: The exit status the rank exits with (2 for bad input), recorded so that the job
            exits with it even if the process ends otherwise (gloo's threads can abort a rank at
            teardown, after it reported: ``terminate called without an active exception``).
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        now = time.time()
        record = {
            "message": {
                "message": message,
                "extraInfo": {"timestamp": str(int(now)), "py_callstack": message},
            },
            "constrainedsparse": {"time": now, "peer": peer, "rank": rank(), "code": code},
        }
        with contextlib.suppress(OSError):
            _write_atomically(Path(error_file), json.dumps(record))
    if os.environ.get(ENV_LAUNCHED):
        return
    if joined_group():
        print(f"error: rank {rank()}: {message}", file=sys.stderr)
    elif is_main_process():
        print(f"error: {message}", file=sys.stderr)


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader sees no file or the whole file.

    A rank that lost its peer can be aborted by gloo's worker threads at any moment; written in
    place, its error file could be left empty, and the elastic agent then fails on parsing it
    (``JSONDecodeError``) instead of reporting the rank that raised first.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


_PEER_LOST = ("closed by peer", "reset by peer", "remote worker", "Broken pipe", "Socket Timeout")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` says that another rank went away (gloo/NCCL errors after a peer exited)."""
    return isinstance(err, dist.DistError) or any(text in str(err) for text in _PEER_LOST)


def root_cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure to report, the earliest of the first kind present.

    In order: a rank that raised on its own; a rank that died without a report (an abort, a
    segfault, an exit code); a rank killed by SIGKILL (mostly from outside, a kill -9 or the out-of-memory
    killer: the agent stops the other ranks with SIGTERM and sends SIGKILL only to one still alive 30 s
    later); a rank stopped by SIGTERM
    (from outside, or by the agent after another rank failed); a rank that only lost a peer. Ranks
    without a report all carry the agent's whole-second collection time, so within a kind ties go to
    the lower rank.
    """
    signalled = {-signal.SIGKILL: 2, -signal.SIGTERM: 3}

    def key(item: tuple[int, Any]) -> tuple[int, float, int]:
        global_rank, failure = item
        data = _reported(failure)
        if "time" in data:
            kind = 4 if data.get("peer", False) else 0
        else:
            kind = signalled.get(failure.exitcode, 1)
        return (kind, float(data.get("time", failure.timestamp)), global_rank)

    return min(failures.items(), key=key)


def _reported(failure: Any) -> dict[str, Any]:
    """What the rank wrote with :func:`report_error` (empty if it wrote nothing)."""
    data = failure.error_file_data
    return data.get("constrainedsparse", {}) if isinstance(data, dict) else {}


def _exit_code(failure: Any) -> int:
    """The exit status the failing rank reported, else its process's (1 for a signal)."""
    data = _reported(failure)
    if isinstance(data.get("code"), int):
        return data["code"]
    return failure.exitcode if failure.exitcode > 0 else 1


def _failure_line(global_rank: int, failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message).strip().splitlines()[0] if str(message).strip() else ""
    if not message or "pytorch.org/docs/stable/elastic/errors" in message:
        message = f"exited with code {failure.exitcode}"
    return f"rank {global_rank}: {message}"


ENV_LAUNCHER_PID = "CONSTRAINEDSPARSE_LAUNCHER_PID"
"""The launcher's process id, for its workers (:func:`die_with_launcher`)."""
_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """In a rank that :func:`launch` started (Linux): SIGTERM when the launcher dies, even by SIGKILL, instead of
    running on unattended (holding the run folder's lock); at once if it is gone already. Elsewhere a no-op."""
    launcher = os.environ.get(ENV_LAUNCHER_PID)
    if not os.environ.get(ENV_LAUNCHED) or not launcher or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl: the launcher's own stop still reaches the workers
        return
    if os.getppid() != int(launcher):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def launch(nproc: int, args: Sequence[str]) -> tuple[int, str | None]:
    """Runs ``python ARGS`` on ``nproc`` local processes with torch's elastic launcher.

    ``launch(N, ["-m", "constrainedsparse", "run", ...])`` is
    ``torchrun --standalone --nproc_per_node=N -m constrainedsparse run ...`` with no restarts.
    Workers get ``OMP_NUM_THREADS = cpu_count // nproc`` unless it is set.

    Returns:
        ``(exit code, None)`` on success; ``(the failing rank's exit code, "rank R: MESSAGE")`` when
        a rank fails (the one that raised, not the ranks that merely lost it as a peer).

    Raises:
        KeyboardInterrupt: Ctrl-C reached the elastic agent (the workers got it too and stopped,
            each keeping the last checkpoint).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    keys = (ENV_LAUNCHED, ENV_LAUNCHER_PID, "OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ[ENV_LAUNCHED] = "1"
    os.environ[ENV_LAUNCHER_PID] = str(os.getpid())
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The launcher's own failure report would be many lines; its modules' loggers have levels of their own.
    loggers = [logging.getLogger("torch.distributed.elastic")]
    loggers += [
        logger
        for name, logger in list(logging.Logger.manager.loggerDict.items())
        if name.startswith("torch.distributed.elastic.") and isinstance(logger, logging.Logger)
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="constrainedsparse-launch-") as logs:
            config = LaunchConfig(
                min_nodes=1,
                max_nodes=1,
                nproc_per_node=nproc,
                run_id=str(uuid.uuid4()),
                rdzv_backend="c10d",
                rdzv_endpoint="localhost:0",
                max_restarts=0,
                monitor_interval=0.1,
                logs_specs=DefaultLogsSpecs(log_dir=logs),
            )
            try:
                elastic_launch(config, sys.executable)("-u", *args)
            except SignalException as err:  # Ctrl-C or SIGTERM reached the agent: it stopped the workers
                if err.sigval == signal.SIGINT:
                    raise KeyboardInterrupt from None
                if err.sigval == signal.SIGTERM:
                    raise Terminated from None
                raise
            except ChildFailedError as err:
                global_rank, failure = root_cause(err.failures)
                return _exit_code(failure), _failure_line(global_rank, failure)
        return 0, None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
