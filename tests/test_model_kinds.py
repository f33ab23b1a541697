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
    with pytest.raises(KeyError):  # the user's loss fails on the reference batch in setup (slr measures f there)
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
