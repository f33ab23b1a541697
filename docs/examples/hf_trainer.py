"""Prune a Hugging Face model while ``transformers.Trainer`` trains it (docs/own-loop.md, "transformers.Trainer").

Trainer keeps its loop, optimizer, scheduler, accumulation, clipping, checkpoints and evaluation;
the formulation's four calls go where the own-loop page puts them: ``backward`` in ``training_step``,
``start_epoch`` / ``post_step`` / ``end_epoch`` in a callback, and the hard prune at the end.

Usage: python hf_trainer.py [METHOD] [OUT_DIR] [--quick]   (METHOD: slr by default, or l0, admm, magnitude, ...;
OUT_DIR: /tmp/cs-trainer by default; --quick: 128 samples and one pruning epoch)
"""

import math
import sys

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import constrainedsparse as cs

POSITIONAL = [a for a in sys.argv[1:] if a != "--quick"]
METHOD, OUT = (POSITIONAL + ["slr", "/tmp/cs-trainer"][len(POSITIONAL) :])[:2] if len(POSITIONAL) <= 2 else ("", "")
if METHOD not in cs.available_formulations():
    sys.exit(
        f"usage: hf_trainer.py [METHOD] [OUT_DIR] [--quick]; METHOD one of {', '.join(cs.available_formulations())}"
    )
SAMPLES, EPOCHS = (128, 1) if "--quick" in sys.argv else (768, 3)


class PruningTrainer(Trainer):
    """Trainer whose backward is the formulation's: the loss plus the constraint terms, scaled like Trainer's."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        scale = 1.0 / self.current_gradient_accumulation_steps
        step = self.formulation.backward(self._prepare_inputs(inputs), scale=scale)
        self.micro_steps.append(step)  # post_step() gets them all after the optimizer step
        return step.loss.detach() * scale  # what Trainer logs as "loss": the task loss


class PruningCallback(TrainerCallback):
    """The formulation's lifecycle at Trainer's events; its state is saved with every Trainer checkpoint."""

    def __init__(self, trainer: PruningTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.formulation.problem.forward_module = self.trainer.model_wrapped  # DDP under torchrun

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.formulation.start_epoch(int(state.epoch))

    def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step
        self.trainer.formulation.post_step(self.trainer.micro_steps)
        self.trainer.micro_steps.clear()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.formulation.end_epoch(round(state.epoch) - 1)

    def on_save(self, args, state, control, **kwargs):  # Trainer's checkpoint does not hold it
        folder = f"{args.output_dir}/checkpoint-{state.global_step}"
        torch.save(self.trainer.formulation.state_dict(), f"{folder}/formulation.pt")

    def on_train_end(self, args, state, control, **kwargs):
        f = self.trainer.formulation
        masks = f.hard_masks()
        f.finalize()
        cs.hard_prune(f.problem.targets, masks)  # plain weights with exact zeros: save_model() saves them


def examples(n: int, seed: int) -> list[dict]:
    """Token sequences; the label says whether token 7 occurs twice or more."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 64, (n, 24), generator=g)
    ids[torch.rand(n, 24, generator=g) < 0.06] = 7
    mask = (torch.arange(24) < torch.randint(12, 25, (n, 1), generator=g)).long()
    ids = ids * mask
    return [{"input_ids": i, "attention_mask": m, "labels": int((i == 7).sum() >= 2)} for i, m in zip(ids, mask)]


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


torch.manual_seed(0)
train, test = examples(SAMPLES, 0), examples(256, 1)
config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=32, num_labels=2)  # fmt: skip
model = BertForSequenceClassification(config)  # random weights from a config: nothing is downloaded
common = dict(report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", per_device_train_batch_size=16)
dense_args = TrainingArguments(f"{OUT}/dense", num_train_epochs=4, learning_rate=2e-3, save_strategy="no", **common)
Trainer(model, dense_args, train_dataset=train).train()  # dense training: a plain Trainer

# what (50 %), where (the encoder's Linear weights), how (METHOD), plus a constraint of yours
targets = cs.Targets(module_types=(nn.Linear,), exclude=["bert.pooler.*", "classifier.*"])
targets = targets.resolve(model, cs.SparsityConfig(sparsity=0.5))


def mean_square_logit(m: nn.Module, b: dict) -> torch.Tensor:
    """Your constraint on the same dict batch as the loss: the mean squared logit at most 4."""
    return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.pow(2).mean() - 4.0


logit_scale = cs.UserConstraint(mean_square_logit, "<=")
args = TrainingArguments(OUT, num_train_epochs=EPOCHS, learning_rate=1e-3, gradient_accumulation_steps=2,
                         max_grad_norm=1.0, save_strategy="epoch", per_device_eval_batch_size=64, **common)  # fmt: skip
trainer = PruningTrainer(model, args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # one collated batch
problem = cs.SparsityProblem(model, targets=targets, compute_loss=lambda m, b: m(**b).loss, example_batch=batch,
                             constraints={"logit_scale": logit_scale})  # fmt: skip
trainer.create_optimizer()  # Trainer's AdamW before make(): l0 adds its gates to it as a group of their own
trainer.formulation = cs.make(METHOD, problem, optimizer=trainer.optimizer, dual_lr=0.05)
trainer.micro_steps = []
steps_per_epoch = math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps)  # optimizer steps
trainer.formulation.setup(EPOCHS, steps_per_epoch, reference_batch=batch)
trainer.add_callback(PruningCallback(trainer))
print(f"dense accuracy       {trainer.evaluate()['eval_accuracy']:.3f}")
trainer.train()
print(f"hard-pruned accuracy {trainer.evaluate()['eval_accuracy']:.3f} at sparsity {cs.achieved_sparsity(targets):.3f}")
trainer.save_model(f"{OUT}/final")  # loads with plain transformers: from_pretrained(f"{OUT}/final")
