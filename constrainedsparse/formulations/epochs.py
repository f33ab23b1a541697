"""Where a formulation's caller is in its run: the epoch under way and its ``post_step()`` calls.

:class:`EpochCount` is the lifecycle's only changing count (what a state records as ``epoch_steps``) and
warns, once each, when the caller's loop departs from what ``setup()`` declared.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from constrainedsparse.errors import as_int, user_stacklevel

__all__ = ["EpochCount", "checked_epoch", "declared_counts"]


def checked_epoch(epoch: Any, call: str) -> int:
    """``epoch`` as an ``int`` if it is an integer >= 0 (NumPy's too; a bool is not).

    Raises:
        ValueError: Naming ``call`` and the value.
    """
    value = as_int(epoch)
    if value is None or value < 0:
        raise ValueError(f"{call}(epoch): epoch must be an integer >= 0 (0-based), got {epoch!r}")
    return value


def declared_counts(num_epochs: Any, steps_per_epoch: Any, total_steps: Any) -> tuple[int, int, int]:
    """``setup()``'s counts as ``int``: integers >= 0 (NumPy's too); ``total_steps`` is ``num_epochs x
    steps_per_epoch`` when ``None``, else a count that leaves the last epoch at least one step and at most a whole
    epoch.

    Raises:
        ValueError: Naming the count, what is allowed and the value.
    """
    counts = []
    for key, value in (("num_epochs", num_epochs), ("steps_per_epoch", steps_per_epoch)):
        count = as_int(value)
        if count is None or count < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        counts.append(count)
    num_epochs, steps_per_epoch = counts
    full = num_epochs * steps_per_epoch
    if total_steps is None:
        return num_epochs, steps_per_epoch, full
    low = full - steps_per_epoch + 1 if full else 0
    steps = as_int(total_steps)
    if steps is None or not low <= steps <= full:
        allowed = f"from {low} to {full}" if low < full else f"{full}"
        raise ValueError(
            f"total_steps must be {allowed} (the last of num_epochs={num_epochs} epochs of {steps_per_epoch} steps "
            f"cut short, or none), got {total_steps!r}"
        )
    return num_epochs, steps_per_epoch, steps


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=user_stacklevel())  # at the caller of start_epoch() / end_epoch()


@dataclasses.dataclass
class EpochCount:
    """The epoch under way and its ``post_step()`` calls, against ``setup()``'s declared counts.

    Attributes:
        num_epochs: Epochs ``setup()`` declared (0: not declared).
        steps_per_epoch: ``post_step()`` calls an epoch ``setup()`` declared.
        total_steps: ``post_step()`` calls of the whole run ``setup()`` declared (``num_epochs x steps_per_epoch``
            unless its last epoch is cut short).
        epoch: The epoch started last (-1 before the first).
        steps: ``post_step()`` and ``skip_step()`` calls in that epoch so far.
        skipped: ``skip_step()`` calls among them.
        open_epoch: The epoch started and not yet ended, if any.
        ended: The epoch ended last, if no epoch has started since.
        resumed_mid_epoch: A state saved mid-epoch was loaded: starting that epoch again keeps ``steps``.
    """

    num_epochs: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    epoch: int = -1
    steps: int = 0
    skipped: int = 0
    open_epoch: int | None = None
    ended: int | None = None
    resumed_mid_epoch: bool = False
    _warned: set[str] = dataclasses.field(default_factory=set, repr=False)

    def declare(self, num_epochs: int, steps_per_epoch: int, total_steps: int) -> None:
        """``setup()``'s counts (a new count warns again once past it)."""
        self.num_epochs, self.steps_per_epoch, self.total_steps = num_epochs, steps_per_epoch, total_steps
        self._warned.discard("epochs")

    def declared_steps(self, epoch: int) -> int:
        """``post_step()`` calls declared for ``epoch``: ``steps_per_epoch``, what ``total_steps`` leaves to the
        last epoch."""
        if epoch == self.num_epochs - 1:
            return self.total_steps - epoch * self.steps_per_epoch
        return self.steps_per_epoch

    def start(self, epoch: int) -> None:
        """``start_epoch(epoch)``.

        Warns:
            UserWarning: Once, for an ``epoch`` past the declared ``num_epochs`` (the schedules over the run
                have ended), and once for a start while another epoch was never ended.
        """
        declared = self.num_epochs
        if declared and epoch >= declared and self._once("epochs"):
            _warn(
                f"start_epoch({epoch}) is past setup(num_epochs={declared}) (epochs 0 to {declared - 1}): the "
                "schedules over the run have ended and stay at the target; pass setup() the number of epochs you train"
            )
        if self.open_epoch is not None and self._once("unended"):
            _warn(
                f"start_epoch({epoch}) while epoch {self.open_epoch} was not ended: call end_epoch({self.open_epoch}) "
                "after its steps (slr/admm with interval_unit=epoch coordinate there, and the epoch's checks run there)"
            )
        if not (self.resumed_mid_epoch and epoch == self.epoch):  # a loop resumed mid-epoch starts it again
            self.steps = self.skipped = 0
        self.epoch, self.resumed_mid_epoch, self.open_epoch, self.ended = epoch, False, epoch, None

    def check_end(self, epoch: int) -> None:
        """Before ``end_epoch(epoch)`` does anything.

        Raises:
            ValueError: For the epoch that has just ended, ended again (its coordinations and checks would run
                twice: one more Z-step and dual step for slr/admm with ``interval_unit=epoch``).
        """
        if self.open_epoch is None and epoch == self.ended:
            raise ValueError(
                f"end_epoch({epoch}) again: epoch {epoch} has ended (its end-of-epoch work would run twice); "
                f"call start_epoch({epoch + 1}) before the next epoch's steps"
            )

    def end(self, epoch: int) -> None:
        """``end_epoch(epoch)``.

        Warns:
            UserWarning: Once, when an epoch saw another number of ``post_step()`` calls than declared (the
                schedules count ``post_step()`` calls: optimizer steps with gradient accumulation), and once for
                an end of another epoch than the one started.
        """
        if self.open_epoch is not None and epoch != self.open_epoch and self._once("other"):
            _warn(
                f"end_epoch({epoch}) while epoch {self.open_epoch} is under way: end the epoch you started "
                f"(end_epoch({self.open_epoch})); the epoch's checks and slr/admm's epoch coordinations count from it"
            )
        declared, done = self.declared_steps(epoch), self.steps
        if done not in (declared, 0) and self._once("steps"):
            _warn(
                f"setup() declared {declared} step{'s' * (declared != 1)} for epoch {epoch}, but it had {done} "
                "post_step() and skip_step() calls: the "
                "schedules count those calls (optimizer steps with gradient accumulation, not micro-batches; a batch "
                "skipped after backward() counts through skip_step()); "
                "pass that number to setup() (and total_steps when the last epoch is cut short)"
            )
        self.steps, self.skipped, self.open_epoch, self.ended = 0, 0, None, epoch  # a state saved now is not mid-epoch

    def _once(self, kind: str) -> bool:
        """Whether the warning ``kind`` is still to give (then it counts as given)."""
        if kind in self._warned:
            return False
        self._warned.add(kind)
        return True

    def state(self) -> list[int]:
        """``[epoch, steps, skipped]``: the epoch under way, its ``post_step()`` and ``skip_step()`` calls so far,
        and how many of them were ``skip_step()``."""
        return [self.epoch, self.steps, self.skipped]

    def load(self, state: list[int]) -> None:
        """Restores :meth:`state` (a state saved mid-epoch resumes that epoch; one saved before ``skip_step``
        existed has no skip count)."""
        self.epoch, self.steps, self.skipped = (*state, 0) if len(state) == 2 else state
        self.resumed_mid_epoch, self.open_epoch, self.ended = self.steps > 0, None, None
