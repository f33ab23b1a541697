"""``SparsityTrainer``: a ``transformers.Trainer`` that prunes the model while it trains it.

Trainer keeps everything it owns (its loop, optimizer, schedule, gradient accumulation, clipping,
mixed precision, checkpoints, evaluation and logging); the formulation's calls go where the own-loop
API puts them (docs/own-loop.md):

* ``training_step`` is the formulation's ``backward(batch, scale=1/accumulation)``: the loss
  (Trainer's own ``compute_loss``) plus the constraint terms;
* after each optimizer step ``post_step`` (dual steps, coordinations), at the epoch's ends
  ``start_epoch`` / ``end_epoch``;
* every Trainer checkpoint gets the formulation's state (``formulation.pt``), and
  ``train(resume_from_checkpoint=...)`` loads it back;
* at the end of ``train()`` the model is hard-pruned: plain weights with exact zeros, so
  ``save_model()`` writes a model that plain ``from_pretrained`` loads.

Example::

    targets = cs.Targets(module_types=(nn.Linear,), exclude=["classifier.*"])
    targets = targets.resolve(model, cs.SparsityConfig(sparsity=0.5))
    trainer = SparsityTrainer(model, args, train_dataset=train, targets=targets, formulation="slr")
    trainer.train()
    trainer.save_model("pruned")

Not supported (refused in ``__init__``): DeepSpeed, FSDP, ``model_init`` (hyperparameter search)
and several GPUs in one process (``DataParallel``; use ``torchrun``, one process per GPU).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length

from constrainedsparse.config import Hyperparameters
from constrainedsparse.errors import first_line
from constrainedsparse.formulations import Formulation, LagrangianStep, formulation_class, make
from constrainedsparse.integrations.trainer_support import (
    check_supported,
    check_trainable,
    epochs_and_steps,
    let_go,
)
from constrainedsparse.masks import hard_prune as hard_prune_targets
from constrainedsparse.masks import parametrized
from constrainedsparse.modes import eval_mode, random_states_kept
from constrainedsparse.problem import SparsityProblem, UserConstraint
from constrainedsparse.report import empty_layers
from constrainedsparse.targets import TargetParam

STATE_FILE = "formulation.pt"
"""The formulation's state in each Trainer checkpoint folder."""

REFERENCE_TRIES = 16
"""Training batches tried for slr's reference batch (the first with a finite loss)."""


class SparsityTrainer(Trainer):
    """A ``transformers.Trainer`` that prunes ``targets`` with a formulation picked by name.

    Args:
        model: The model (its weights are pruned in place).
        args: Trainer's ``TrainingArguments``.
        targets: What to prune, at which level: ``Targets(...).resolve(model, SparsityConfig(...))``.
        formulation: A registered training formulation (``slr``, ``admm``, ``l0``, ``l0-penalty``,
            ``magnitude``; :func:`constrainedsparse.available_formulations`).
        constraints: Your constraints by name, next to the sparsity target; each
            ``fn(model, batch)`` gets Trainer's prepared (dict) batch.
        hyperparameters: The formulation's hyperparameters by key (``{"rho": 0.05}``), or its config object
            (``SLRConfig(rho=0.05)``), as :func:`~constrainedsparse.make` takes them.
        dual_lr: Gradient-ascent step of your constraints' multipliers.
        hard_prune_at_end: Hard-prune at the end of :meth:`train` (``False``: call :meth:`hard_prune`).
        allow_empty_layers: Let the hard prune cut a layer whose mask keeps no weight from the model (``l0`` can
            close every gate of a layer); by default that is refused, before anything is changed.
        log_layers: Also log the formulation's per-tensor metrics (``residual/<weight>``, ...) with
            Trainer's training rows; by default only its model-wide ones.
        **kwargs: Everything else ``Trainer`` takes (``train_dataset`` is required).

    Attributes:
        formulation: The built :class:`~constrainedsparse.Formulation` (its ``problem`` is the
            :class:`~constrainedsparse.SparsityProblem`).

    Raises:
        ValueError: Without a ``train_dataset``, under DeepSpeed / FSDP / ``model_init`` / several GPUs
            in one process, with a learning-rate scheduler passed in ``optimizers`` when the
            formulation adds parameters to the optimizer (``l0``: pass ``(optimizer, None)``), or for
            anything :func:`constrainedsparse.make` refuses.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        targets: list[TargetParam],
        formulation: str = "slr",
        constraints: Mapping[str, UserConstraint] | None = None,
        hyperparameters: Mapping[str, Any] | Hyperparameters | None = None,
        dual_lr: float = 1e-2,
        hard_prune_at_end: bool = True,
        allow_empty_layers: bool = False,
        log_layers: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("model_init") is not None:
            raise ValueError("SparsityTrainer takes a model, not model_init (its targets are the model's parameters)")
        if hyperparameters is not None and not isinstance(hyperparameters, (Mapping, Hyperparameters)):
            raise ValueError(
                "hyperparameters must be a dict like {'rho': 0.05}, the formulation's config object or None, got "
                f"{hyperparameters!r}"
            )
        flags = {"hard_prune_at_end": hard_prune_at_end, "allow_empty_layers": allow_empty_layers}
        for name, flag in {**flags, "log_layers": log_layers}.items():
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        check_trainable(model, kwargs.get("train_dataset"))
        super().__init__(model=model, args=args, **kwargs)
        check_supported(self)
        if self.args.load_best_model_at_end:
            warnings.warn(
                "load_best_model_at_end=True ranks checkpoints taken while the model is pruned (slr/admm weights dense "
                "until the hard prune, magnitude's masks partway through their schedule, l0's gates still open): the "
                "best by metric_for_best_model is often an early, less pruned one, and the hard prune then cuts "
                "weights no step recovered; rank by evaluate_hard_pruned() yourself, or leave it False",
                UserWarning,
                stacklevel=2,
            )
        self._num_items_in_batch: Any = None  # Trainer's, while training_step runs
        batch = self._train_batch()
        self._weighs_tokens = self._loss_uses_num_items(batch)
        problem = SparsityProblem(
            self.model, targets=targets, constraints=constraints, example_batch=batch, compute_loss=self._task_loss
        )
        if self.lr_scheduler is not None and formulation_class(formulation).adds_parameters:  # before make: untouched
            raise ValueError(
                f"formulation {formulation!r} adds a parameter group to the optimizer, which the scheduler "
                "passed in optimizers= does not know: pass optimizers=(optimizer, None) and Trainer builds "
                "its schedule after it"
            )
        optimizer = self.create_optimizer()  # Trainer's optimizer, or the one passed in `optimizers`
        if not isinstance(hyperparameters, Hyperparameters):
            hyperparameters = dict(hyperparameters or {})
        self.formulation: Formulation = make(
            formulation, problem, hyperparameters, optimizer=optimizer, dual_lr=dual_lr
        )
        try:  # what make attached comes off again if the rest fails (out of memory in slr's f, an interrupt)
            # slr's f: one training batch (it fits, as training does), or the reference_samples you set, shared
            # out over the processes and evaluated in one forward.
            wanted = self.formulation.reference_samples
            given = _sets_reference_samples(hyperparameters)
            size = math.ceil(wanted / self.args.world_size) if given else None
            reference = None
            if wanted:  # the batch drawn above, unless you set its size or its loss is not finite
                reusable = size is None and self._loss_is_finite(batch)
                reference = batch if reusable else self._train_batch(size, finite_loss=True)
            epochs, steps, total = epochs_and_steps(self)
            self.formulation.setup(epochs, steps, reference_batch=reference, total_steps=total)
        except BaseException:
            self.formulation.discard()  # nothing baked in: the model and optimizer as they were given
            raise
        self.hard_prune_at_end, self.allow_empty_layers = hard_prune_at_end, allow_empty_layers
        self._layer_names = set() if log_layers else {t.name for t in problem.targets}
        self._micro_steps: list[LagrangianStep] = []  # backward() of the optimizer step under way
        self._last_step: LagrangianStep | None = None
        self._pending_logs: dict[str, float] = {}  # the formulation's metrics since Trainer last logged
        self._epoch: int | None = None  # the epoch under way (counted from the first on_epoch_begin)
        self._trained = False
        self._pruned = False
        self.add_callback(_PruningCallback(self))

    def _train_batch(self, size: int | None = None, finite_loss: bool = False) -> Any:
        """One collated batch of Trainer's training loader, on the device (``size`` examples per process instead
        of the training batch size if given; with ``finite_loss``, the first of its first batches whose loss is
        finite: a completion-only batch without a labelled token has a NaN mean). The random states Trainer's
        shuffling and collators use are left as they were, and the loader is let go.

        Raises:
            ValueError: If the loader gives no batch, or none of the first batches has a finite loss.
        """
        saved = self._train_batch_size
        if size is not None:
            share = len(self.train_dataset) // self.args.world_size if has_length(self.train_dataset) else size
            self._train_batch_size = max(1, min(size, share))
        found, tried = None, 0
        try:
            with random_states_kept():
                loader = self.get_train_dataloader()
                for raw in itertools.islice(loader, REFERENCE_TRIES if finite_loss else 1):
                    tried += 1
                    batch = self._prepare_inputs(raw)
                    if not finite_loss or self._loss_is_finite(batch):
                        found = batch
                        break
                let_go(self.accelerator, loader)
        finally:
            self._train_batch_size = saved
        if found is None and not tried:
            raise ValueError(
                "the training loader gives no batch on this process (too few examples for the processes, "
                "with dataloader_drop_last?)"
            )
        if found is None:
            raise ValueError(
                f"slr's reference batch: none of the first {tried} training batches gives a finite loss (batches "
                "without a labelled token?)"
            )
        return found

    def _loss_is_finite(self, batch: Any) -> bool:
        with eval_mode(self.model), torch.no_grad():
            return bool(torch.isfinite(self._task_loss(self.model, batch)))

    def _loss_uses_num_items(self, batch: Any) -> bool:
        """Whether Trainer's loss is normalised by ``num_items_in_batch`` (a causal LM's tokens): your
        ``loss_is_scaled_for_ga`` if you set it, else found by computing it on ``batch`` with two counts. Many
        models take the keyword and ignore it (BERT's classification heads); Trainer would then add up their
        micro-batch means. A batch whose loss is 0 or not finite tells nothing: Trainer's rule then. Every
        process takes the same answer."""
        parameters = inspect.signature(self.compute_loss).parameters.values()
        if not any(p.name == "num_items_in_batch" or p.kind is p.VAR_KEYWORD for p in parameters):
            return False  # a transformers without it, or your override without it
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return bool(declared)
        if not (getattr(self, "model_accepts_loss_kwargs", False) or getattr(self, "compute_loss_func", None)):
            return False  # Trainer divides by the accumulation steps itself
        # Eval mode, no dropout: the two losses differ only by the count.
        with eval_mode(self.model), torch.no_grad(), random_states_kept(), self.compute_loss_context_manager():
            one, two = (self._task_loss(self.model, batch, count) for count in (1, 2))
        informative = bool(torch.isfinite(one) and torch.isfinite(two) and (one != 0 or two != 0))
        uses = not torch.allclose(one, two) if informative else True
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(int(uses), device=self.args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            uses = bool(flag)
        return uses

    def _task_loss(self, model: nn.Module, batch: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """Trainer's own loss (``compute_loss``: label smoothing, your override) on a copy of the batch.

        Inside :meth:`training_step`, a loss normalised by Trainer's ``num_items_in_batch`` (the tokens of
        the whole accumulated batch) gets it, and one Trainer counts as scaled for the accumulation (that
        one, or your ``loss_is_scaled_for_ga=True``) is returned times the accumulation steps, so that
        ``backward``'s ``1/accumulation`` leaves it as Trainer has it and scales only the formulation's
        own terms. Any other loss is the micro-batch mean.
        """
        batch = dict(batch) if isinstance(batch, Mapping) else batch
        if num_items_in_batch is not None:  # the probe's count
            return self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
        items = self._num_items_in_batch if self._weighs_tokens else None
        with self.compute_loss_context_manager():
            loss = (
                self.compute_loss(model, batch)
                if items is None
                else self.compute_loss(model, batch, num_items_in_batch=items)
            )
        scaled = self._weighs_tokens and (items is not None or getattr(self, "loss_is_scaled_for_ga", None) is True)
        return loss * self._accumulation_steps() if scaled else loss

    def _accumulation_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """The formulation's backward on one micro-batch; returns its loss scaled as Trainer's is (the task
        loss; ``l0-penalty``'s includes its penalty ``lmbda · E[density]``).

        The task loss is Trainer's: with ``num_items_in_batch`` (a causal LM's tokens over the accumulated
        batch) it is normalised as Trainer normalises it, else the micro-batch mean divided by the
        accumulation steps; the formulation's terms are divided by the accumulation steps.
        """
        model.train()
        self.formulation.problem.forward_module = model  # DDP's wrapper under torchrun
        scale = 1.0 / self._accumulation_steps()
        self._num_items_in_batch = num_items_in_batch  # for this micro-batch's loss only (not SLR's reference f)
        try:
            step = self.formulation.backward(
                self._prepare_inputs(inputs), scale=scale, scaler=getattr(self.accelerator, "scaler", None)
            )
        finally:
            self._num_items_in_batch = None
        self._micro_steps.append(step)
        return step.loss.detach() * scale

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's log; a training row also gets the formulation's metrics and your constraints'
        ``violation/<name>`` and ``multiplier/<name>`` (read to the host only here)."""
        if "loss" in logs and self._last_step is not None:
            constraint_metrics = self.formulation.problem.step_metrics(self._last_step.cmp_state)
            constraint_metrics.pop("loss/train")  # Trainer's "loss" is that
            logs = {**logs, **self._logged(self._pending_logs), **constraint_metrics}
            self._pending_logs = {}
        super().log(logs, *args, **kwargs)

    def _logged(self, metrics: dict[str, float]) -> dict[str, float]:
        """The formulation's metrics to log: its per-tensor ones only with ``log_layers``."""
        return {k: v for k, v in metrics.items() if k.rpartition("/")[2] not in self._layer_names}

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer's ``train``, resuming the formulation's state too; hard-prunes at the end (see class).

        Raises:
            ValueError: After the model was hard-pruned, or for a checkpoint without ``formulation.pt``.
        """
        if self._pruned:
            raise ValueError("this SparsityTrainer hard-pruned its model already; build a new one to prune again")
        if self._trained and not resume_from_checkpoint:
            raise ValueError(
                "train() ran already: a second run would restart the pruning schedule on a model pruned (or partly "
                "pruned) by the first; call hard_prune(), or train(resume_from_checkpoint=...) to continue a stopped "
                "run"
            )
        # A copy (state_dict()'s tensors are the live ones, which the checkpoint's load overwrites).
        before = (self._trained, copy.deepcopy(self.formulation.state_dict()) if resume_from_checkpoint else None)
        if resume_from_checkpoint:
            self._load_formulation_state(resume_from_checkpoint)
        # A run stopped by an exception left these behind; the checkpoint's state is what goes on.
        self._epoch, self._micro_steps, self._last_step, self._pending_logs = None, [], None, {}
        self._trained = True
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            if self._last_step is None and not self._micro_steps:  # refused before a step (a bad checkpoint folder)
                self._trained = before[0]
                if before[1] is not None:
                    self.formulation.load_state_dict(before[1])
            raise
        if self.hard_prune_at_end:
            self.hard_prune()
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's ``save_model``; before the hard prune (your call, not a checkpoint's) it warns: the
        weights are not pruned yet, and ``l0``/``magnitude`` weights are saved with their gates or masks,
        which plain ``from_pretrained`` does not load."""
        if not _internal_call and not self._pruned:
            warnings.warn(
                "save_model() before hard_prune(): the saved weights are not hard-pruned"
                + (" and carry the formulation's parametrizations (plain from_pretrained re-initialises them)"
                   if parametrized(self.model) else "")
                + "; call hard_prune() first",
                stacklevel=2,
            )  # fmt: skip
        super().save_model(output_dir, _internal_call)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's formulation state comes back with its weights."""
        super()._load_best_model()
        self._load_formulation_state(self.state.best_model_checkpoint)

    def hard_prune(self, allow_empty: bool | None = None) -> dict[str, torch.Tensor]:
        """Hard-prunes the model: the formulation's masks, then plain weights with exact zeros.

        Args:
            allow_empty: Accept masks that cut a layer from the model (``None``: the trainer's
                ``allow_empty_layers``).

        Returns:
            The boolean masks by target name.

        Raises:
            ValueError: After a hard prune, or for a mask that keeps no weight of its layer unless allowed; nothing is
                changed then (call it again with ``allow_empty=True`` to accept that).
        """
        if self._pruned:
            raise ValueError("hard_prune(): the model is hard-pruned already")
        masks = self.formulation.hard_masks()
        emptied = empty_layers(masks)
        if emptied and not (self.allow_empty_layers if allow_empty is None else allow_empty):
            raise ValueError(
                f"hard_prune(): the mask of {', '.join(emptied)} keeps no weight (the layer would be cut from the "
                "model); nothing was changed: call hard_prune(allow_empty=True) to accept that (or build the "
                "SparsityTrainer with allow_empty_layers=True)"
            )
        self.formulation.finalize()
        hard_prune_targets(self.formulation.problem.targets, masks, allow_empty=True)
        self._pruned = True
        return masks

    def evaluate_hard_pruned(self, **kwargs: Any) -> dict[str, float]:
        """``evaluate(**kwargs)`` of the model as :meth:`hard_prune` would leave it now (nothing is changed).

        Metric keys start with ``hardpruned_`` unless ``metric_key_prefix`` is given.
        """
        kwargs.setdefault("metric_key_prefix", "hardpruned")
        if self._pruned:
            return self.evaluate(**kwargs)
        with self.formulation.hard_prune_preview(self.formulation.hard_masks()):
            return self.evaluate(**kwargs)

    def _load_formulation_state(self, checkpoint: str | bool) -> None:
        folder = get_last_checkpoint(self.args.output_dir) if checkpoint is True else str(checkpoint)
        if folder is None:
            where = self.args.output_dir
            raise ValueError(f"resume_from_checkpoint=True: no {PREFIX_CHECKPOINT_DIR}-* folder in {where}")
        if not Path(folder).is_dir():
            raise ValueError(f"resume_from_checkpoint: {folder} is not a folder")
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise ValueError(
                f"resume_from_checkpoint: {folder} holds no {STATE_FILE}, so it was not saved by a SparsityTrainer "
                "(the pruning state is needed to resume)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch's own errors for a file cut short: zip, OSError, EOFError
            raise ValueError(
                f"resume_from_checkpoint: {path} is damaged or truncated ("
                + (f"{type(err).__name__}: {first_line(err)})" if str(err) else f"{type(err).__name__})")
            ) from None
        self.formulation.load_state_dict(state)


class _PruningCallback(TrainerCallback):
    """The formulation's lifecycle at Trainer's events (the trainer's own state is all it touches)."""

    def __init__(self, trainer: SparsityTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer  # Trainer's float epoch (1.5 mid-epoch, 0.5 for a cut one) only places the first
        trainer._epoch = int(state.epoch) if trainer._epoch is None else trainer._epoch + 1
        unended = trainer.formulation.resumed_epoch
        if unended is not None and unended < trainer._epoch:  # a checkpoint of an epoch's last step: end it first
            trainer._pending_logs.update(trainer.formulation.end_epoch(unended))
        with warnings.catch_warnings():
            if not has_length(trainer.train_dataset):  # a stream: Trainer starts epochs until max_steps
                warnings.filterwarnings("ignore", message=r"start_epoch\(\d+\) is past setup")
            trainer._pending_logs.update(trainer.formulation.start_epoch(trainer._epoch))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # after the optimizer step
        trainer = self.trainer
        if trainer._micro_steps:
            trainer._pending_logs.update(trainer.formulation.post_step(trainer._micro_steps))
            trainer._last_step = trainer._micro_steps[-1]
            trainer._micro_steps = []

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        with warnings.catch_warnings():
            if control.should_training_stop or not has_length(trainer.train_dataset):
                # a callback cut this epoch short (or the dataset has no length): Trainer's choice
                warnings.filterwarnings("ignore", message=r"setup\(\) declared \d+ steps? for epoch \d+, but it had")
            trainer._pending_logs.update(trainer.formulation.end_epoch(trainer._epoch))
        last = state.global_step >= state.max_steps or control.should_training_stop
        if trainer._pending_logs and last and not control.should_log and args.logging_strategy != "no":
            # The last epoch, and Trainer logs no training row after it (with logging_strategy="epoch" it does,
            # and log() adds them to that one): its metrics get a row of their own, before Trainer's summary
            # row and on_train_end.
            Trainer.log(trainer, trainer._logged(trainer._pending_logs))
            trainer._pending_logs = {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:  # Trainer's checkpoint does not hold the formulation's state
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            torch.save(self.trainer.formulation.state_dict(), folder / STATE_FILE)


def _sets_reference_samples(hyperparameters: Mapping[str, Any] | Hyperparameters) -> bool:
    """Whether the hyperparameters set slr's ``reference_samples`` (a key given, or a config's other than its
    default): then the reference batch is drawn at that size, else it is the first training batch."""
    if isinstance(hyperparameters, Hyperparameters):
        field = type(hyperparameters).keys().get("reference_samples")
        return field is not None and hyperparameters.reference_samples != field.default  # type: ignore[attr-defined]
    return "reference_samples" in hyperparameters
