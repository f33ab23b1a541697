"""A state machine over the own-loop lifecycle: every call in any order, with valid and plausible-invalid arguments.

The rules (docs/api.md, "The lifecycle" and "Calls out of order"): every misuse is one ``ValueError`` (or a documented
``UserWarning``), never an error from inside; a refused call leaves the formulation and the model as they were;
after ``finalize()`` / ``discard()`` the targets are plain ``nn.Parameter`` weights; the multipliers stay finite.

Defects it found, mended with it: an slr state taken before ``setup()`` loaded as ``KeyError: 'w_prev'``;
``load_state_dict`` after ``finalize()``/``discard()`` was not refused (``magnitude`` registered its masks on the
finalized model again); ``hard_prune_preview`` did not check its masks (a float mask left the targets before it
pruned). ``LIFECYCLE_EXAMPLES`` / ``LIFECYCLE_STEPS`` / ``LIFECYCLE_RANDOM=1`` search longer.
"""

import copy
import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse import (
    NonFiniteLossError,
    SparsityConfig,
    SparsityProblem,
    Targets,
    UserConstraint,
    hard_prune,
    make,
)

FORMULATIONS = ["slr", "admm", "l0", "l0-penalty", "magnitude"]

_g = torch.Generator().manual_seed(0)
BATCHES = [(torch.randn(8, 6, generator=_g), torch.randint(0, 3, (8,), generator=_g)) for _ in range(3)]
REFERENCE = (torch.cat([b[0] for b in BATCHES]), torch.cat([b[1] for b in BATCHES]))

EPOCHS = st.sampled_from(["next", "same", "prev", "skip", -1, 1.5, True, None])  # words: relative to the last start
COUNTS = st.sampled_from([3, 2, 1, 0, -1, 2.5, None])
SCALES = st.sampled_from([1.0, 0.5, 0.0, -1.0, math.nan, math.inf, "1"])


_FOREIGN = {}


def _foreign_state(name):
    """A state of formulation ``name`` on another model of the same shape, after setup and one step."""
    if name not in _FOREIGN:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        targets = Targets().resolve(model, SparsityConfig(0.5))
        problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            f = make(name, problem, optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
            f.setup(1, 1, REFERENCE)
            f.start_epoch(0)
            f.training_step(BATCHES[0])
            _FOREIGN[name] = (f.state_dict(), model.state_dict())
    return copy.deepcopy(_FOREIGN[name])


def _fingerprint(f, model):
    """What a refused call must leave as it was: the formulation's stage and counts, the model's tensors."""
    epochs = copy.copy(vars(f._epochs))
    epochs.pop("_warned", None)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mults = {k: v.clone() for k, v in f.problem.named_multiplier_values().items()}
    groups = [len(g["params"]) for g in f.optimizer.param_groups]
    counts = (epochs, groups, sorted(f.problem.constraint_names()))
    return f._stage, counts, tensors, mults, f.reference_batch is not None


def _same(a, b):
    stage_a, ep_a, ten_a, mul_a, ref_a = a
    stage_b, ep_b, ten_b, mul_b, ref_b = b
    if (stage_a, ep_a, ref_a) != (stage_b, ep_b, ref_b) or ten_a.keys() != ten_b.keys() or mul_a.keys() != mul_b.keys():
        return False
    return all(_equal(ten_a[k], ten_b[k]) for k in ten_a) and all(_equal(mul_a[k], mul_b[k]) for k in mul_a)


def _equal(a, b):
    """Equal tensors, NaN equal to NaN (a diverged run's)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


class Lifecycle(RuleBasedStateMachine):
    name = "slr"

    def make(self):
        problem = SparsityProblem(self.model, nn.functional.cross_entropy, self.targets, self.constraints())
        opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        keys = {"interval": 1, "interval_unit": "step"} if self.name in ("slr", "admm") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return opt, make(self.name, problem, optimizer=opt, **keys)

    def constraints(self):
        if not self.constrained:
            return None
        return {"norm": UserConstraint(lambda m: m[0].weight.norm() - 1.0, "<=")}

    @initialize(constrained=st.booleans(), ready=st.sampled_from([True, True, False]))
    def build(self, constrained, ready):
        torch.manual_seed(0)
        self.constrained = constrained
        self.model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.targets = Targets().resolve(self.model, SparsityConfig(0.5))
        self.clean = copy.deepcopy(self.model.state_dict())
        self.opt, self.f = self.make()
        self.diverged = False  # a NaN batch went through: the multipliers may be NaN (documented)
        self.nan_steps = set()  # ids of the steps of a diverged run before make_again()
        self.steps = []  # every LagrangianStep backward()/compute_lagrangian() returned
        self.states = []  # every state_dict() taken
        self.masks = None
        self.gone = False  # finalize() or discard() returned
        self.was_setup = False
        if ready:  # most runs start set up and in epoch 0, so that the rules reach the states deep in a run
            self.call(self.f.setup, 3, 3, REFERENCE)
            self.call(self.f.start_epoch, 0)

    def epoch(self, which):
        """An epoch argument: a word picks one relative to the epoch started last, anything else is given as is."""
        last = max(self.f._epochs.epoch, 0)
        offsets = {"next": 1, "same": 0, "prev": -1, "skip": 2}
        return last + offsets[which] if which in offsets else which

    # --- the one gate every call goes through -------------------------------------------------------

    def call(self, fn, *args, allowed=(), **kwargs):
        """Runs a lifecycle call: any exception must be a ValueError (or one of ``allowed``); a refused call
        changes nothing."""
        before = _fingerprint(self.f, self.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                result = fn(*args, **kwargs)
            except (ValueError, *allowed) as err:
                after = _fingerprint(self.f, self.model)
                assert _same(before, after), f"{fn.__name__} refused ({err}) but changed the state"
                assert "\n" not in str(err).strip() or isinstance(err, NonFiniteLossError), str(err)
                return None, err
        return result, None

    # --- rules ----------------------------------------------------------------------------------------

    @rule(num_epochs=COUNTS, steps=COUNTS, reference=st.sampled_from([True, True, False]))
    def setup(self, num_epochs, steps, reference):
        _, err = self.call(self.f.setup, num_epochs, steps, REFERENCE if reference else None)
        if err is None:
            self.was_setup = True
            assert not self.gone

    @rule(epoch=EPOCHS)
    def start_epoch(self, epoch):
        self.call(self.f.start_epoch, self.epoch(epoch))

    @rule(epoch=EPOCHS)
    def end_epoch(self, epoch):
        self.call(self.f.end_epoch, self.epoch(epoch), allowed=(NonFiniteLossError,))

    @rule(steps=st.integers(1, 3))
    def train_epoch(self, steps):
        """A whole epoch as the docs write it: start_epoch(next), steps, end_epoch."""
        epoch = self.epoch("next") if self.f._epochs.open_epoch is None else self.f._epochs.open_epoch
        self.call(self.f.start_epoch, epoch)
        for i in range(steps):
            self.opt.zero_grad()
            step, err = self.call(self.f.backward, BATCHES[i])
            if err is None:
                self.opt.step()
                self.steps.append(step)
                self.call(self.f.post_step, step)
        self.call(self.f.end_epoch, epoch, allowed=(NonFiniteLossError,))

    @rule(i=st.integers(0, len(BATCHES) - 1), scale=SCALES, no_grad=st.booleans())
    def backward(self, i, scale, no_grad):
        self.opt.zero_grad()
        with torch.no_grad() if no_grad else torch.enable_grad():
            step, err = self.call(self.f.backward, BATCHES[i], scale=scale)
        if err is None:
            assert not no_grad, "backward() under no_grad was accepted"
            self.steps.append(step)
            with torch.no_grad():
                self.opt.step()

    @rule(i=st.integers(0, len(BATCHES) - 1), no_grad=st.booleans())
    def compute_lagrangian(self, i, no_grad):
        with torch.no_grad() if no_grad else torch.enable_grad():
            step, err = self.call(self.f.compute_lagrangian, BATCHES[i])
        if err is None:
            self.steps.append(step)

    @precondition(lambda self: self.steps)
    @rule(which=st.sampled_from(["last", "first", "list", "dup", "none", "empty"]))
    def post_step(self, which):
        arg = {
            "last": lambda: self.steps[-1],
            "first": lambda: self.steps[0],
            "list": lambda: self.steps[-2:],
            "dup": lambda: [self.steps[-1], self.steps[-1]],
            "none": lambda: None,
            "empty": lambda: [],
        }[which]()
        self.call(self.f.post_step, arg)

    @rule(i=st.integers(0, len(BATCHES) - 1))
    def training_step(self, i):
        self.call(self.f.training_step, BATCHES[i])

    @rule()
    def hard_masks(self):
        masks, err = self.call(self.f.hard_masks, allowed=(NonFiniteLossError,))
        if self.diverged and not self.gone:
            assert isinstance(err, NonFiniteLossError), f"hard_masks() of a diverged run: {err!r}"
        if masks is not None:
            assert not self.gone
            self.masks = masks

    @precondition(lambda self: self.masks is not None)
    @rule()
    def preview(self):
        cm, err = self.call(self.f.hard_prune_preview, self.masks)
        if err is None:
            before = {k: v.clone() for k, v in self.model.state_dict().items()}
            with cm:
                self.model(BATCHES[0][0])
            after = self.model.state_dict()
            assert before.keys() == after.keys() and all(_equal(before[k], after[k]) for k in before)

    @rule()
    def finalize(self):
        _, err = self.call(self.f.finalize)
        if err is None:
            assert not self.gone
            self.gone = True

    @rule()
    def discard(self):
        _, err = self.call(self.f.discard)
        if err is None:
            assert not self.gone
            self.gone = True

    @precondition(lambda self: self.masks is not None)
    @rule()
    def hard_prune(self):
        _, err = self.call(hard_prune, self.targets, self.masks)
        if err is None:
            assert self.gone, "hard_prune accepted while the formulation is attached"

    @rule()
    def state_dict(self):
        state, _ = self.call(self.f.state_dict)
        if state is not None:
            self.states.append(copy.deepcopy(state))

    @precondition(lambda self: self.states)
    @rule(i=st.integers(0, 5))
    def load_state_dict(self, i):
        state = self.states[i % len(self.states)]
        self.call(self.f.load_state_dict, copy.deepcopy(state))

    @rule(other=st.sampled_from(FORMULATIONS), what=st.sampled_from(["state", "model", "empty", "none"]))
    def load_foreign(self, other, what):
        state, model_state = _foreign_state(other)
        arg = {"state": state, "model": model_state, "empty": {}, "none": None}[what]
        _, err = self.call(self.f.load_state_dict, arg)
        if what != "state" or other != self.name:
            assert err is not None, f"load_state_dict accepted {what} of {other}"

    @rule(i=st.integers(0, len(BATCHES) - 1), what=st.sampled_from(["dict", "triple", "single", "scaler", "dual"]))
    def odd_call(self, i, what):
        x, y = BATCHES[i]
        if what == "dict":
            _, err = self.call(self.f.backward, {"x": x, "y": y})
        elif what == "triple":
            _, err = self.call(self.f.backward, (x, y, y))
        elif what == "single":
            _, err = self.call(self.f.compute_lagrangian, x)
        elif what == "scaler":
            _, err = self.call(self.f.backward, (x, y), scaler=object())
        else:
            _, err = self.call(self.f.compute_lagrangian, (x, y), dual_scale=-1.0)
        assert err is not None, what

    @rule(i=st.integers(0, len(BATCHES) - 1))
    def training_step_no_grad(self, i):
        with torch.no_grad():
            _, err = self.call(self.f.training_step, BATCHES[i])
        assert err is not None

    @precondition(lambda self: self.masks is not None)
    @rule(what=st.sampled_from(["float", "key", "shape"]))
    def bad_masks(self, what):
        name = next(iter(self.masks))
        masks = dict(self.masks)
        if what == "float":
            masks[name] = masks[name].float()
        elif what == "key":
            masks[name + "x"] = masks.pop(name)
        else:
            masks[name] = masks[name][:1]
        _, err = self.call(hard_prune, self.targets, masks)
        assert err is not None
        cm, err = self.call(self.f.hard_prune_preview, masks)
        if err is None:
            _, err = self.call(cm.__enter__)
            if err is None:
                cm.__exit__(None, None, None)
        assert err is not None, f"hard_prune_preview took {what} masks"

    @rule()
    def make_again(self):
        """A second formulation on the same model: refused while this one is attached; after finalize()/discard() the
        model is free again and the machine goes on with the new one (the old steps stay in ``self.steps``)."""
        if not self.gone:
            before = _fingerprint(self.f, self.model)
            with pytest.raises(ValueError):
                self.make()
            assert _same(before, _fingerprint(self.f, self.model))
            return
        if self.diverged:  # a NaN model is refused by the constraint's check: start from the clean weights
            self.model.load_state_dict(self.clean)
            self.nan_steps.update(id(step) for step in self.steps)
        self.opt, self.f = self.make()
        self.gone, self.masks, self.diverged = False, None, False

    @rule(train=st.booleans())
    def mode(self, train):
        self.model.train(train)

    @rule()
    def nan_step(self):
        """A batch with a NaN: the run diverges; end_epoch() and hard_masks() then raise NonFiniteLossError."""
        x, y = BATCHES[0]
        self.opt.zero_grad()
        step, err = self.call(self.f.backward, (x * math.nan, y), allowed=(NonFiniteLossError,))
        if err is None:
            self.opt.step()
            self.steps.append(step)
            self.diverged = True
            self.call(self.f.post_step, step)

    # --- invariants -----------------------------------------------------------------------------------

    @invariant()
    def multipliers_finite(self):
        if self.diverged:
            return
        for name, value in self.f.problem.named_multiplier_values().items():
            assert torch.isfinite(value).all(), f"multiplier {name} is {value}"

    @invariant()
    def plain_after_the_end(self):
        if self.gone:
            assert self.f.finalized
            for t in self.targets:
                assert not parametrize.is_parametrized(t.module), f"{t.name} still parametrized"
                assert type(getattr(t.module, t.param_name)) is nn.Parameter, t.name
            ours = {id(p) for p in self.model.parameters()}
            for group in self.opt.param_groups:
                assert all(id(p) in ours for p in group["params"]), "the optimizer holds parameters off the model"

    @invariant()
    def steps_finite(self):
        if self.steps and not self.diverged and id(self.steps[-1]) not in self.nan_steps:
            assert torch.isfinite(self.steps[-1].loss).all()


@pytest.mark.parametrize("name", FORMULATIONS)
def test_lifecycle_machine(name):
    machine = type(f"Lifecycle_{name}", (Lifecycle,), {"name": name})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("LIFECYCLE_EXAMPLES", 25)),
            stateful_step_count=int(os.environ.get("LIFECYCLE_STEPS", 25)),
            deadline=None,
            derandomize=not os.environ.get("LIFECYCLE_RANDOM"),
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
