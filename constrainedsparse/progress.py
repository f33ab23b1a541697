"""Progress that suits where it goes: a bar on a terminal, one line per epoch otherwise.

A run's stderr that is not a terminal (a log file, CI, a pipe) gets no bar redraws, only one short
line per epoch (or block); ``progress=False`` (``--no-progress``) prints nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Progress"]


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
            shown = " ".join(f"{k} {v:.4g}" for k, v in postfix.items())
            seconds = time.perf_counter() - self.started
            print(
                f"{self.desc}: {self.unit} {self.done}/{self.total} {shown} ({seconds:.1f} s)".rstrip(), file=sys.stderr
            )

    def close(self) -> None:
        """Closes the bar."""
        self.bar.close()
