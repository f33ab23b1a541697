"""constrainedsparse.integrations.hf.SparsityTrainer: pruning inside transformers.Trainer, resume, errors."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
    TrainingArguments,
)

import constrainedsparse as cs  # noqa: E402
from constrainedsparse.integrations.hf import SparsityTrainer  # noqa: E402

MISCOUNT = "post_step() and skip_step() calls"  # the epoch-count warning: a loop departed from setup()


def _examples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 64, (n, 16), generator=g)
    ids[torch.rand(n, 16, generator=g) < 0.08] = 7
    return [{"input_ids": i, "labels": int((i == 7).sum() >= 2)} for i in ids]


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def _targets(model: nn.Module) -> list:
    chosen = cs.Targets(module_types=(nn.Linear,), exclude=["bert.pooler.*", "classifier.*"])
    return chosen.resolve(model, cs.SparsityConfig(sparsity=0.5))


def _args(out, **kwargs) -> TrainingArguments:
    common = dict(report_to=[], use_cpu=True, disable_tqdm=True, per_device_train_batch_size=8, learning_rate=3e-3)
    return TrainingArguments(str(out), **{**common, **kwargs})


def _mean_square_logit(m: nn.Module, b: dict) -> torch.Tensor:
    return m(input_ids=b["input_ids"]).logits.pow(2).mean() - 1e-5


def _trainer(out, formulation: str, **kwargs) -> SparsityTrainer:
    model = _model()
    args = _args(out, num_train_epochs=2, gradient_accumulation_steps=2, logging_steps=2, save_strategy="epoch")
    constraints = {"logit": cs.UserConstraint(_mean_square_logit, "<=")}
    return SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model),
                           formulation=formulation, constraints=constraints, dual_lr=0.5, **kwargs)  # fmt: skip


@pytest.mark.parametrize("formulation", ["slr", "l0"])
def test_trainer_prunes_logs_the_constraint_and_saves_a_plain_model(tmp_path, formulation):
    trainer = _trainer(tmp_path / "run", formulation)
    ended = []
    end_epoch = trainer.formulation.end_epoch
    trainer.formulation.end_epoch = lambda e: (ended.append(end_epoch(e)), ended[-1])[1]
    trainer.train()
    assert cs.achieved_sparsity(trainer.formulation.problem.targets) == 0.5
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all("violation/logit" in row and "multiplier/logit" in row for row in rows)
    # BERT's classification loss ignores num_items_in_batch: the micro-batch mean (ln 2 at the start), not the
    # sum of the two accumulated means that Trainer would take it for.
    assert rows[0]["loss"] < 1.0
    last = {k for k in ended[-1] if not k.endswith(".weight")}  # the last epoch's metrics are logged too
    assert last <= {k for row in trainer.state.log_history[-2:] for k in row} and (last or formulation == "slr")
    assert rows[-1]["multiplier/logit"] > 0  # the constraint is violated (mean logit² > 1e-5): its multiplier rose
    assert not [key for row in rows for key in row if key.endswith(".weight")]  # no per-layer keys by default
    assert (tmp_path / "run" / "checkpoint-4" / "formulation.pt").is_file()
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("formulation", ["magnitude", "slr"])
def test_resume_from_a_trainer_checkpoint_ends_as_an_uninterrupted_run(tmp_path, formulation):
    full = _trainer(tmp_path / "full", formulation)
    full.train()

    class StopAfterFirstEpoch(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    cut = _trainer(tmp_path / "cut", formulation, hard_prune_at_end=False, callbacks=[StopAfterFirstEpoch()])
    cut.train()
    resumed = _trainer(tmp_path / "cut", formulation)
    resumed.train(resume_from_checkpoint=True)
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name

    class Interrupt(TrainerCallback):  # Ctrl-C mid-epoch 2; the same trainer then resumes
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6 and not state.is_hyper_param_search and not getattr(self, "done", False):
                self.done = True
                raise KeyboardInterrupt

    same = _trainer(tmp_path / "interrupted", formulation, callbacks=[Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        same.train()
    same.train(resume_from_checkpoint=True)
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(same.model.state_dict()[name], tensor), name


def test_evaluate_hard_pruned_leaves_the_model_as_it_was(tmp_path):
    trainer = _trainer(tmp_path / "run", "slr", eval_dataset=_examples(32, 1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.evaluate_hard_pruned()
    assert "hardpruned_loss" in metrics
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(before[name], tensor), name


def test_refusals(tmp_path):
    model = _model()
    args = _args(tmp_path / "a", num_train_epochs=1)
    with pytest.raises(ValueError, match="SparsityTrainer needs train_dataset"):
        SparsityTrainer(model, args, targets=_targets(model))
    with pytest.raises(ValueError, match="SparsityTrainer takes a model, not model_init"):
        SparsityTrainer(args=args, model_init=_model, train_dataset=_examples(8, 0), targets=_targets(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match=r"formulation 'l0' adds a parameter group .* optimizers=\(optimizer, None\)"):
        SparsityTrainer(model, args, train_dataset=_examples(8, 0), targets=_targets(model), formulation="l0",
                        optimizers=(optimizer, scheduler))  # fmt: skip
    assert not any(type(m).__name__.startswith("Parametrized") for m in model.modules())  # refused before make
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match=r"target .* is not a parameter of this model"):
        SparsityTrainer(_model(), args, train_dataset=_examples(8, 0), targets=_targets(model))
    for keyword, value, message in (
        (
            "hyperparameters",
            5,
            r"^hyperparameters must be a dict like \{'rho': 0\.05\}, the formulation's config "
            r"object or None, got 5$",
        ),
        ("hard_prune_at_end", "no", r"^hard_prune_at_end must be True or False, got 'no'$"),
        ("log_layers", "no", r"^log_layers must be True or False, got 'no'$"),
    ):
        fresh = _model()
        with pytest.raises(ValueError, match=message):
            SparsityTrainer(fresh, args, train_dataset=_examples(8, 0), targets=_targets(fresh), **{keyword: value})
    with pytest.raises(ValueError, match=r"^SparsityTrainer needs model=, a torch\.nn\.Module"):
        SparsityTrainer(None, args, train_dataset=_examples(8, 0), targets=_targets(model))
    model = _model()
    trainer = SparsityTrainer(model, args, train_dataset=_examples(8, 0), targets=_targets(model))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain holds no formulation.pt, so it was not saved by a SparsityTrainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain"))
    (tmp_path / "plain" / "formulation.pt").write_bytes(b"")  # a state cut short
    with pytest.raises(ValueError, match=r"formulation\.pt is damaged or truncated \(EOFError\)$"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain"))
    torch.save(trainer.formulation.state_dict(), tmp_path / "plain" / "formulation.pt")  # but no model weights
    with pytest.raises(ValueError, match=r"Can't find a valid checkpoint"):  # Trainer's own refusal
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain"))
    trainer.train()  # the refused resumes left the trainer as it was
    with pytest.raises(ValueError, match="hard-pruned its model already; build a new one"):
        trainer.train()


def test_a_quantized_model_an_empty_dataset_and_a_second_trainer_on_one_model_are_refused(tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = _model()
    args = _args(tmp_path / "a", num_train_epochs=1)
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())  # what from_pretrained(gguf_file=...) attaches
    with pytest.raises(ValueError, match=r"^the model was loaded quantized \(gguf, .*models\.materialize_gguf\(file"):
        SparsityTrainer(model, args, train_dataset=_examples(8, 0), targets=_targets(model))
    del model.hf_quantizer
    with pytest.raises(ValueError, match=r"^train_dataset is empty: SparsityTrainer needs at least one example$"):
        SparsityTrainer(model, args, train_dataset=[], targets=_targets(model))
    SparsityTrainer(model, args, train_dataset=_examples(8, 0), targets=_targets(model))  # a notebook cell run twice
    with pytest.raises(ValueError, match=r"is pruned already by a 'slr' formulation built on this model"):
        SparsityTrainer(model, args, train_dataset=_examples(8, 0), targets=_targets(model))


def test_slrs_reference_batch_holds_reference_samples_examples(tmp_path):
    model = _model()
    args = _args(tmp_path / "a", num_train_epochs=1)
    trainer = SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model),
                              hyperparameters={"reference_samples": 24})  # fmt: skip
    assert trainer.formulation.reference_batch["input_ids"].shape[0] == 24  # not the training batch's 8
    # The formulation's config object, as make() takes it: its reference_samples set, its rho kept.
    model = _model()
    config = cs.SLRConfig(reference_samples=16, rho=0.07)
    trainer = SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model),
                              hyperparameters=config)  # fmt: skip
    assert trainer.formulation.reference_batch["input_ids"].shape[0] == 16 and trainer.formulation.config.rho == 0.07
    model = _model()
    default = SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model),
                              hyperparameters=cs.SLRConfig())  # fmt: skip
    assert default.formulation.reference_batch["input_ids"].shape[0] == 8  # the default: the first training batch


def test_slrs_default_reference_batch_is_the_first_training_batch_drawn_once(tmp_path, monkeypatch):
    loaders = []
    original = SparsityTrainer.get_train_dataloader
    monkeypatch.setattr(SparsityTrainer, "get_train_dataloader", lambda self: loaders.append(1) or original(self))
    model = _model()
    trainer = SparsityTrainer(model, _args(tmp_path / "a", num_train_epochs=1), train_dataset=_examples(64, 0),
                              targets=_targets(model))  # fmt: skip
    # one loader gives the first batch (the problem's example and slr's reference), one its length
    assert len(loaders) == 2 and trainer.formulation.reference_batch["input_ids"].shape[0] == 8


def test_epochs_follow_the_loop_also_when_max_steps_cuts_them(tmp_path, recwarn):
    model = _model()
    args = _args(tmp_path / "run", max_steps=3, logging_steps=1, save_strategy="no")
    trainer = SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model))
    seen = []
    start, end = trainer.formulation.start_epoch, trainer.formulation.end_epoch
    trainer.formulation.start_epoch = lambda e: (seen.append(("start", e)), start(e))[1]
    trainer.formulation.end_epoch = lambda e: (seen.append(("end", e)), end(e))[1]
    trainer.train()  # 3 of an epoch's 8 steps: Trainer's epoch is 0.375 at the end
    assert seen == [("start", 0), ("end", 0)]
    assert not [w for w in recwarn if MISCOUNT in str(w.message)]  # Trainer cut it, not a miscount
    assert cs.achieved_sparsity(trainer.formulation.problem.targets) == 0.5


def test_a_fraction_of_an_epoch_spreads_the_schedules_over_the_steps_trainer_runs(tmp_path):
    model = _model()
    args = _args(tmp_path / "run", num_train_epochs=0.5, save_strategy="no")  # 4 of an epoch's 8 steps
    trainer = SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model))
    assert (trainer.formulation.num_epochs, trainer.formulation.steps_per_epoch) == (1, 4)


def test_a_stream_runs_max_steps_over_several_epochs_without_a_warning(tmp_path, recwarn):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_examples(16, 0))  # 2 batches: Trainer starts 3 epochs to reach max_steps=5

    model = _model()
    args = _args(tmp_path / "run", max_steps=5, save_strategy="no", logging_steps=100)
    trainer = SparsityTrainer(model, args, train_dataset=Stream(), targets=_targets(model), formulation="magnitude")
    trainer.train()
    assert not [w for w in recwarn if "past setup" in str(w.message) or MISCOUNT in str(w.message)]
    assert cs.achieved_sparsity(trainer.formulation.problem.targets) == 0.5


def test_a_second_train_and_an_unpruned_save_are_caught(tmp_path):
    model = _model()
    args = _args(tmp_path / "run", num_train_epochs=1, save_strategy="no")
    trainer = SparsityTrainer(model, args, train_dataset=_examples(16, 0), targets=_targets(model),
                              formulation="magnitude", hard_prune_at_end=False)  # fmt: skip
    trainer.train()
    with pytest.raises(ValueError, match=r"^train\(\) ran already: a second run would restart the pruning schedule"):
        trainer.train()
    with pytest.warns(UserWarning, match=r"save_model\(\) before hard_prune\(\): .* carry the formulation's param"):
        trainer.save_model(str(tmp_path / "early"))
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint: .*nowhere is not a folder"):
        trainer._load_formulation_state(str(tmp_path / "nowhere"))


def test_a_hard_prune_that_would_empty_a_layer_changes_nothing_and_can_be_allowed(tmp_path):
    """It used to finalize (gates off) before refusing: no retry could hard-prune, and the error named an option
    the trainer lacked."""
    model = _model()
    args = _args(tmp_path / "run", max_steps=2, save_strategy="no")
    trainer = SparsityTrainer(model, args, train_dataset=_examples(16, 0), targets=_targets(model),
                              formulation="l0", hyperparameters={"scope": "model"})  # fmt: skip
    first = trainer.formulation.problem.targets[0].name
    with torch.no_grad():  # every gate of the first layer shut: model scope keeps none of its weights
        trainer.formulation.gates[first].log_alpha.fill_(-50.0)
    message = (
        rf"^hard_prune\(\): the mask of {re.escape(first)} keeps no weight \(the layer would be cut from the model\); "
    )
    with pytest.raises(ValueError, match=message + r"nothing was changed: call hard_prune\(allow_empty=True\)"):
        trainer.train()
    assert not trainer.formulation.finalized
    trainer.hard_prune(allow_empty=True)
    assert cs.achieved_sparsity(trainer.formulation.problem.targets) == 0.5
    assert int(torch.count_nonzero(trainer.formulation.problem.targets[0].tensor)) == 0


def test_load_best_model_at_end_brings_the_best_checkpoints_formulation_state_back(tmp_path):
    model = _model()
    args = _args(tmp_path / "run", num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch",
                 load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)  # fmt: skip
    scores = iter([1.0, 0.0])  # the first epoch's checkpoint is the best one
    with pytest.warns(UserWarning, match=r"^load_best_model_at_end=True ranks checkpoints taken while the model is pr"):
        trainer = SparsityTrainer(model, args, train_dataset=_examples(64, 0), eval_dataset=_examples(32, 1),
                                  compute_metrics=lambda prediction: {"score": next(scores)}, targets=_targets(model),
                                  formulation="magnitude", hard_prune_at_end=False)  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved = torch.load(f"{best}/formulation.pt", weights_only=True)["masks"]
    current = trainer.formulation.state_dict()["masks"]
    assert best.endswith("checkpoint-8") and (tmp_path / "run" / "checkpoint-16").is_dir()  # best is not the last
    assert all(torch.equal(saved[k], current[k]) for k in saved)


def test_a_conv1d_takes_only_unstructured_targets_in_training():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    from transformers.pytorch_utils import Conv1D

    chosen = cs.Targets(module_types=(Conv1D,))
    assert len(chosen.resolve(model, cs.SparsityConfig(0.5))) == 4
    with pytest.raises(ValueError, match=r"^transformer\.h\.0\.attn\.c_attn\.weight: a transformers Conv1D stores"):
        chosen.resolve(model, cs.SparsityConfig.parse("2:4"))


@pytest.mark.parametrize("formulation", ["magnitude", "slr"])
def test_two_ranks_under_torchrun_stay_identical_and_resume(tmp_path, formulation):
    """magnitude's masks exist before Trainer wraps the model in DDP (one registered after the wrap left the
    ranks' masked weights apart), and a checkpoint resumes under torchrun (its state is read on the CPU)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("hf_trainer_rank.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    for extra in (["--stop-after-first-epoch"], ["--resume"]):
        done = subprocess.run([*launch, formulation, str(tmp_path / "run"), *extra], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "run" / f"final-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name]), name
    assert torch.equal(ranks[0]["multiplier"], ranks[1]["multiplier"])
    weight = ranks[0]["model"]["bert.encoder.layer.0.intermediate.dense.weight"]
    assert float((weight == 0).float().mean()) == 0.5


def _lm_examples(lengths, unlabelled=()) -> list[dict]:
    """Causal-LM examples of 12 tokens whose first ``length`` are labelled (none for the indices in ``unlabelled``)."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for index, length in enumerate(lengths):
        ids = torch.randint(1, 48, (12,), generator=g)
        labels = ids.clone()
        labels[0 if index in unlabelled else length :] = -100
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(12, dtype=torch.long)})
    return examples


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    return LlamaForCausalLM(config)


class _Gradient(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Not pruned, and slr changes no forward: the task loss's gradient alone.
        self.grad = model.model.embed_tokens.weight.grad.clone()


def _mlp_targets(model) -> list:
    return cs.Targets(module_types=(nn.Linear,), include=["model.layers.*.mlp.*"]).resolve(
        model, cs.SparsityConfig(sparsity=0.5)
    )


class _KeywordsOverride:
    """A compute_loss override written with **kwargs (as TRL's are): Trainer's count still reaches the model."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        return super().compute_loss(model, inputs, return_outputs, **kwargs)


@pytest.mark.parametrize("override", [False, True], ids=["trainer's", "**kwargs override"])
def test_a_causal_lm_gets_trainers_token_weighting_across_accumulated_micro_batches(tmp_path, override):
    """With num_items_in_batch, Trainer normalises a causal LM's loss by the tokens of the whole accumulated
    batch, not per micro-batch: the formulation's backward gives the same gradient as Trainer's own."""
    from transformers import Trainer

    examples = _lm_examples((3, 12, 5, 12, 2, 9, 12, 4))  # micro-batches with very different token counts
    plain = type("Plain", (_KeywordsOverride, Trainer), {}) if override else Trainer
    sparse = type("Sparse", (_KeywordsOverride, SparsityTrainer), {}) if override else SparsityTrainer
    grads = []
    for build in (plain, sparse):
        model, seen = _llama(), _Gradient()
        args = _args(
            tmp_path / build.__name__, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2
        )
        extra = {"targets": _mlp_targets(model), "formulation": "slr"} if build is sparse else {}
        build(model, args, train_dataset=examples, callbacks=[seen], **extra).train()
        grads.append(seen.grad)
    assert float((grads[0] - grads[1]).abs().max()) < 1e-4 * float(grads[0].abs().max())  # per micro-batch: 0.75


def test_slrs_reference_batch_has_labelled_tokens_and_epoch_logging_keeps_trainers_last_row(tmp_path):
    """A completion-only first batch has no labelled token (a NaN mean): slr's f takes the next batch. With
    logging_strategy="epoch", the last epoch's formulation metrics join Trainer's own last row."""
    from torch.utils.data import SequentialSampler

    class InOrder(SparsityTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model = _llama()
    args = _args(tmp_path / "run", num_train_epochs=2, per_device_train_batch_size=2, logging_strategy="epoch",
                 save_strategy="no")  # fmt: skip
    examples = _lm_examples([12] * 8, unlabelled=(0, 1))
    trainer = InOrder(model, args, train_dataset=examples, targets=_mlp_targets(model), formulation="slr")
    reference = trainer.formulation.reference_batch["labels"]
    assert (reference != -100).any()  # not the first, unlabelled batch
    trainer.train()
    rows = trainer.state.log_history
    assert all(math.isfinite(row["lagrangian/f_reference"]) for row in rows if "lagrangian/f_reference" in row)
    last_epoch = [row for row in rows if row.get("step") == trainer.state.global_step and "loss" in row]
    assert last_epoch and "train_runtime" in rows[-1]  # Trainer's last training row, then its summary


class _Interrupt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_a_checkpoint_of_an_epochs_last_step_resumes_with_that_epochs_end(tmp_path):
    """Trainer saves at on_step_end, before on_epoch_end: resumed, the epoch is ended before the next one starts
    (slr with interval_unit=epoch coordinated once less, and the weights differed, before)."""

    def build(out, callbacks=()):
        model = _model()
        args = _args(out, num_train_epochs=2, gradient_accumulation_steps=2, save_strategy="steps", save_steps=4,
                     logging_strategy="no")  # fmt: skip
        return SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model),
                               hyperparameters={"interval_unit": "epoch", "interval": 1}, callbacks=list(callbacks),
                               hard_prune_at_end=False)  # fmt: skip

    full = build(tmp_path / "full")
    full.train()
    cut = build(tmp_path / "cut", [_Interrupt(5)])  # 4 optimizer steps an epoch: checkpoint-4 ends epoch 0
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    resumed = build(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.formulation.k == full.formulation.k == 2
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_run_stopped_early_or_shorter_than_an_epoch_neither_warns_nor_skips_coordinating(tmp_path, recwarn):
    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    model = _model()
    args = _args(tmp_path / "stop", num_train_epochs=3, save_strategy="no", logging_strategy="no")
    trainer = SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model), callbacks=[Stop()])
    trainer.train()  # a callback cut epoch 0 at its 3rd of 8 steps: Trainer's choice, not a miscount
    assert not [w for w in recwarn if "constrainedsparse" in str(w.filename) or "post_step" in str(w.message)]
    assert [row for row in trainer.state.log_history if "coordination/k" in row] == []  # logging_strategy="no"
    model = _model()
    args = _args(tmp_path / "short", max_steps=3, save_strategy="no")  # 8 steps an epoch: 3 of them run
    trainer = SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model))
    trainer.train()
    assert trainer.formulation.k == 3  # 4 coordinations an epoch over a 3-step epoch: one after every step
    assert not [w for w in recwarn if "without a coordination" in str(w.message)]


def test_a_schedule_cut_by_max_steps_ends_on_the_steps_trainer_runs(tmp_path, recwarn):
    """Trainer runs max_steps=9 over two epochs of 8 steps: setup() is told 9 steps in all, so a schedule counted in
    steps reaches the target at the last one (it stopped at 0.92 of it over 16 steps), and neither the cut epoch nor
    the hard prune warns."""
    model = _model()
    args = _args(tmp_path / "run", max_steps=9, logging_steps=100, save_strategy="no")
    trainer = SparsityTrainer(model, args, train_dataset=_examples(64, 0), targets=_targets(model),
                              hyperparameters={"sparsity_schedule": "cubic", "schedule_end": 1.0})  # fmt: skip
    assert (trainer.formulation.num_epochs, trainer.formulation.steps_per_epoch) == (2, 8)
    assert trainer.formulation.total_steps == 9
    trainer.train()
    assert trainer.formulation.schedule_fraction() == 1.0
    assert not [w for w in recwarn if "sparsity schedule" in str(w.message) or MISCOUNT in str(w.message)]
    assert cs.achieved_sparsity(trainer.formulation.problem.targets) == 0.5


def test_a_refused_resume_puts_the_formulations_own_state_back(tmp_path):
    """The rollback kept state_dict(), whose tensors are the live ones: the refused checkpoint's load overwrote
    them, so the 'restored' multipliers were the checkpoint's."""
    model = _model()
    args = _args(tmp_path / "run", num_train_epochs=1, save_strategy="no")
    constraints = {"logit": cs.UserConstraint(_mean_square_logit, "<=")}
    trainer = SparsityTrainer(model, args, train_dataset=_examples(16, 0), targets=_targets(model), formulation="slr",
                              constraints=constraints, dual_lr=0.5, hard_prune_at_end=False)  # fmt: skip
    fresh = copy.deepcopy(trainer.formulation.state_dict())  # all multipliers 0
    trainer.train()
    trained = {k: v.clone() for k, v in trainer.formulation.problem.named_multiplier_values().items()}
    assert any(float(v.abs().sum()) > 0 for v in trained.values())
    (tmp_path / "plain").mkdir()
    torch.save(fresh, tmp_path / "plain" / "formulation.pt")  # a formulation state, but no model weights
    with pytest.raises(ValueError, match=r"Can't find a valid checkpoint"):  # Trainer's own refusal, after the load
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain"))
    now = trainer.formulation.problem.named_multiplier_values()
    assert all(torch.equal(now[name], value) for name, value in trained.items())
