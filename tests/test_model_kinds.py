"""Models and batches of every kind a user trains: float64 and bfloat16 weights, batch classes, longer runs."""

import dataclasses

import pytest
import torch
from torch import nn

import constrainedsparse as cs

FORMULATIONS = ("slr", "admm", "l0", "magnitude")


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def _train(method, model, batch, problem_kwargs, epochs=2, steps=3, declared=None):
    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.75))
    problem = cs.SparsityProblem(model, targets=targets, **problem_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    formulation = cs.make(method, problem, optimizer=optimizer)
    formulation.setup(epochs if declared is None else declared, steps, reference_batch=batch)
    for epoch in range(epochs):
        formulation.start_epoch(epoch)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            step = formulation.backward(batch)
            optimizer.step()
            formulation.post_step(step)
        formulation.end_epoch(epoch)
    masks = formulation.hard_masks()
    formulation.finalize()
    cs.hard_prune(targets, masks)
    return targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", FORMULATIONS)
def test_every_formulation_trains_a_model_in_its_own_dtype(method, dtype):
    model = _model(dtype)
    batch = (torch.randn(32, 8, dtype=dtype), torch.randint(0, 3, (32,)))
    targets = _train(method, model, batch, {"loss_fn": nn.functional.cross_entropy})
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.isfinite(t.tensor).all() for t in targets)
    assert cs.achieved_sparsity(targets) == pytest.approx(0.75, abs=0.01)


@dataclasses.dataclass
class Batch:
    """A batch class of the user's own."""

    x: torch.Tensor
    y: torch.Tensor


@pytest.mark.parametrize("method", FORMULATIONS)
def test_a_batch_class_of_the_users_own_with_compute_loss(method):
    model = _model()
    batch = Batch(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    kwargs = {"compute_loss": lambda m, b: nn.functional.cross_entropy(m(b.x), b.y)}
    targets = _train(method, model, batch, kwargs)
    assert cs.achieved_sparsity(targets) == pytest.approx(0.75, abs=0.01)
    assert cs.batches.batch_size(batch) == 32
    moved = cs.batches.map_tensors(batch, lambda t: t + 1)
    assert isinstance(moved, Batch) and torch.equal(moved.x, batch.x + 1) and torch.equal(moved.y, batch.y + 1)


def test_magnitude_stays_at_the_target_past_the_declared_epochs():
    model = _model()
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    targets = _train("magnitude", model, batch, {"loss_fn": nn.functional.cross_entropy}, epochs=5, declared=3)
    assert cs.achieved_sparsity(targets) == pytest.approx(0.75, abs=0.01)


def test_a_setup_that_fails_leaves_the_formulation_not_ready():
    model = _model()
    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.5))
    problem = cs.SparsityProblem(model, targets=targets, compute_loss=lambda m, b: m(b["x"]).sum())
    formulation = cs.make("slr", problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    # the user's loss fails on the reference batch in setup (slr measures f there)
    with pytest.raises(KeyError, match="^'x'$"):
        formulation.setup(1, 1, reference_batch={"input": torch.randn(4, 8)})
    with pytest.raises(ValueError, match=r"^call setup\(num_epochs, steps_per_epoch\[, reference_batch\]\) before"):
        formulation.backward(torch.randn(4, 8))


@pytest.mark.parametrize("method", FORMULATIONS)
def test_a_diverged_own_loop_is_stopped_at_the_end_of_its_epoch(method):
    model = _model()
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    diverge = {"now": False}

    def loss_fn(out, y):
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if diverge["now"] else loss

    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.75))
    problem = cs.SparsityProblem(model, loss_fn, targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    formulation = cs.make(method, problem, optimizer=optimizer)
    formulation.setup(2, 3, reference_batch=batch)
    formulation.start_epoch(0)
    formulation.training_step(batch)
    formulation.end_epoch(0)  # finite: no error
    formulation.start_epoch(1)
    diverge["now"] = True
    formulation.training_step(batch)
    diverge["now"] = False  # the weights are NaN now: every later loss is too
    formulation.training_step(batch)
    with pytest.raises(cs.NonFiniteLossError, match=r"^the loss is nan at the last step of epoch 1: the weights"):
        formulation.end_epoch(1)
    with pytest.raises(cs.NonFiniteLossError, match=r"^the loss is nan at the last step before hard_masks\(\)"):
        formulation.hard_masks()


def test_a_float16_model_that_diverges_is_told_to_keep_float32_weights():
    """Adam's eps (1e-8) is 0 in float16: a float16 model goes NaN where a float32 one trains; the advice says so."""
    model = _model(torch.float16)
    batch = (torch.randn(32, 8, dtype=torch.float16), torch.randint(0, 3, (32,)))
    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.75))
    problem = cs.SparsityProblem(model, lambda out, y: nn.functional.cross_entropy(out, y) * float("nan"), targets)
    formulation = cs.make("magnitude", problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    formulation.setup(1, 1)
    formulation.start_epoch(0)
    formulation.training_step(batch)
    with pytest.raises(cs.NonFiniteLossError, match=r"the model's weights are float16, whose range a step \(and Adam"):
        formulation.end_epoch(0)


def test_a_constraint_that_turns_nan_at_an_epochs_last_step_is_named():
    model = _model()
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    first = next(model.parameters())
    # sqrt of a negative value in training: nan, while the loss stays finite (finite where it is sized, in eval mode)
    constraint = cs.UserConstraint(lambda m: (first.sum() - 1e6).sqrt() if m.training else first.sum(), "<=")
    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.75))
    problem = cs.SparsityProblem(model, nn.functional.cross_entropy, targets, {"root": constraint})
    formulation = cs.make("magnitude", problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    formulation.setup(1, 1)
    formulation.start_epoch(0)
    step = formulation.backward(batch)
    formulation.post_step(step)
    with pytest.raises(
        cs.NonFiniteLossError,
        match=r"^the loss is finite but constraint 'root' is not \(its value or multiplier\) at the last step of "
        r"epoch 0: the step took a non-finite gradient from it; make it finite wherever the weights can go .* and "
        r"on every batch \(one non-finite input makes a batch constraint's violation, and so its multiplier, NaN",
    ):
        formulation.end_epoch(0)
    del step  # the caller no longer holds the step: its multiplier (nan after the dual step) still names it
    with pytest.raises(cs.NonFiniteLossError, match=r"^the loss is finite but constraint 'root' is not"):
        formulation.hard_masks()


def test_an_epoch_with_other_post_step_calls_than_declared_warns_once():
    import warnings

    model = _model()
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.75))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    formulation = cs.make("slr", cs.SparsityProblem(model, nn.functional.cross_entropy, targets), optimizer=optimizer)
    formulation.setup(2, 8, reference_batch=batch)  # 8 micro-batches, accumulated in pairs: 4 optimizer steps
    for epoch in range(2):
        formulation.start_epoch(epoch)
        for _ in range(4):
            optimizer.zero_grad()
            steps = [formulation.backward(batch, scale=0.5) for _ in range(2)]
            optimizer.step()
            formulation.post_step(steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            formulation.end_epoch(epoch)
        messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        if epoch == 0:
            assert messages == [
                "setup() declared 8 steps for epoch 0, but it had 4 post_step() and skip_step() calls: the schedules "
                "count those calls (optimizer steps with gradient accumulation, not micro-batches; a batch skipped "
                "after backward() counts through skip_step()); pass that number to setup() (and total_steps when the "
                "last epoch is cut short)"
            ]
        else:
            assert messages == []  # once per run


def test_an_evaluation_loop_may_compute_the_lagrangian_under_no_grad():
    model = _model()
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.75))
    norm = cs.UserConstraint(lambda m: m[0].weight.norm() - 1.0, "<=")
    formulation = cs.make("slr", cs.SparsityProblem(model, nn.functional.cross_entropy, targets, {"norm": norm}))
    formulation.setup(1, 1, reference_batch=batch)
    with torch.no_grad():  # e.g. transformers.Trainer.evaluate() calling an overridden compute_loss
        step = formulation.compute_lagrangian(batch)
    assert torch.isfinite(step.lagrangian) and not step.lagrangian.requires_grad
    metrics = formulation.problem.step_metrics(step.cmp_state)
    assert set(metrics) == {"loss/train", "violation/norm", "multiplier/norm"} and metrics["multiplier/norm"] == 0.0


@pytest.mark.parametrize("method", ["slr", "admm", "l0"])
def test_an_embedding_with_sparse_gradients_is_refused_by_the_formulations_that_need_dense_ones(method):
    model = nn.Sequential(nn.Embedding(20, 16, sparse=True), nn.Flatten(), nn.Linear(64, 3))
    targets = cs.Targets(module_types=(nn.Embedding, nn.Linear)).resolve(model, cs.SparsityConfig(sparsity=0.5))
    problem = cs.SparsityProblem(model, nn.functional.cross_entropy, targets)
    expected = (
        rf"^{method} needs dense gradients, but 0\.weight belongs to an Embedding "
        r"with sparse=True: build it with sparse=False, exclude it from the Targets, or use magnitude$"
    )
    with pytest.raises(ValueError, match=expected):
        cs.make(method, problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    cs.make("magnitude", problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))  # masks: any gradient


def test_a_model_on_the_meta_device_is_refused_when_its_targets_are_resolved():
    with torch.device("meta"):
        model = _model()
    expected = (
        r"^0\.weight is on the meta device \(it has no values yet\): load the model's "
        r"weights before resolving its targets"
    )
    with pytest.raises(ValueError, match=expected):
        cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.5))


def test_a_model_offloaded_to_disk_by_accelerate_is_refused_before_pruning(tmp_path, tiny_llama):
    # Its offloaded weights are meta tensors read per forward: the message said to load the weights, as it was.
    from transformers import AutoModelForCausalLM

    layout = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device_map=layout, offload_folder=tmp_path / "offload")
    batches = [{"input_ids": torch.randint(0, 100, (2, 8))}]
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.self_attn\.q_proj\.weight is offloaded to disk \(from_"):
        cs.prune_layerwise(model, batches, "wanda", sparsity=0.5)
    with pytest.raises(ValueError, match=r"^model\.layers\.1\..*offloaded to disk .* memory before resolving its"):
        cs.Targets(include=["model.layers.*"]).resolve(model, cs.SparsityConfig(sparsity=0.5))
    with torch.device("meta"):  # on the meta device without a placement: no weights were loaded
        empty = _model()
    empty.hf_device_map = {"": "cpu"}
    with pytest.raises(ValueError, match=r"^0\.weight is on the meta device"):
        cs.Targets().resolve(empty, cs.SparsityConfig(sparsity=0.5))
