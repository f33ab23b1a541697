"""Progress that suits where it goes: a bar on a terminal, one line per epoch otherwise.

A run's stderr that is not a terminal (a log file, CI, a pipe) gets no bar redraws, only one short
line per epoch (or block); ``progress=False`` (``--no-progress``) prints nothing at all.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Progress", "transformers_bars_off", "transformers_quiet"]


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """``transformers``' own messages (load reports, hints) down to errors inside, restored after."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """``transformers``' own progress bars off inside (saving shards, reading a GGUF file), restored after:
    the library's bars are its own, and ``--no-progress`` / ``progress=False`` mean none at all."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # a model with save_pretrained that is not transformers' (huggingface_hub's mixin)
        yield
        return
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_reader
    except ImportError:  # a transformers without the GGUF reader
        gguf_reader = None
    was_on = hf_logging.is_progress_bar_enabled()
    gguf_bar = getattr(gguf_reader, "tqdm", None)  # the GGUF reader calls tqdm itself, not transformers' wrapper
    hf_logging.disable_progress_bar()
    if gguf_bar is not None:
        gguf_reader.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_bar is not None:
            gguf_reader.tqdm = gguf_bar
        if was_on:
            hf_logging.enable_progress_bar()


class Progress:
    """Counts steps of ``total`` units (epochs of steps, or blocks) with a bar or per-unit lines.

    Args:
        total: Units (epochs, blocks) to go.
        desc: What is progressing (``"prune slr"``).
        enabled: ``False`` prints nothing.
        initial: Units already done (a resumed run).
        steps_per_unit: Steps per unit for the bar's resolution (1: the bar counts units).
        unit: Name of a unit in the per-unit lines.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        *,
        initial: int = 0,
        steps_per_unit: int = 1,
        unit: str = "epoch",
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = initial
        self.started = time.perf_counter()
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(
            total=total * steps_per_unit,
            initial=initial * steps_per_unit,
            desc=desc,
            unit="step" if steps_per_unit > 1 else unit,
            disable=not enabled or self.lines,
        )

    def step(self, **postfix: Any) -> None:
        """One step of the current unit (a minibatch); shown on the bar only."""
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)

    def epoch_done(self, **postfix: Any) -> None:
        """One unit done: a bar advances (when it counts units), a line is printed otherwise."""
        self.done += 1
        if self.bar.total == self.total:
            self.step(**postfix)
        if self.lines:
            shown = "".join(f" {k} {v:.4g}" for k, v in postfix.items())
            seconds = time.perf_counter() - self.started
            print(f"{self.desc}: {self.unit} {self.done}/{self.total}{shown} ({seconds:.1f} s)", file=sys.stderr)

    def close(self) -> None:
        """Closes the bar."""
        self.bar.close()
