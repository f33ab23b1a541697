"""The library in the user's own loop: their optimizer, their batches, their step, the whole lifecycle."""

import copy
import math
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

from constrainedsparse import (
    SparsityConfig,
    SparsityProblem,
    Targets,
    UserConstraint,
    achieved_sparsity,
    apply_masks,
    hard_prune,
    make,
    remove_masks,
)
from constrainedsparse.errors import NonFiniteLossError


def _cancer(seed=0):
    data = load_breast_cancer()
    x = torch.tensor((data.data - data.data.mean(0)) / data.data.std(0), dtype=torch.float32)
    y = torch.tensor(data.target)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))
    return model, x, y


def _batches(x, y, size=64):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize(
    ("schedule", "warns"),
    [
        (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=20), True),
        (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3, 0.5], total_steps=20), False),
        (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20), False),
    ],
)
def test_l0_warns_once_when_one_cycle_peaks_the_gates_at_the_weights_rate(schedule, warns):
    # OneCycleLR sets every group's rate from its max_lr: with one number the gates would learn at the weights'
    # rate. One max_lr per group (the gates' last) or a multiplicative schedule keeps gate_lr.
    model, x, y = _cancer()
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.7)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    f = make("l0", problem, optimizer=optimizer, gate_lr=0.5)
    scheduler = schedule(optimizer)
    f.setup(num_epochs=1, steps_per_epoch=3)
    f.start_epoch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in _batches(x, y)[:3]:
            f.training_step(batch)
            scheduler.step()
    found = [w for w in caught if "OneCycleLR peaks the gates' group" in str(w.message)]
    assert len(found) == (1 if warns else 0)
    if warns:
        assert found[0].filename == __file__ and "max_lr=[lr, gate_lr]" in str(found[0].message)


@pytest.mark.parametrize("before", [True, False], ids=["scheduler-before-make", "after"])
def test_l0_warns_when_a_scheduler_already_holds_the_optimizer_it_adds_the_gates_to(before):
    model, x, y = _cancer()
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.7)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if before:
        torch.optim.lr_scheduler.LinearLR(optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make("l0", problem, optimizer=optimizer)
    found = [w for w in caught if "already holds (its groups carry initial_lr)" in str(w.message)]
    assert len(found) == int(before) and all(w.filename == __file__ for w in found)
    assert all(str(w.message).endswith("build the scheduler after make()") for w in found)


@pytest.mark.parametrize("name", ["slr", "admm", "l0", "magnitude"])
def test_own_sgd_momentum_and_cosine_schedule_drive_every_formulation(name):
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.7))
    budget = UserConstraint(lambda m: m[0].weight.norm() - 8.0, "<=")
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets, {"budget": budget})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    f = make(name, problem, optimizer=optimizer, dual_lr=0.05, **({"gate_lr": 0.2} if name == "l0" else {}))
    assert f.optimizer is optimizer
    batches = _batches(x, y)
    f.setup(num_epochs=3, steps_per_epoch=len(batches), reference_batch=(x[:128], y[:128]))
    for epoch in range(3):
        f.start_epoch(epoch)
        for batch in batches:
            f.training_step(batch)
        f.end_epoch(epoch)
        schedule.step()
    weight = targets[0].stored
    assert "momentum_buffer" in optimizer.state[weight]  # the user's optimizer was the one stepped
    factor = (1 + math.cos(3 * math.pi / 4)) / 2  # the cosine schedule after 3 of T_max = 4 epochs
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * factor)
    if name == "l0":  # the gates' own group, at gate_lr, follows the user's schedule too
        gates = optimizer.param_groups[-1]
        assert gates["lr"] == pytest.approx(0.2 * factor) and gates["momentum"] == 0.0 and gates["weight_decay"] == 0.0
        assert {id(p) for p in gates["params"]} == {id(g.log_alpha) for g in f.gates.values()}
    masks = f.hard_masks()
    f.finalize()
    hard_prune(targets, masks)
    assert achieved_sparsity(targets) == pytest.approx(0.7, abs=2e-3)
    if type(f).exact_layer_sparsity(f.config):
        assert all(int(torch.count_nonzero(t.tensor)) == t.feasible_set.k for t in targets)


def test_masked_fine_tuning_with_apply_and_remove_masks():
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.8))
    masks = {t.name: t.feasible_set.mask(t.tensor) for t in targets}
    with pytest.raises(ValueError, match=r"^masks name no target: '0\.weigth'; the targets are 0\.weight, 2\.weight$"):
        apply_masks(targets, {"0.weigth": masks["0.weight"]})
    with pytest.raises(ValueError, match=r"^the mask of 0\.weight has shape \(3, 3\), the tensor \(32, 30\)$"):
        apply_masks(targets, {"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    apply_masks(targets, masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in _batches(x, y):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
    remove_masks(targets)
    assert achieved_sparsity(targets) == pytest.approx(0.8, abs=2e-3)
    for t in targets:
        assert torch.equal(t.tensor != 0, masks[t.name] & (t.tensor != 0))


def _step_state(f):
    return [p.detach().clone() for p in f.problem.model.parameters()] + [
        m.weight.detach().clone() for _, m in f.problem.named_multipliers()
    ]


@pytest.mark.parametrize("name", ["slr", "l0"])
def test_split_step_equals_training_step_bit_for_bit(name):
    states = []
    for split in (False, True):
        torch.manual_seed(3)
        model, x, y = _cancer(seed=1)
        targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
        budget = UserConstraint(lambda m: m[0].weight.norm() - 5.0, "<=")
        problem = SparsityProblem(model, nn.functional.cross_entropy, targets, {"budget": budget})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        f = make(name, problem, optimizer=optimizer, dual_lr=0.1, **({"interval": 3} if name == "slr" else {}))
        f.setup(1, 9, reference_batch=(x[:64], y[:64]))
        for batch in _batches(x, y)[:9]:
            if split:
                optimizer.zero_grad(set_to_none=True)
                step = f.backward(batch)
                optimizer.step()
                f.post_step(step)
            else:
                f.training_step(batch)
        states.append(_step_state(f))
    assert len(states[0]) == len(states[1])
    assert all(torch.equal(a, b) for a, b in zip(*states))


def test_clipping_and_accumulation_between_backward_and_the_primal_step():
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
    problem = SparsityProblem(
        model, nn.functional.cross_entropy, targets, {"budget": UserConstraint(lambda m: m[0].weight.norm() - 0.5)}
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    f = make("admm", problem, optimizer=optimizer, dual_lr=0.5)
    f.setup(1, 4)
    micro = _batches(x, y, size=16)[:4]
    optimizer.zero_grad()
    steps = [f.backward(batch, scale=1 / len(micro)) for batch in micro]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    assert float(norm) > 0.01
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) == pytest.approx(0.01, rel=1e-4)
    optimizer.step()
    violations = [float(s.cmp_state.observed_constraints[problem.budget].violation.detach()) for s in steps]
    f.post_step(steps)
    # the multiplier took one ascent step on the mean violation of the accumulated micro-batches
    mean = sum(violations) / len(violations)
    assert mean > 0  # violated: the multiplier's projection onto >= 0 leaves the step as it is
    assert float(problem.budget.multiplier.weight.detach()) == pytest.approx(0.5 * mean, rel=1e-5)


def test_amp_autocast_and_grad_scaler_on_cpu():
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    f = make("slr", problem, optimizer=optimizer, interval=2)
    f.setup(1, 4, reference_batch=(x[:64], y[:64]))
    before = model[0].weight.detach().clone()
    for batch in _batches(x, y)[:4]:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step = f.backward(batch, scaler=scaler)
        scaler.step(optimizer)
        scaler.update()
        f.post_step(step)
    assert step.loss.dtype == torch.bfloat16 or step.loss.dtype == torch.float32
    assert not torch.equal(before, model[0].weight) and f.k == 2


def test_l0_gate_group_on_adam_keeps_the_users_beta2():
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(sparsity=0.5))
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    f = make("l0", problem, optimizer=optimizer, gate_lr=0.3, gate_momentum=0.5)
    weights, gates = optimizer.param_groups
    assert weights["weight_decay"] == 0.1 and gates["weight_decay"] == 0.0
    assert gates["betas"] == (0.5, 0.95) and gates["lr"] == 0.3
    f.setup(1, 1)
    f.training_step(_batches(x, y)[0])


def test_hyperparameters_as_keywords_and_their_errors():
    model, x, y = _cancer()
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    f = make("slr", problem, rho=0.05, interval=20)
    assert (f.config.rho, f.config.interval) == (0.05, 20)
    model, x, y = _cancer()
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    g = make("admm", problem, {"rho": 0.03})  # a mapping works too
    assert g.config.rho == 0.03
    with pytest.raises(
        ValueError, match=r"^unknown hyperparameter 'rhoo' for formulation 'slr'; allowed: M, interval, "
    ):
        make("slr", problem, rhoo=1.0)
    with pytest.raises(ValueError, match=r"^rho='abc' must be a float$"):
        make("slr", problem, rho="abc")
    with pytest.raises(ValueError, match=r"^rho must be > 0, got -1.0$"):
        make("slr", problem, rho=-1)
    with pytest.raises(ValueError, match=r"^s0 must be a finite number > 0, got inf$"):
        make("slr", problem, s0=float("inf"))
    with pytest.raises(ValueError, match=r"^interval must be an integer >= 1, got 2.5$"):
        make("admm", problem, interval=2.5)
    with pytest.raises(ValueError, match=r"^schedule must be 'cubic' or 'oneshot', got 'linear'$"):
        make("magnitude", problem, schedule="linear")
    with pytest.raises(ValueError, match=r"^optimizer must be a torch.optim.Optimizer, got str$"):
        make("magnitude", problem, optimizer="sgd")
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got nan$"):
        make("magnitude", problem, lr=float("nan"))


def test_a_second_formulation_on_the_same_tensors_is_refused_until_the_first_is_finalized():
    """On the same problem or a new one over the same model (a notebook cell run again): the first one's
    gradient hooks, masks or gates would stay and stack; a copy of the model or a finalized first one is free."""
    import copy

    model, _, _ = _cancer()

    def problem_of(m: nn.Module) -> SparsityProblem:
        return SparsityProblem(m, nn.functional.cross_entropy, Targets().resolve(m, SparsityConfig(0.5)))

    problem = problem_of(model)
    first = make("slr", problem)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for again in (problem, problem_of(model)):
        with pytest.raises(
            ValueError, match=r"^0.weight is pruned already by a 'slr' formulation built on this model "
        ):
            make("l0", again)
    assert model.state_dict().keys() == before.keys()  # nothing attached by the refused one
    make("l0", problem_of(copy.deepcopy(model)))
    first.finalize()
    make("magnitude", problem_of(model))


@pytest.mark.parametrize("name", ["slr", "admm", "l0", "magnitude"])
def test_a_formulation_on_tensors_the_user_masked_is_refused_and_the_masks_stay(name):
    """Masks of apply_masks (a masked fine-tuning): magnitude overwrote them with ones, l0 stacked its gates on them
    and brought the masked weights back, a refused slr/admm build baked and removed them."""
    model, _, _ = _cancer()
    targets = Targets().resolve(model, SparsityConfig(0.5))
    masks = {t.name: torch.rand_like(t.tensor) < 0.5 for t in targets}
    apply_masks(targets, masks)
    stored = {t.name: t.stored.detach().clone() for t in targets}
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    with pytest.raises(
        ValueError,
        match=rf"^{name}: 0\.weight carries masks already \(apply_masks\): keep them with "
        r"hard_prune\(targets, masks\) or take them off with remove_masks\(targets\) before make\(\)$",
    ):
        make(name, problem)
    for t in targets:
        assert torch.equal(t.stored, stored[t.name]) and torch.equal(
            t.tensor != 0, masks[t.name] & (stored[t.name] != 0)
        )
    hard_prune(targets, masks)
    make(name, SparsityProblem(model, nn.functional.cross_entropy, targets))  # baked in: a plain weight again


@pytest.mark.parametrize("name", ["magnitude", "l0", "masks"])
def test_masks_and_gates_that_came_and_went_leave_the_parameters_in_their_order(name):
    """torch re-adds a tensor whose parametrization is removed at the end of its module's parameters: after a
    finalize the bias came before its weight, and a copy, an EMA or an optimizer state by position was off."""
    model, x, y = _cancer()
    order = [n for n, _ in model.named_parameters()]
    targets = Targets().resolve(model, SparsityConfig(0.5))
    if name == "masks":
        apply_masks(targets, {t.name: t.tensor != 0 for t in targets})
        remove_masks(targets)
    else:
        f = make(name, SparsityProblem(model, nn.functional.cross_entropy, targets))
        f.setup(1, 1)
        f.start_epoch(0)
        f.training_step((x, y))
        masks = f.hard_masks()
        f.finalize()
        hard_prune(targets, masks)
    assert [n for n, _ in model.named_parameters()] == list(model.state_dict()) == order


@pytest.mark.parametrize("name", ["slr", "l0"])
def test_a_copy_of_a_gated_model_is_refused_naming_its_gates(name):
    """A deep copy made while l0 was attached carries gates but no claim (the claim stays with the original):
    another formulation would stack on the gates; the refusal names them, not masks."""
    import copy

    model, _, _ = _cancer()
    make("l0", SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5))))
    twin = copy.deepcopy(model)
    problem = SparsityProblem(twin, nn.functional.cross_entropy, Targets().resolve(twin, SparsityConfig(0.5)))
    with pytest.raises(
        ValueError,
        match=rf"^{name}: 0\.weight carries a HardConcreteGate parametrization already \(a copy of the "
        r"model made while a formulation was attached keeps its gates\): prune the model whose formulation",
    ):
        make(name, problem)


@pytest.mark.parametrize(
    "name, config",
    [("slr", {}), ("l0", {"droprate_init": 0.5}), ("l0", {"scope": "layer"}), ("l0-penalty", {}), ("magnitude", {})],
)
def test_discard_takes_the_build_back_without_baking_anything_in(name, config):
    """What SparsityTrainer does when its __init__ fails after make: finalize() baked l0's test-time gates into
    the weights and left the gates' group in the user's optimizer; l0-penalty and layer-scope l0 left their
    step hook on the optimizer (each holding the discarded formulation alive, one more per make/discard)."""
    import gc
    import weakref

    model, x, y = _cancer()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    f = make(name, problem, optimizer=optimizer, **config)
    f.discard()
    again = make(name, problem, optimizer=optimizer, **config)
    again.discard()
    gone = weakref.ref(again)
    del again
    gc.collect()
    assert gone() is None and not optimizer._optimizer_step_post_hooks
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert [g["params"] for g in optimizer.param_groups if g["params"]] == [list(model.parameters())]
    assert not optimizer.state and problem.constraint_names() == [] and f.finalized  # l0's gates' groups: emptied
    with pytest.raises(ValueError, match=r"^discard\(\) after finalize\(\): the formulation has already removed"):
        f.discard()
    make(name, problem)  # the tensors are free again


@pytest.mark.parametrize("name", ["slr", "l0", "magnitude"])
def test_discard_keeps_the_parameter_groups_the_user_added_after_make(name):
    """discard() removed every group added since make() (by count): the user's own too, with its state. Its own
    groups are emptied and stay, as after finalize(): a scheduler built after make() counts them."""
    model, x, y = _cancer()
    optimizer = torch.optim.Adam([model[0].weight, model[2].weight], lr=0.01)
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    f = make(name, problem, optimizer=optimizer)
    optimizer.add_param_group({"params": [model[0].bias, model[2].bias], "lr": 1e-3})  # e.g. unfrozen later
    f.setup(1, 1, (x[:32], y[:32]))
    f.start_epoch(0)
    step = f.backward((x, y))
    optimizer.step()
    f.post_step(step)
    f.load_state_dict(f.state_dict())  # a resume: l0 finds its gates' group by its parameters, not its dict
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.1)  # counts l0's gates' group too
    f.discard()
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups if g["params"]] == [
        [id(model[0].weight), id(model[2].weight)],
        [id(model[0].bias), id(model[2].bias)],
    ]
    assert model[0].bias in optimizer.state
    scheduler.step()  # l0's group is emptied, not removed from the middle of the list (whose lr went to the next)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1e-3 * 0.1)  # the biases' own base rate


def test_a_failed_build_leaves_model_optimizer_and_problem_as_they_were():
    """l0 adds gates, a parameter group and its density constraint, slr its W = Z constraints and hooks; a
    build refused part-way (a constraint of yours under the formulation's own name) takes all of it back."""
    model, _, _ = _cancer()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    targets = Targets().resolve(model, SparsityConfig(0.5))
    mine = {"l0_density": UserConstraint(lambda m: m[0].weight.norm() - 3.0)}
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets, mine)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^constraint 'l0_density' is one of yours, and the formulation being "):
        make("l0", problem, optimizer=optimizer)
    assert len(optimizer.param_groups) == 1 and problem.constraint_names() == ["l0_density"]
    model[-1].weight.requires_grad_(False)  # slr registers 0.weight's constraint and hook, then refuses this one
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    with pytest.raises(ValueError, match=r"^slr trains the weights towards Z, but 2\.weight is frozen"):
        make("slr", problem)
    assert problem.constraint_names() == []
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert model.state_dict().keys() == weights.keys()  # no gates or masks left
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # nothing baked
    model[-1].weight.requires_grad_(True)
    make("magnitude", SparsityProblem(model, nn.functional.cross_entropy, targets))  # the model is free


def _pruned_cancer():
    """The breast-cancer MLP with half of each targeted weight already zero (a model pruned one-shot before)."""
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(0.5))
    with torch.no_grad():
        for target in targets:
            target.tensor[target.tensor.abs() <= target.tensor.abs().median()] = 0.0
    return model, x, y, targets


def test_magnitudes_cubic_schedule_on_a_pruned_model_warns_that_its_zeros_train_again_and_oneshot_keeps_them():
    model, x, y, targets = _pruned_cancer()
    zeros = {t.name: t.tensor == 0 for t in targets}
    f = make("magnitude", SparsityProblem(model, nn.functional.cross_entropy, targets))
    f.setup(4, 1)
    with pytest.warns(UserWarning, match=r"^magnitude: 0.weight holds 5\d% zeros already \(a model pruned before\?\), "
                      r"but the cubic schedule's first masks prune 2\d%: \d+ of the zeros its target mask prunes "
                      r"train again .* use schedule='oneshot'$"):  # fmt: skip
        f.start_epoch(0)

    for pattern, zero_init in [("2:4", False), (None, True)]:  # N:M applies in full; a zero-initialised layer
        model, x, y, targets = _pruned_cancer()
        if zero_init:
            with torch.no_grad():
                model[0].weight.normal_()
                model[2].weight.zero_()
        config = SparsityConfig(pattern="2:4") if pattern else SparsityConfig(0.5)
        where = Targets(include=["2.weight"]) if pattern else Targets()  # 2:4 needs 32 inputs (the first has 30)
        f = make("magnitude", SparsityProblem(model, nn.functional.cross_entropy, where.resolve(model, config)))
        f.setup(4, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            f.start_epoch(0)

    model, x, y, targets = _pruned_cancer()
    f = make("magnitude", SparsityProblem(model, nn.functional.cross_entropy, targets), schedule="oneshot")
    f.setup(4, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f.start_epoch(0)
        for _ in range(3):
            f.training_step((x, y))
    assert all(torch.equal(t.tensor == 0, zeros[t.name]) for t in targets)  # the one-shot zeros, kept exactly


def test_an_optimizer_that_does_not_hold_the_targets_is_refused():
    model, _, _ = _cancer()
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"^the optimizer does not hold 0.weight: build it over this model's parameters \(model\.parameters",
    ):
        make("slr", problem, optimizer=optimizer)


def test_lifecycle_calls_out_of_order_name_the_missing_step():
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(0.5))
    f = make("l0", SparsityProblem(model, nn.functional.cross_entropy, targets))
    with pytest.raises(
        ValueError, match=r"^call setup\(num_epochs, steps_per_epoch\[, reference_batch\]\) before training_step\(\)$"
    ):
        f.training_step((x, y))
    with pytest.raises(ValueError, match=r"before start_epoch\(\)"):
        f.start_epoch(0)
    with pytest.raises(
        ValueError,
        match=r"^0.weight still carries a HardConcreteGate parametrization: call the formulation's finalize\(\)",
    ):
        hard_prune(targets, f.hard_masks())
    f.setup(1, 1)
    f.training_step((x, y))
    masks = f.hard_masks()
    f.finalize()
    with pytest.raises(ValueError, match=r"^hard_masks\(\) after finalize\(\): call hard_masks\(\) first"):
        f.hard_masks()
    with pytest.raises(ValueError, match=r"^finalize\(\) was already called$"):
        f.finalize()
    with pytest.raises(ValueError, match=r"^training_step\(\) after finalize\(\)"):
        f.training_step((x, y))
    with pytest.raises(ValueError, match=r"^masks name no target: '0\.weigth'; the targets are 0\.weight"):
        hard_prune(targets, {"0.weigth": masks["0.weight"]})
    emptied = {**masks, "0.weight": torch.zeros_like(masks["0.weight"])}
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"^hard_prune\(targets, masks\): the mask of 0\.weight keeps no weight \(the"):
        hard_prune(targets, emptied)
    assert torch.equal(model[0].weight, before)  # nothing changed
    hard_prune(targets, emptied, allow_empty=True)
    assert not model[0].weight.any() and model[2].weight.any()
    other, _, _ = _cancer()
    slr = make(
        "slr", SparsityProblem(other, nn.functional.cross_entropy, Targets().resolve(other, SparsityConfig(0.5)))
    )
    with pytest.raises(ValueError, match=r"^slr needs a reference batch: pass reference_batch to setup\(\)"):
        slr.setup(1, 1)


def test_constraints_that_return_a_float_or_have_no_gradient_are_refused():
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(0.5))
    with pytest.raises(
        ValueError,
        match=r"^constraint 'norm' must return a tensor differentiable in the model's parameters, got float$",
    ):
        SparsityProblem(
            model,
            nn.functional.cross_entropy,
            targets,
            {"norm": UserConstraint(lambda m: m[0].weight.norm().item() - 1)},
        )
    with pytest.raises(ValueError, match=r"^constraint 'np' must return a tensor .*, got numpy\.float32$"):
        SparsityProblem(  # not torch.float32, the dtype
            model,
            nn.functional.cross_entropy,
            targets,
            {"np": UserConstraint(lambda m: np.float32(m[0].weight.norm().item()))},
        )
    with pytest.raises(
        ValueError, match=r"^constraint 'none' must return a non-empty floating-point tensor, got an empty"
    ):
        SparsityProblem(
            model, nn.functional.cross_entropy, targets, {"none": UserConstraint(lambda m: m[0].weight[:0])}
        )
    detached = {"norm": UserConstraint(lambda m: m[0].weight.detach().norm() - 1)}
    f = make("magnitude", SparsityProblem(model, nn.functional.cross_entropy, targets, detached))
    f.setup(1, 1)
    f.start_epoch(0)
    with pytest.raises(ValueError, match=r"^constraint 'norm' has no gradient path to the model's parameters"):
        f.training_step((x, y))


def test_batches_that_are_not_pairs_need_compute_loss():
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(0.5))
    f = make("admm", SparsityProblem(model, nn.functional.cross_entropy, targets))
    f.setup(1, 1)
    with pytest.raises(
        ValueError, match=r"^loss_fn takes \(inputs, targets\) batches, got a tuple of 3: pass compute_loss"
    ):
        f.training_step((x, y, torch.ones(len(y))))
    f.finalize()  # the same tensors take one formulation at a time

    def weighted(net, batch):
        inputs, labels, weights = batch
        return (nn.functional.cross_entropy(net(inputs), labels, reduction="none") * weights).mean()

    seen = []
    constraint = UserConstraint(lambda m, batch: (seen.append(len(batch)), m[0].weight.norm() - 9.0)[1])
    problem = SparsityProblem(model, None, targets, {"c": constraint}, example_batch=(x, y, torch.ones(len(y))),
                              compute_loss=weighted)  # fmt: skip
    g = make("slr", problem, interval=1)
    g.setup(1, 1, reference_batch=(x[:32], y[:32], torch.ones(32)))
    cmp_state, metrics = g.training_step((x, y, torch.ones(len(y))))
    assert cmp_state.loss.dim() == 0 and "dual/residual" in metrics and set(seen) == {3}
    with pytest.raises(ValueError, match=r"^give exactly one of loss_fn"):
        SparsityProblem(model, nn.functional.cross_entropy, targets, compute_loss=weighted)
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"^compute_loss must return a scalar tensor, got \(569, 2\)"):
        bad = SparsityProblem(other, None, Targets().resolve(other, SparsityConfig(0.5)),
                              compute_loss=lambda net, batch: net(batch[0]))  # fmt: skip
        bad.compute_cmp_state((x, y))
    with pytest.raises(ValueError, match=r"^target 0\.weight is not a parameter of this model: resolve the targets"):
        SparsityProblem(copy.deepcopy(model), nn.functional.cross_entropy, targets)


def _built(name, seed=0, hidden=32, **hyperparameters):
    data = load_breast_cancer()
    x = torch.tensor((data.data - data.data.mean(0)) / data.data.std(0), dtype=torch.float32)[:128]
    y = torch.tensor(data.target)[:128]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    norm = {"norm": UserConstraint(lambda m: m[0].weight.norm() - 1.0)}
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)), norm)
    f = make(name, problem, **hyperparameters)
    f.setup(1, 4, reference_batch=(x, y))
    return f, x, y


@pytest.mark.parametrize("name", ["admm", "slr", "magnitude", "l0"])
def test_a_backward_of_your_own_inside_without_penalty_gets_only_its_own_gradient(name):
    """An auxiliary loss after backward(): slr/admm's hooks added the W = Z penalty to it a second time."""
    f, x, y = _built(name)
    f.start_epoch(0)
    for _ in range(3):
        f.training_step((x, y))  # Λ and W - Z away from 0
    weight = f.problem.targets[-1].stored  # the parameter itself (magnitude's and l0's are parametrized)
    f.optimizer.zero_grad()
    f.backward((x, y))
    after_step = weight.grad.clone()
    with f.without_penalty():
        (weight * 1e-3).sum().backward()
    assert torch.allclose(weight.grad, after_step + 1e-3)
    with f.without_penalty():  # an f.backward inside keeps its own penalty and leaves the context paused
        f.backward((x, y))
        before = weight.grad.clone()
        (weight * 1e-3).sum().backward()
        assert torch.allclose(weight.grad, before + 1e-3)
    f.optimizer.zero_grad()
    f.backward((x, y))
    after_step = weight.grad.clone()
    (weight * 1e-3).sum().backward()  # outside: slr/admm add the penalty again
    again = weight.grad - after_step - 1e-3
    if name in ("slr", "admm"):
        penalty = f.multipliers()["2.weight"] + f.rho * (weight.detach() - f.z["2.weight"])
        assert float(penalty.norm()) > 1e-3 and torch.allclose(again, penalty, atol=1e-6)
    else:
        assert torch.allclose(again, torch.zeros_like(again), atol=1e-7)


@pytest.mark.parametrize("name", ["admm", "l0"])
def test_a_skipped_batch_given_to_skip_step_counts_for_the_schedules_without_a_dual_step(name):
    """The documented skip (a non-finite loss): without skip_step the epoch was one step short, end_epoch
    advised a wrong steps_per_epoch and admm lost the epoch's last coordination."""
    extra = {"interval": 2} if name == "admm" else {}
    f, x, y = _built(name, **extra)  # setup(1 epoch, 4 steps)
    f.start_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(4):
            f.optimizer.zero_grad()
            bad = x.clone()
            if i == 3:
                bad[0, 0] = float("nan")
            step = f.backward((bad, y))
            if not torch.isfinite(step.loss):
                f.optimizer.zero_grad()
                before = f.problem.named_multiplier_values()["norm"].clone()
                f.skip_step(step)
                assert torch.equal(f.problem.named_multiplier_values()["norm"], before)  # no dual step
                continue
            f.optimizer.step()
            f.post_step(step)
        f.end_epoch(0)
    if name == "admm":
        assert f.k == 2  # the epoch's two coordinations, the last after the skipped step
    with pytest.raises(ValueError, match=r"^skip_step\(\) got a step it has already taken"):
        f.skip_step(step)


def test_a_parameter_that_turned_nan_before_skipped_steps_is_caught_at_the_epochs_end():
    """Skipped NaN losses after a finite step: end_epoch checked the finite step's loss and the masks' sources
    only; an excluded head or a bias that turned NaN went unreported."""
    f, x, y = _built("slr")
    f.start_epoch(0)
    f.training_step((x, y))
    with torch.no_grad():
        f.problem.model[2].bias.fill_(math.nan)  # not a target: not a mask source
    for _ in range(3):
        f.optimizer.zero_grad()
        f.skip_step(f.backward((x, y)))
    with pytest.raises(NonFiniteLossError, match=r"^2\.bias holds NaN or inf at the end of epoch 0"):
        f.end_epoch(0)


def test_skip_step_clears_the_count_of_backward_calls_the_next_dual_step_reads():
    f, x, y = _built("slr")
    f.start_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'scales do not sum to 1' warning after a skip
        f.skip_step([f.backward((x, y)), f.backward((x, y))])  # unscaled micro-batches: a sum, as the user wants
        f.post_step([f.backward((x, y)), f.backward((x, y))])


def test_an_epoch_whose_every_step_was_skipped_has_diverged():
    f, x, y = _built("slr")  # setup(1 epoch, 4 steps)
    f.start_epoch(0)
    f.training_step((x, y))  # a finite step taken
    with torch.no_grad():
        for p in f.problem.model.parameters():
            p.fill_(math.nan)  # then the weights diverge: every later loss is nan
    for _ in range(3):
        f.optimizer.zero_grad()
        step = f.backward((x, y))
        assert not torch.isfinite(step.loss)
        f.skip_step(step)
    with pytest.raises(NonFiniteLossError, match=r"^0\.weight holds NaN or inf at the end of epoch 0"):
        f.end_epoch(0)  # the last step taken was finite; the weights are not
    g, x, y = _built("magnitude")
    g.start_epoch(0)
    for _ in range(2):
        g.optimizer.zero_grad()
        g.skip_step(g.backward((x * math.nan, y)))
    saved = g.state_dict()  # mid-epoch: the skips are part of the count a resume continues
    g.load_state_dict(saved)
    g.start_epoch(0)
    for _ in range(2):
        g.optimizer.zero_grad()
        g.skip_step(g.backward((x * math.nan, y)))
    with pytest.raises(NonFiniteLossError, match=r"^every step of epoch 0 went to skip_step\(\) \(4, none to "
                       r"post_step\(\)\): a run whose losses are all non-finite has diverged"):  # fmt: skip
        g.end_epoch(0)


def test_post_step_marks_every_micro_step_taken_and_leaves_no_dual_gradient():
    f, x, y = _built("magnitude")  # with the user constraint "norm": a dual step
    f.start_epoch(0)
    first, second = f.backward((x, y), scale=0.5), f.backward((x, y), scale=0.5)
    f.post_step([first, second])
    assert all(m.weight.grad is None for _, m in f.problem.named_multipliers())  # nothing kept between steps
    assert first.dual is None and second.dual is None  # their dual graphs are freed
    with pytest.raises(ValueError, match=r"^post_step\(\) got a step it has already taken"):
        f.post_step(first)


@pytest.mark.parametrize("constrained", [False, True])
def test_a_validation_lagrangian_under_no_grad_is_not_the_step_end_epoch_checks(constrained):
    f, x, y = _built("magnitude") if constrained else _built_plain("magnitude")
    f.start_epoch(0)
    f.training_step((x, y))
    bad = x.clone()
    bad[0, 0] = math.nan
    with torch.no_grad():
        assert not torch.isfinite(f.compute_lagrangian((bad, y)).loss)
    f.end_epoch(0)  # the last training step was finite: no NonFiniteLossError


def _built_plain(name):
    f, x, y = _built(name)
    f.finalize()
    problem = SparsityProblem(f.problem.model, nn.functional.cross_entropy, f.problem.targets)
    plain = make(name, problem)
    plain.setup(1, 4, reference_batch=(x, y))
    return plain, x, y


def test_load_state_dict_refuses_another_formulations_or_problems_state_before_restoring_anything():
    f, x, y = _built("slr")
    f.start_epoch(0)
    f.training_step((x, y))
    before = {k: v.clone() for k, v in f.problem.named_multiplier_values().items()}
    other, _, _ = _built("magnitude")
    with pytest.raises(
        ValueError, match=r"^load_state_dict\(\): the state is a 'magnitude' formulation's, this one is 'slr'$"
    ):
        f.load_state_dict(other.state_dict())
    admm, _, _ = _built("admm")  # slr's state holds every key of admm's: the name tells them apart
    with pytest.raises(
        ValueError, match=r"^load_state_dict\(\): the state is a 'slr' formulation's, this one is 'admm'$"
    ):
        admm.load_state_dict(f.state_dict())
    older = {k: v for k, v in other.state_dict().items() if k != "formulation"}  # a state of an earlier version
    with pytest.raises(ValueError, match=r"^load_state_dict\(\): the state lacks 'k', 'steps_done', 'z'.*not a slr"):
        f.load_state_dict(older)
    with pytest.raises(ValueError, match=r"^load_state_dict\(\): the state lacks 'dual_optimizer', 'cmp'"):
        f.load_state_dict(f.problem.model.state_dict())
    wider, _, _ = _built("slr", hidden=16)
    with pytest.raises(ValueError, match=r"^load_state_dict\(\): cmp/multipliers/w_eq_z/0.weight/weight is \(480,\)"):
        f.load_state_dict(wider.state_dict())
    with pytest.raises(ValueError, match=r"^load_state_dict\(\) takes what slr's state_dict\(\) returned, got"):
        f.load_state_dict([1, 2])
    for name, value in f.problem.named_multiplier_values().items():
        assert torch.equal(value, before[name]), name  # nothing was restored


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, "0.5"])
def test_backward_scale_must_be_a_finite_positive_number(scale):
    f, x, y = _built("admm")
    f.start_epoch(0)
    with pytest.raises(ValueError, match=r"^backward\(scale=\.\.\.\) must be a finite number > 0"):
        f.backward((x, y), scale=scale)


def test_magnitude_without_start_epoch_is_refused():
    f, x, y = _built("magnitude")
    with pytest.raises(ValueError, match=r"^magnitude sets its masks in start_epoch\(epoch\): call start_epoch\(0\)"):
        f.training_step((x, y))
    f.start_epoch(0)
    f.training_step((x, y))


@pytest.mark.parametrize("name", ["slr", "l0", "magnitude"])
def test_a_loop_resumed_mid_epoch_counts_the_epochs_steps_on(name, recwarn):
    f, x, y = _built(name)
    f.start_epoch(0)
    for _ in range(2):
        f.training_step((x, y))
    state = copy.deepcopy(f.state_dict())
    again, _, _ = _built(name)
    again.load_state_dict(state)
    again.start_epoch(0)  # the loop starts the epoch it was in again, then does its 2 remaining steps
    for _ in range(2):
        again.training_step((x, y))
    again.end_epoch(0)
    assert not [w for w in recwarn if "post_step() and skip_step() calls" in str(w.message)]
    fresh, _, _ = _built(name)
    fresh.start_epoch(0)
    fresh.training_step((x, y))
    short = r"declared 4 steps for epoch 0, but it had 1 post_step\(\) and skip_step\(\) calls"
    with pytest.warns(UserWarning, match=short):
        fresh.end_epoch(0)


def test_total_steps_cuts_the_last_epoch_short_for_the_checks_and_the_step_schedules(recwarn):
    """A run of 5 steps over epochs of 4 (a max_steps): the last epoch is declared 1 step, and slr's cubic schedule
    reaches the target at step 5, not 8."""
    f, x, y = _built("slr", sparsity_schedule="cubic", schedule_end=1.0)
    f.setup(2, 4, f.reference_batch, total_steps=5)
    assert (f.num_epochs, f.steps_per_epoch, f.total_steps) == (2, 4, 5)
    for epoch, steps in ((0, 4), (1, 1)):
        f.start_epoch(epoch)
        for _ in range(steps):
            f.training_step((x, y))
        f.end_epoch(epoch)
    assert not [w for w in recwarn if "post_step() and skip_step() calls" in str(w.message)]
    assert f.schedule_fraction() == 1.0
    longer = r"^setup\(\) declared 1 step for epoch 1, but it had 2 post_step\(\) and skip_step\(\) calls"
    with pytest.warns(UserWarning, match=longer):
        again, _, _ = _built("magnitude")
        again.setup(2, 4, total_steps=5)
        again.start_epoch(1)
        again.training_step((x, y))
        again.training_step((x, y))
        again.end_epoch(1)


@pytest.mark.parametrize("total", [4, 9, 2.5, True, "5"])
def test_total_steps_must_leave_the_last_epoch_one_to_a_whole_epoch_of_steps(total):
    f, _, _ = _built("magnitude")
    with pytest.raises(
        ValueError,
        match=rf"^total_steps must be from 5 to 8 \(the last of num_epochs=2 epochs of 4 steps cut short, "
        rf"or none\), got {re.escape(repr(total))}$",
    ):
        f.setup(2, 4, total_steps=total)
    with pytest.raises(ValueError, match=r"^total_steps must be 0 \(the last of num_epochs=0 epochs"):
        f.setup(0, 4, total_steps=1)


def test_start_epoch_past_setups_epochs_warns_once(recwarn):
    f, x, y = _built("magnitude")  # setup(num_epochs=1): its cubic ramp ends with epoch 0
    f.start_epoch(0)
    assert not [w for w in recwarn if "past setup" in str(w.message)]
    f.end_epoch(0)
    with pytest.warns(
        UserWarning, match=r"^start_epoch\(1\) is past setup\(num_epochs=1\) \(epochs 0 to 0\): the sched"
    ) as record:
        f.start_epoch(1)
    assert record[0].filename == __file__  # the warning points at the caller's line
    recwarn.clear()
    f.start_epoch(2)
    assert not [w for w in recwarn if "past setup" in str(w.message)]


def test_masks_must_be_boolean():
    model, _, _ = _cancer()
    targets = Targets().resolve(model, SparsityConfig(0.5))
    scores = {t.name: t.tensor.detach().abs() for t in targets}
    before = model[0].weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"^the mask of 0.weight is torch.float32; masks are boolean tensors, True where"
    ):
        hard_prune(targets, scores)
    with pytest.raises(ValueError, match=r"the mask of 0.weight is torch.float32; masks are boolean tensors"):
        apply_masks(targets, scores)
    assert torch.equal(model[0].weight, before)


def test_a_vector_constraint_logs_whether_it_holds():
    """A vector inequality holds when its largest entry is <= 0 (its norm would never be), an equality when
    its norm is 0."""
    model, x, y = _cancer()
    offsets = torch.tensor([-1.0, 0.5])
    constraints = {
        "below": UserConstraint(lambda m: offsets + 0.0 * m[0].weight.sum()),
        "at": UserConstraint(lambda m: torch.tensor([3.0, 4.0]) + 0.0 * m[0].weight.sum(), "=="),
    }
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)),
                              constraints)  # fmt: skip
    f = make("magnitude", problem)
    f.setup(1, 1)
    f.start_epoch(0)
    metrics = problem.step_metrics(f.backward((x, y)).cmp_state)
    assert metrics["violation/below"] == 0.5 and metrics["violation/at"] == 5.0
    step = f.backward((x, y))
    f.post_step(step)  # the multipliers move: [0, 0.5·lr] and [3, 4]·lr
    metrics = problem.step_metrics(step.cmp_state)
    values = problem.named_multiplier_values()
    assert float(values["at"].norm()) > 0 and float(values["below"].norm()) > 0
    assert metrics["multiplier/at"] == pytest.approx(float(values["at"].norm()))  # the norm, not an entry
    assert metrics["multiplier/below"] == pytest.approx(float(values["below"].norm()))


def test_a_state_saved_for_other_levels_is_refused():
    model, x, y = _cancer()

    def built(level: float):
        problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(level)))
        f = make("slr", problem)
        f.setup(1, 1, reference_batch=(x, y))
        return f

    first = built(0.5)
    state = first.state_dict()
    first.finalize()
    second = built(0.8)
    with pytest.raises(
        ValueError, match=r"^slr: the state was saved for other targets: 0\.weight at 0\.5 unstructured, "
    ):
        second.load_state_dict(state)  # the shapes agree: only the levels tell them apart
    second.load_state_dict(second.state_dict())


def test_a_formulation_state_with_a_nested_dict_that_grows_during_training_resumes():
    from constrainedsparse import register_formulation
    from constrainedsparse.formulations.magnitude import Magnitude
    from constrainedsparse.registry import REGISTRY

    @register_formulation("mag-log")
    class MagLog(Magnitude):
        description = "magnitude that keeps a log per epoch"

        def attach(self):
            super().attach()
            self.log = {}

        def on_end_epoch(self, epoch):
            self.log[f"epoch{epoch}"] = torch.tensor(float(epoch))
            return super().on_end_epoch(epoch)

        def state_dict(self):
            return {**super().state_dict(), "log": dict(self.log)}

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.log = dict(state["log"])

    try:
        f, x, y = _built("mag-log")
        f.start_epoch(0)
        for _ in range(4):  # setup(1, 4)
            f.training_step((x, y))
        f.end_epoch(0)
        again, _, _ = _built("mag-log")
        again.load_state_dict(f.state_dict())  # its log has epoch0, the fresh one's none: still its own state
        assert list(again.log) == ["epoch0"]
    finally:
        REGISTRY._classes.pop(("training", "mag-log"), None)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("l0", r"^0.weight still carries a HardConcreteGate parametrization: call the formulation's finalize\(\) "
               r"before apply_masks\(\)$"),
        ("slr", r"^0.weight carries a 'slr' formulation that was not finalized .*: call its finalize\(\) before "
                r"apply_masks\(\)$"),
    ],
)  # fmt: skip
def test_apply_masks_refuses_targets_a_formulation_holds(name, message):
    """apply_masks stacked a Mask over l0's gates, or on the W that slr pulls towards Z, without a word."""
    f, _, _ = _built(name)
    target = f.problem.targets[0]
    with pytest.raises(ValueError, match=message):
        apply_masks(f.problem.targets, {target.name: torch.ones_like(target.tensor, dtype=torch.bool)})
    f.finalize()  # then the weights are the user's again
    apply_masks(f.problem.targets, {target.name: torch.ones_like(target.tensor, dtype=torch.bool)})


def test_a_detach_that_fails_is_raised_by_discard_and_set_aside_when_the_build_itself_failed():
    """discard() swallowed any exception of the formulation's detach() (a bug in a formulation of the user's went
    unseen); only a build that failed part-way sets it aside, for the build's own error."""
    from constrainedsparse import register_formulation
    from constrainedsparse.formulations import formulation_class
    from constrainedsparse.registry import REGISTRY

    @register_formulation("mag-bad-detach")
    class BadDetach(formulation_class("l0")):
        description = "l0 whose detach fails"
        fail_attach = False

        def attach(self):
            super().attach()
            if self.fail_attach:
                raise RuntimeError("attach failed")

        def detach(self):
            raise KeyError("detach bug")

    try:
        f, _, _ = _built("mag-bad-detach")
        assert len(f.optimizer.param_groups) == 2 and len(f.problem.constraint_names()) == 4  # gates, l0's three
        with pytest.raises(KeyError, match="detach bug"):
            f.discard()
        assert f.problem.constraint_names() == ["norm"]  # restored first (its groups are its detach's to empty)
        assert f.finalized
        with pytest.raises(ValueError, match=r"^discard\(\) after finalize\(\)"):
            f.discard()
        BadDetach.fail_attach = True
        with pytest.raises(RuntimeError, match="^attach failed$"):
            _built("mag-bad-detach")
    finally:
        REGISTRY._classes.pop(("training", "mag-bad-detach"), None)


def test_a_step_given_to_post_step_twice_an_epoch_never_ended_and_another_one_ended_are_caught(recwarn):
    f, x, y = _built("admm")
    f.start_epoch(0)
    step = f.backward((x, y))
    f.post_step(step)
    with pytest.raises(ValueError, match=r"^post_step\(\) got a step it has already taken: call backward\(\)"):
        f.post_step(step)
    f.post_step([step, f.backward((x, y))])  # a list the loop keeps appending to: its last step is new
    with pytest.warns(
        UserWarning, match=r"^start_epoch\(1\) while epoch 0 was not ended: call end_epoch\(0\)"
    ) as record:
        f.start_epoch(1)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match=r"^end_epoch\(2\) while epoch 1 is under way: end the epoch you started "):
        f.end_epoch(2)


def test_an_epoch_ended_twice_is_refused_before_its_end_of_epoch_work_runs_again():
    """admm with interval_unit=epoch coordinates in end_epoch(): a second end_epoch(0) took one more Z-step and dual
    step (k went 1 -> 2) without a word."""
    f, x, y = _built("admm", interval=1, interval_unit="epoch")
    f.setup(2, 4)
    f.start_epoch(0)
    for _ in range(f.steps_per_epoch):
        f.training_step((x, y))
    f.end_epoch(0)
    k = f.k
    with pytest.raises(ValueError, match=r"^end_epoch\(0\) again: epoch 0 has ended .*; call start_epoch\(1\) before"):
        f.end_epoch(0)
    assert f.k == k
    f.start_epoch(1)
    for _ in range(f.steps_per_epoch):
        f.training_step((x, y))
    f.end_epoch(1)  # the next epoch ends as usual
    assert f.k == k + 1


def test_a_loop_rolled_back_to_a_state_saved_before_end_epoch_ends_that_epoch_again():
    f, x, y = _built("admm")
    f.setup(2, 4)
    f.start_epoch(0)
    for _ in range(4):
        f.training_step((x, y))
    saved = copy.deepcopy(f.state_dict())  # after the epoch's last step, before end_epoch
    f.end_epoch(0)
    f.load_state_dict(saved)
    assert f.resumed_epoch == 0
    f.end_epoch(f.resumed_epoch)  # as a fresh formulation loading the state would (it was refused as 'again')


def test_slr_with_epoch_coordination_and_no_end_epoch_warns_at_finalize():
    data = load_breast_cancer()
    x = torch.tensor((data.data - data.data.mean(0)) / data.data.std(0), dtype=torch.float32)[:64]
    y = torch.tensor(data.target)[:64]
    model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    f = make("admm", problem, interval=1, interval_unit="epoch")
    f.setup(1, 2)
    for _ in range(2):
        f.training_step((x, y))  # the loop forgot start_epoch / end_epoch: admm never coordinated
    masks = f.hard_masks()  # no warning yet: a preview before the first coordination is fine
    with pytest.warns(UserWarning, match=r"^admm ran 2 steps without a coordination \(interval=1 epoch; it coordi"):
        f.finalize()
    assert set(masks) == {"0.weight", "2.weight"}


def test_several_processes_and_a_model_not_wrapped_in_ddp_warn_at_the_first_backward(monkeypatch, recwarn):
    from constrainedsparse import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    f, x, y = _built("admm")
    f.start_epoch(0)
    with pytest.warns(UserWarning, match=r"^2 processes train, but problem.forward_module is not DistributedDataPar"):
        f.backward((x, y))
    recwarn.clear()
    f.backward((x, y))  # once
    assert not [w for w in recwarn if "processes train" in str(w.message)]


def test_a_nan_loss_at_end_epoch_names_the_constraints_that_are_not_finite_either():
    """The own loop's error was generic while the CLI's named them (docs/api.md promises the names)."""
    from constrainedsparse import NonFiniteLossError

    f, x, y = _built("admm")
    f.start_epoch(0)
    f.training_step((x, y))
    with torch.no_grad():
        f.problem.norm.multiplier.weight.fill_(float("nan"))  # what a NaN violation's dual step leaves
    for _ in range(3):
        f.training_step((x, y))
    with pytest.raises(
        NonFiniteLossError,
        match=r"^the loss is nan at the last step of epoch 0: the weights or "
        r"multipliers are no longer finite \(a step .* or a constraint; not finite either: constraint "
        r"'norm'\); lower",
    ):  # fmt: skip  (admm's own W = Z constraints are not listed)
        f.end_epoch(0)


def test_pruned_positions_hold_exact_zeros_also_where_the_weight_was_inf_or_nan():
    """Masks were multiplied in: inf * 0 is NaN, so an overflowed weight that the mask prunes stayed NaN (and
    counted as kept)."""
    from constrainedsparse.masks import temporarily_pruned

    model = nn.Sequential(nn.Linear(4, 2))
    targets = Targets().resolve(model, SparsityConfig(0.5))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[float("inf"), 1.0, float("nan"), 2.0], [3.0, -float("inf"), 4.0, 5.0]]))
    mask = torch.tensor([[False, True, False, True], [True, False, True, True]])
    with temporarily_pruned(targets, {"0.weight": mask}):
        assert torch.equal(model[0].weight[~mask], torch.zeros(3))
    assert model[0].weight[0, 0] == float("inf")  # restored
    hard_prune(targets, {"0.weight": mask})
    assert torch.equal(model[0].weight[~mask], torch.zeros(3)) and achieved_sparsity(targets) == 3 / 8


@pytest.mark.parametrize("name", ["slr", "admm", "l0", "magnitude"])
def test_weights_made_non_finite_by_the_last_step_stop_end_epoch_and_hard_masks(name):
    """The last step's loss was computed before its update: a NaN gradient there left NaN weights beside a finite
    loss, and hard_masks / finalize / hard_prune went on (an l0 NaN score emptied every layer)."""
    from constrainedsparse import NonFiniteLossError

    f, x, y = _built(name)
    f.start_epoch(0)
    for _ in range(4):
        f.training_step((x, y))
    with torch.no_grad():
        f.problem.targets[0].stored[0, 0] = float("nan")  # what a step with a NaN gradient leaves
    with pytest.raises(NonFiniteLossError, match=r"^0\.weight holds NaN or inf at the end of epoch 0: a step took"):
        f.end_epoch(0)
    with pytest.raises(NonFiniteLossError, match=r"^0\.weight holds NaN or inf at hard_masks\(\): "):
        f.hard_masks()


def test_a_float16_weight_made_non_finite_is_told_its_likely_cause():
    from constrainedsparse import NonFiniteLossError

    model = nn.Sequential(nn.Linear(8, 8)).half()
    problem = SparsityProblem(model, nn.functional.mse_loss, Targets().resolve(model, SparsityConfig(0.5)))
    f = make("magnitude", problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    f.setup(1, 1)
    f.start_epoch(0)
    with torch.no_grad():
        problem.targets[0].stored[0, 0] = float("inf")  # float16 overflows at 65504
    with pytest.raises(NonFiniteLossError, match=r"^0\.weight holds NaN or inf at the end of epoch 0: .*; it is flo"):
        f.end_epoch(0)


def test_l0_gates_made_non_finite_stop_end_epoch_and_hard_masks():
    """l0's masks come from its gates' log alpha, not from the weights: a NaN there emptied every layer."""
    from constrainedsparse import NonFiniteLossError

    f, x, y = _built("l0")
    f.start_epoch(0)
    for _ in range(4):
        f.training_step((x, y))
    with torch.no_grad():
        f.gates["2.weight"].log_alpha[0] = float("nan")
    wanted = r"^2\.weight \(its gates' log alpha\) holds NaN or inf at "
    with pytest.raises(NonFiniteLossError, match=wanted + r"the end of epoch 0: a step took a non-finite gradient"):
        f.end_epoch(0)
    with pytest.raises(NonFiniteLossError, match=wanted + r"hard_masks\(\)"):
        f.hard_masks()


def test_a_subclass_of_ddp_counts_as_wrapped(monkeypatch, recwarn):
    """The wrapper is recognised by the classes it derives from (the engine's own wrapper subclasses DDP, and so
    may a user's), not only by its own class name."""
    from constrainedsparse import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)

    class DistributedDataParallel(nn.Module):  # torch's name; a real one needs a process group
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    class MyDDP(DistributedDataParallel):
        pass

    f, x, y = _built("admm")
    f.problem.forward_module = MyDDP(f.problem.model)
    f.start_epoch(0)
    f.backward((x, y))
    assert not [w for w in recwarn if "processes train" in str(w.message)]


def _l0_loop(**config):
    model, x, y = _cancer()
    targets = Targets().resolve(model, SparsityConfig(0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = {"rows": UserConstraint(lambda m: m[0].weight.norm(dim=1) - 8.0)}  # a vector constraint of yours
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets, rows)
    f = make("l0", problem, optimizer=optimizer, **config)
    return model, x[:64], y[:64], optimizer, f


def test_constraints_follow_a_model_moved_to_float64_after_make_and_finalize_empties_l0s_gate_group():
    model, x, y, optimizer, f = _l0_loop()
    model.double()
    f.setup(1, 2)
    f.start_epoch(0)
    for _ in range(2):
        step = f.training_step((x.double(), y))
    f.end_epoch(0)
    assert torch.isfinite(step[0].loss)
    masks = f.hard_masks()
    f.finalize()
    hard_prune(f.problem.targets, masks)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"] == []  # a scheduler's count kept
    assert {id(p) for p in optimizer.state} <= {id(p) for p in model.parameters()}  # no state of removed gates
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.add_param_group({"params": []})
    fresh.load_state_dict(optimizer.state_dict())


def test_l0_warns_once_when_a_gated_layer_trains_in_eval_mode():
    model, x, y, _, f = _l0_loop()
    f.setup(1, 2)
    f.start_epoch(0)
    model.eval()
    with pytest.warns(UserWarning, match=r"^l0: backward\(\) of a step run with a gated layer in eval mode") as record:
        f.backward((x, y))
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f.backward((x, y))  # once


def test_slr_refuses_a_target_frozen_after_make_at_setup():
    model, x, y = _cancer()
    f = make("slr", SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5))))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^slr trains the weights towards Z, but 0\.weight is frozen"):
        f.setup(1, 2, reference_batch=(x, y))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_backward_where_gradients_are_disabled_is_one_precise_error(context):
    model, x, y = _cancer()
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    f = make("admm", problem)
    f.setup(num_epochs=1, steps_per_epoch=1)
    message = r"^backward\(\) inside torch\.no_grad\(\) or torch\.inference_mode\(\): autograd records nothing"
    with context(), pytest.raises(ValueError, match=message):
        f.backward((x, y))
    f.backward((x, y))  # the same step outside the block is fine


def test_an_optimizer_fused_into_the_backward_is_named_by_slr():
    # PyTorch's recipe that steps and clears each gradient in a post-accumulate-grad hook leaves slr's W = Z
    # penalty no gradient to join: one precise error, not a TypeError from a foreach call.
    model, x, y = _cancer()
    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)))
    f = make("slr", problem)
    f.setup(num_epochs=1, steps_per_epoch=1, reference_batch=(x, y))
    message = r"^\d\.weight has no gradient to add the W = Z penalty to .* step the optimizer after backward\(\)$"
    with pytest.raises(ValueError, match=message):
        f.backward((x, y))


def _compiled_run(name, backend=None):
    model, x, y = _cancer()
    x, y = x[:512], y[:512]  # batches of one shape: a last, smaller batch would add a graph of its own
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trained = model if backend is None else torch.compile(model, backend=backend)
    targets = Targets().resolve(trained, SparsityConfig(sparsity=0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # l0's advice for gates on SGD
        f = make(name, SparsityProblem(trained, nn.functional.cross_entropy, targets), optimizer=optimizer)
    f.setup(num_epochs=3, steps_per_epoch=len(_batches(x, y, 128)))
    for epoch in range(3):
        f.start_epoch(epoch)
        for batch in _batches(x, y, 128):
            f.training_step(batch)
        f.end_epoch(epoch)
    masks = f.hard_masks()
    f.finalize()
    hard_prune(targets, masks)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["magnitude", "l0"])
def test_masks_and_gates_under_torch_compile_trace_one_graph_through_every_update(name):
    graphs = []

    def backend(graph, inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = _compiled_run(name, backend)
    # magnitude's masks are graph inputs updated in place, l0's gate noise is drawn before the forward:
    # no break at the pruned layers, no recompile per mask update or per draw.
    assert len(graphs) == 1
    assert all(torch.equal(a, b) for a, b in zip(compiled, _compiled_run(name), strict=True))


def _step_function_run(name: str, compiled: bool, graphs: list | None = None, model_too: bool = False) -> list:
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    plain = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    model = torch.compile(plain, backend="aot_eager") if model_too else plain
    norm = UserConstraint(lambda m: m.get_submodule("0").weight.norm() - 1.0, "<=")
    problem = SparsityProblem(model, nn.functional.cross_entropy, Targets().resolve(model, SparsityConfig(0.5)),
                              {"norm": norm})  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # l0's advice for gates on SGD
        f = make(name, problem, optimizer=optimizer)
    f.setup(num_epochs=1, steps_per_epoch=4, reference_batch=(x, y))

    def step_fn(batch):
        optimizer.zero_grad()
        step = f.backward(batch)
        optimizer.step()
        return step

    def backend(graph, inputs):  # aot_eager, counting the graphs it compiles
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, inputs)

    step_fn = torch.compile(step_fn, backend=backend) if compiled else step_fn
    f.start_epoch(0)
    for i in range(4):
        f.post_step(step_fn((x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)])))
    return [p.detach().clone() for p in model.parameters()] + [f.problem.named_multiplier_values()["norm"]]


def test_a_compiled_model_in_a_compiled_step_function_steps_as_the_eager_one():
    """The problem held the compiled model as model and as forward_module: a step function compiled around backward()
    reached it under both names and torch asserted ('already tracked for mutation') wherever a constraint read the
    model (l0's densities always, any formulation's user constraint)."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break notes
        compiled = _step_function_run("l0", compiled=True, graphs=[], model_too=True)
    eager = _step_function_run("l0", compiled=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(compiled, eager, strict=True))


def test_importing_the_library_does_not_load_the_compiler():
    """torch._dynamo takes about a second to import (the CLI's --help, a script's start): the compiled step's
    guard loads it only where a torch.optim optimizer or torch.compile has."""
    import subprocess
    import sys

    code = "import sys, constrainedsparse; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("name", ["slr", "l0"])
def test_a_compiled_step_function_that_calls_backward_steps_as_the_eager_one(name):
    """The dual Lagrangian is built outside the compiled frame: built inside, its backward in post_step went
    through a compiled node the primal backward had freed ('backward through the graph a second time'). The
    formulation's bookkeeping runs eagerly between the graphs: traced (slr's W = Z penalty hooks, l0's gate draws,
    cached densities and test-gap measurements), it recompiled per pruned tensor and per step up to torch's
    recompile limit, then ran as eager frames that still checked every guard (slr: 195 ms a step against 7.3 on an
    MLP of 11 pruned layers)."""
    torch._dynamo.reset()
    graphs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _step_function_run(name, compiled=True, graphs=graphs)
    eager = _step_function_run(name, compiled=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(compiled, eager, strict=True))
    assert len(graphs) <= 4, len(graphs)  # the forward, the optimizer step, the first step's DDP check
    assert not [str(w.message) for w in caught]  # dynamo warned of the lru_cache it traced in the wrapper, every step
    assert float(eager[-1].abs().sum()) > 0  # the constraint's multiplier moved


@pytest.mark.parametrize("name", ["l0", "magnitude"])
def test_a_copy_of_the_model_made_during_training_still_works_after_finalize(name):
    """An EMA or best-so-far copy (copy.deepcopy while masks or gates parametrize the weights): torch removes a
    parametrization by deleting the property from the module's class, which the copy shares."""
    f, x, y = _built(name)
    f.start_epoch(0)
    f.training_step((x, y))
    best = copy.deepcopy(f.problem.model)
    expected = best(x)
    masks = f.hard_masks()
    f.finalize()
    hard_prune(f.problem.targets, masks)
    assert torch.equal(best(x), expected)
    assert parametrize_names(best) == ["0.weight", "2.weight"] and parametrize_names(f.problem.model) == []


def parametrize_names(model):
    return [f"{n}.{p}" for n, m in model.named_modules() if hasattr(m, "parametrizations") for p in m.parametrizations]


@pytest.mark.parametrize("name", ["slr", "admm", "magnitude"])
def test_hard_prune_under_a_formulation_not_finalized_is_refused_untouched(name):
    """slr/admm's gradient hooks would keep adding the W = Z penalty to the fine-tuning's gradients."""
    f, x, y = _built(name)
    f.start_epoch(0)
    f.training_step((x, y))
    masks = f.hard_masks()
    before = {k: v.clone() for k, v in f.problem.model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=rf"^0\.weight carries a '{name}' formulation that was not finalized \(its masks or gradient hooks would "
        r"stay on the model\): call its finalize\(\) before remove_masks\(\) / hard_prune\(\)$",
    ):
        hard_prune(f.problem.targets, masks)
    assert all(torch.equal(v, before[k]) for k, v in f.problem.model.state_dict().items())
    f.finalize()
    hard_prune(f.problem.targets, masks)
    assert achieved_sparsity(f.problem.targets) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("name", ["slr", "l0"])
def test_compute_lagrangian_under_no_grad_on_validation_data_leaves_the_dual_steps_alone(name):
    runs = []
    for evaluate in (False, True):
        f, x, y = _built(name)
        f.start_epoch(0)
        f.training_step((x[:64], y[:64]))
        if evaluate:  # in eval mode, as validation runs (l0's gates draw no noise then)
            f.problem.model.eval()
            with torch.no_grad():
                assert torch.isfinite(f.compute_lagrangian((x[64:], y[64:])).lagrangian)
            f.problem.model.train()
        f.training_step((x[:64], y[:64]))
        runs.append(f.problem.named_multiplier_values()["norm"].clone())
    assert runs[0] != 0 and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", ["slr", "l0", "magnitude"])
def test_a_batch_skipped_after_backward_takes_no_part_in_the_dual_step(name):
    # The common guard `step = f.backward(b); if bad: zero_grad(); continue`: only the steps given to post_step
    # move the multipliers, so the skipped batch (of NaNs here) adds neither its violation nor a NaN.
    f, x, y = _built(name, dual_lr=0.5)
    f.start_epoch(0)
    f.optimizer.zero_grad()
    assert not torch.isfinite(f.backward((torch.full_like(x[:64], float("nan")), y[:64])).loss)
    f.optimizer.zero_grad()
    step = f.backward((x[:64], y[:64]))
    f.optimizer.step()
    f.post_step(step)
    violation = f.problem.step_metrics(step.cmp_state)["violation/norm"]
    assert violation > 0 and f.problem.named_multiplier_values()["norm"].item() == pytest.approx(0.5 * violation)


@pytest.mark.parametrize("name", ["slr", "l0", "magnitude"])
def test_post_step_under_no_grad_still_takes_the_dual_step(name):
    f, x, y = _built(name, dual_lr=0.5)
    f.start_epoch(0)
    step = f.backward((x, y))
    f.optimizer.step()
    with torch.no_grad():  # a loop that wraps its bookkeeping in no_grad
        f.post_step(step)
    violation = f.problem.step_metrics(step.cmp_state)["violation/norm"]
    assert f.problem.named_multiplier_values()["norm"].item() == pytest.approx(0.5 * violation)


def test_accumulation_that_passes_only_its_last_step_warns_and_a_step_twice_is_refused():
    f, x, y = _built("slr", dual_lr=0.5)
    f.start_epoch(0)
    halves = [f.backward((x[i : i + 64], y[i : i + 64]), scale=0.5) for i in (0, 64)]
    f.optimizer.step()
    expected = r"^post_step\(\) got 1 step whose backward\(\) scales do not sum to 1, after 2 backward\(\) calls"
    with pytest.warns(UserWarning, match=expected) as record:
        f.post_step(halves[-1])  # the dual step is half of the mean violation's: said once
    assert record[0].filename == __file__
    with pytest.raises(ValueError, match=r"^post_step\(\) got the same step twice in its list: give each"):
        step = f.backward((x, y))
        f.post_step([step, step])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f.post_step(f.backward((x, y)))  # one step of scale 1 after a skipped one: no warning
        f.backward((x, y))  # skipped
        f.post_step(f.backward((x, y)))


def test_numpy_counts_and_scales_drive_the_lifecycle_as_python_numbers_do():
    # Loops often compute counts with numpy (np.ceil(n / batch).astype(int)); they are integers all the same,
    # kept as Python ints (a checkpoint loaded with weights_only=True holds no numpy scalar).
    runs = []
    for count, real in ((int, float), (np.int64, np.float32)):
        f, x, y = _built("slr")
        f.setup(count(1), count(2), total_steps=count(2), reference_batch=(x, y))
        f.start_epoch(count(0))
        for i in (0, 64):
            f.optimizer.zero_grad()
            step = f.backward((x[i : i + 64], y[i : i + 64]), scale=real(0.5))
            f.optimizer.step()
            f.post_step(step)
        counts = (f.num_epochs, f.steps_per_epoch, f.total_steps, *f.state_dict()["epoch_steps"])
        assert counts == (1, 2, 2, 0, 2, 0) and all(type(c) is int for c in counts)
        f.end_epoch(count(0))
        runs.append(f.problem.named_multiplier_values()["norm"].clone())
    assert runs[0] > 0 and torch.equal(runs[0], runs[1])


def test_finalize_before_the_sparsity_schedule_ends_warns_that_the_hard_prune_jumps():
    f, x, y = _built("magnitude")
    f.setup(20, 1)
    f.start_epoch(0)
    f.training_step((x, y))
    f.end_epoch(0)
    masks = f.hard_masks()
    expected = (
        r"^magnitude: finalize\(\) with its sparsity schedule at 0\.143 of the target \(setup\(\) declared 20 "
        r"epochs\): the hard prune removes the rest at once"
    )
    with pytest.warns(UserWarning, match=expected) as record:
        f.finalize()
    assert record[0].filename == __file__
    hard_prune(f.problem.targets, masks)
    done, x, y = _built("magnitude")  # setup(1, 4): its one epoch is the whole schedule
    done.start_epoch(0)
    done.training_step((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done.finalize()


def test_a_validation_batch_evaluated_under_no_grad_is_not_the_step_the_epoch_checks():
    """A NaN on validation data is the data's: the epoch's finiteness check reads the last training step."""
    f, x, y = _built("slr")
    f.start_epoch(0)
    f.training_step((x, y))
    bad = x[:8].clone()
    bad[0, 0] = float("nan")
    with torch.no_grad():
        assert not torch.isfinite(f.compute_lagrangian((bad, y[:8])).loss)
    f.end_epoch(0)


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (torch.optim.LBFGS, r"^optimizer LBFGS needs a closure at every step \(it evaluates the loss several times\)"),
        (torch.optim.SparseAdam, r"^optimizer SparseAdam takes sparse gradients only, and the Lagrangian's are dense"),
    ],
)
def test_an_optimizer_that_cannot_take_the_split_step_is_refused_by_make(optimizer, message):
    """They failed inside torch at the first step (LBFGS.step() missing 'closure'; SparseAdam on dense gradients)."""
    from torch import nn

    import constrainedsparse as cs

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    targets = cs.Targets().resolve(model, cs.SparsityConfig(sparsity=0.5))
    problem = cs.SparsityProblem(model, nn.functional.cross_entropy, targets)
    for name in cs.available_formulations():
        with pytest.raises(ValueError, match=message):
            cs.make(name, problem, optimizer=optimizer(model.parameters()))
        assert not any(type(m).__name__.startswith("Parametrized") for m in model.modules())  # nothing attached
