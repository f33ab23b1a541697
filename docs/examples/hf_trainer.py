"""Prune a Hugging Face model while ``transformers.Trainer`` trains it (docs/own-loop.md, "transformers.Trainer").

``SparsityTrainer`` is a Trainer: it keeps its loop, optimizer, scheduler, accumulation, clipping,
checkpoints and evaluation, and runs the formulation's calls where the own-loop page puts them
(``backward`` in ``training_step``, ``start_epoch`` / ``post_step`` / ``end_epoch`` at Trainer's
events, the formulation's state in every checkpoint, the hard prune at the end of ``train()``).

Usage: python hf_trainer.py [METHOD] [OUT_DIR] [--quick]   (METHOD: slr by default, or l0, admm, magnitude, ...;
OUT_DIR: /tmp/cs-trainer by default; --quick: 128 samples and one pruning epoch)
"""

import sys

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import constrainedsparse as cs
from constrainedsparse.integrations.hf import SparsityTrainer

POSITIONAL = [a for a in sys.argv[1:] if a != "--quick"]
METHOD, OUT = (POSITIONAL + ["slr", "/tmp/cs-trainer"][len(POSITIONAL) :])[:2] if len(POSITIONAL) <= 2 else ("", "")
if METHOD not in cs.available_formulations():
    sys.exit(
        f"usage: hf_trainer.py [METHOD] [OUT_DIR] [--quick]; METHOD one of {', '.join(cs.available_formulations())}"
    )
SAMPLES, EPOCHS = (128, 1) if "--quick" in sys.argv else (768, 3)


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
where = cs.Targets(module_types=(nn.Linear,), exclude=["bert.pooler.*", "classifier.*"])
targets = where.resolve(model, cs.SparsityConfig(sparsity=0.5))


def mean_square_logit(m: nn.Module, b: dict) -> torch.Tensor:
    """Your constraint on the same dict batch as the loss: the mean squared logit at most 4."""
    return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.pow(2).mean() - 4.0


logit_scale = cs.UserConstraint(mean_square_logit, "<=")
args = TrainingArguments(OUT, num_train_epochs=EPOCHS, learning_rate=1e-3, gradient_accumulation_steps=2,
                         max_grad_norm=1.0, save_strategy="epoch", per_device_eval_batch_size=64, **common)  # fmt: skip
trainer = SparsityTrainer(model, args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
                          targets=targets, formulation=METHOD, constraints={"logit_scale": logit_scale},
                          dual_lr=0.05)  # fmt: skip
print(f"dense accuracy       {trainer.evaluate()['eval_accuracy']:.3f}")
trainer.train()  # prunes while training; hard-pruned at the end
print(f"hard-pruned accuracy {trainer.evaluate()['eval_accuracy']:.3f} at sparsity {cs.achieved_sparsity(targets):.3f}")
trainer.save_model(f"{OUT}/final")  # loads with plain transformers: from_pretrained(f"{OUT}/final")
