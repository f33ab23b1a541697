"""What :class:`~constrainedsparse.integrations.hf.SparsityTrainer` checks of its Trainer and model, and how it
counts Trainer's epochs and steps (the contexts its own forward passes run in are :mod:`constrainedsparse.modes`').
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import Trainer
from transformers.trainer_utils import has_length

__all__ = [
    "check_supported",
    "check_trainable",
    "epochs_and_steps",
    "let_go",
]


def let_go(accelerator: Any, loader: Any) -> None:
    """Forgets a prepared loader read only in part: accelerate keeps a reference (and its workers) otherwise."""
    if hasattr(loader, "end"):
        loader.end()
    registered = getattr(accelerator, "_dataloaders", None)
    if isinstance(registered, list) and any(entry is loader for entry in registered):
        registered[:] = [entry for entry in registered if entry is not loader]


def check_trainable(model: nn.Module | None, train_dataset: Any) -> None:
    """What Trainer would refuse with a message of its own, or torch's: no model, a model loaded quantized, no
    examples."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"SparsityTrainer needs model=, a torch.nn.Module (a transformers model), got {model!r:.60}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_trainable", False):
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise ValueError(
            f"the model was loaded quantized ({getattr(method, 'value', method)}, e.g. from a GGUF file), which "
            "Trainer does not fine-tune: load a plain copy (constrainedsparse.models.materialize_gguf(file, cache, "
            "name) writes one; SmolLM2: materialize_smollm2(cache))"
        )
    if train_dataset is not None and has_length(train_dataset) and len(train_dataset) == 0:
        raise ValueError("train_dataset is empty: SparsityTrainer needs at least one example")


def check_supported(trainer: Trainer) -> None:
    if trainer.train_dataset is None:
        raise ValueError("SparsityTrainer needs train_dataset (the pruning schedule counts its batches)")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError("SparsityTrainer does not run under DeepSpeed or FSDP (the formulation owns the backward)")
    if trainer.args.n_gpu > 1:
        raise ValueError(
            f"SparsityTrainer runs one device per process, this one sees {trainer.args.n_gpu} GPUs: "
            "start one process per GPU with torchrun, or set CUDA_VISIBLE_DEVICES"
        )


def epochs_and_steps(trainer: Trainer) -> tuple[int, int, int]:
    """``setup()``'s epochs, optimizer steps per epoch and steps in all, counted as Trainer counts them (its
    ``max_steps`` may cut the last epoch short)."""
    args = trainer.args
    dataloader = trainer.get_train_dataloader()
    let_go(trainer.accelerator, dataloader)  # only its length is read
    if not has_length(dataloader):  # an iterable dataset: Trainer runs max_steps as one epoch
        if args.max_steps <= 0:
            raise ValueError("a train_dataset without a length needs TrainingArguments(max_steps=N)")
        return 1, args.max_steps, args.max_steps
    steps = max(math.ceil(len(dataloader) / args.gradient_accumulation_steps), 1)
    # Trainer's total: max_steps, else num_train_epochs (a fraction too, 0.5 of an epoch) times the epoch's steps.
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps)
    steps = min(steps, max(total, 1))  # a run shorter than an epoch: the schedules spread over the steps it takes
    epochs = max(math.ceil(total / steps), 1)
    return epochs, steps, max(total, 1)  # a run of 0 steps: the one step setup() can declare
