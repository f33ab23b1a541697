"""One rank of a SparsityTrainer run under torchrun (tests/test_hf_trainer.py): a tiny BERT without dropout
pruned to 50 % with a user constraint; saves this rank's weights and multiplier to OUT/final-rankR.pt.

Usage: hf_trainer_rank.py FORMULATION OUT [--stop-after-first-epoch] [--resume]
"""

import os
import sys

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

import constrainedsparse as cs
from constrainedsparse.integrations.hf import SparsityTrainer

formulation, out = sys.argv[1], sys.argv[2]
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
g = torch.Generator().manual_seed(0)
ids = torch.randint(8, 64, (64, 16), generator=g)
ids[torch.rand(64, 16, generator=g) < 0.08] = 7
train = [{"input_ids": i, "labels": int((i == 7).sum() >= 2)} for i in ids]
torch.manual_seed(0)
config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)  # fmt: skip
model = BertForSequenceClassification(config)
chosen = cs.Targets(module_types=(nn.Linear,), exclude=["bert.pooler.*", "classifier.*"])
targets = chosen.resolve(model, cs.SparsityConfig(sparsity=0.5))
logits = cs.UserConstraint(lambda m, b: m(input_ids=b["input_ids"]).logits.pow(2).mean() - 1e-5, "<=")


class StopAfterFirstEpoch(TrainerCallback):
    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_training_stop = "--stop-after-first-epoch" in sys.argv


args = TrainingArguments(out, num_train_epochs=2, learning_rate=1e-2, per_device_train_batch_size=16 // world,
                         report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="epoch",
                         ddp_backend="gloo" if world > 1 else None, seed=0)  # fmt: skip
trainer = SparsityTrainer(model, args, train_dataset=train, targets=targets, formulation=formulation,
                          constraints={"logits": logits}, dual_lr=0.5, callbacks=[StopAfterFirstEpoch()],
                          hard_prune_at_end="--stop-after-first-epoch" not in sys.argv)  # fmt: skip
trainer.train(resume_from_checkpoint=True if "--resume" in sys.argv else None)
state = {k: v.detach().clone() for k, v in model.state_dict().items()}
multiplier = trainer.formulation.problem.named_multiplier_values()["logits"].clone()
torch.save({"model": state, "multiplier": multiplier}, f"{out}/final-rank{rank}.pt")
if torch.distributed.is_initialized():  # a rank leaving with gloo's threads still up can abort at exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Trainer's DDP reducer can outlive the group (a reference cycle): destroyed during interpreter
    # finalization, gloo's threads abort the process after a successful run ("terminate called without an
    # active exception"; it failed a CI run twice). Every file is written: leave as the CLI's ranks do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
