"""Pieces every benchmark script shares: the command line it records and how results are written."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["command_line", "torch_threads", "write_results"]


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as a user would retype it: interpreter, script and arguments, shell-quoted.

    Args:
        script: The script path to show when ``argv`` is given (``main`` called from Python).
        argv: The arguments given to ``main``; ``None`` means ``sys.argv``.
    """
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return shlex.join([python, *(sys.argv if argv is None else [script, *argv])])


def write_results(out: Path, markdown: str, payload: dict[str, Any]) -> None:
    """Writes ``results.md`` and ``results.json`` (indented, newline-terminated) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[int]:
    """Runs the block with ``torch.set_num_threads(count)`` (as is if ``None``); yields the count in
    effect and restores the previous one on exit."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
