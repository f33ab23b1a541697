"""Extension points used as a power user would: what a formulation, solver or pattern of one's own must be,
each mistake one precise error; problem files that define classes load like modules."""

import dataclasses
import textwrap

import pytest
import torch
from cli_helpers import fails_with_one_line
from torch import nn

import constrainedsparse as cs
from constrainedsparse import Formulation, LayerwiseSolver, register_formulation, register_solver
from constrainedsparse.cli import main
from constrainedsparse.config import Hyperparameters
from constrainedsparse.registry import REGISTRY
from constrainedsparse.sets import TopK
from constrainedsparse.sets.base import _PATTERNS, FeasibleSet, register_pattern


@pytest.fixture
def registry():
    """The registries as they were: entries a test adds go away."""
    classes, patterns = dict(REGISTRY._classes), dict(_PATTERNS)
    yield
    REGISTRY._classes.clear()
    REGISTRY._classes.update(classes)
    _PATTERNS.clear()
    _PATTERNS.update(patterns)


class _Described(Formulation):
    description = "keeps every weight"

    def compute_hard_masks(self):
        return {t.name: torch.ones_like(t.tensor, dtype=torch.bool) for t in self.problem.targets}


def test_registration_refuses_bad_names_classes_and_missing_descriptions(registry):
    with pytest.raises(ValueError, match=r"^a formulation name is letters, digits and -_\.\+ .*got 3$"):
        register_formulation(3)
    with pytest.raises(ValueError, match=r"^a layer-wise solver name is .*got ''$"):
        register_solver("")
    with pytest.raises(ValueError, match=r"^register formulation 'x': it takes a Formulation subclass, got 42$"):
        register_formulation("x")(42)
    with pytest.raises(ValueError, match=r"^register layer-wise solver 'y': it takes a LayerwiseSolver subclass"):
        register_solver("y")(_Described)

    class NoDescription(LayerwiseSolver):
        def prune(self, layer):
            raise AssertionError

    with pytest.raises(ValueError, match=r"^layer-wise solver 'z' \(.*NoDescription\) needs a one-line `description`"):
        register_solver("z")(NoDescription)

    class NoPrune(LayerwiseSolver):
        description = "forgot prune()"

    with pytest.raises(ValueError, match=r"^layer-wise solver 'np' \(.*NoPrune\) does not implement prune\(\) of "):
        register_solver("np")(NoPrune)
    with pytest.raises(ValueError, match=r"^register_pattern takes a FeasibleSet subclass, got 42$"):
        register_pattern(42)

    class Unnamed(TopK):
        kind = ""

    for kind in ("", "2x", "two words", "a:b", "row,x", "x=y", "a/b"):  # "2x" would read as N:M; ":" "," "=" "/" parse
        Unnamed.kind = kind
        with pytest.raises(ValueError, match=rf"^Unnamed needs a kind to be registered as a pattern: .*got '{kind}'$"):
            register_pattern(Unnamed)

    class Abstract(FeasibleSet):
        kind = "abstract"

    with pytest.raises(ValueError, match=r"^Abstract must define contains, lmo, mask to be registered as a pattern$"):
        register_pattern(Abstract)

    class NoLevel(FeasibleSet):
        kind = "nolevel"
        mask, lmo, contains = TopK.mask, TopK.lmo, TopK.contains

    with pytest.raises(ValueError, match=r"^NoLevel must define at_level to be registered as a pattern$"):
        register_pattern(NoLevel)


def test_the_hard_masks_of_a_formulation_of_ones_own_are_checked(registry):
    register_formulation("keep-all")(_Described)
    model = nn.Sequential(nn.Linear(8, 4))
    targets = cs.Targets().resolve(model, cs.SparsityConfig(0.5))
    f = cs.make("keep-all", cs.SparsityProblem(model, nn.functional.cross_entropy, targets))
    f.setup(1, 1)
    with pytest.raises(ValueError, match=r"^formulation 'keep-all': the mask of 0\.weight is outside its pattern "):
        f.hard_masks()


PROBLEM_FILE = """
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from constrainedsparse import LayerwiseProblem, LayerwiseSolver, register_solver
from constrainedsparse.config import Hyperparameters, hyperparameter
from constrainedsparse.layerwise import LayerResult
from constrainedsparse.sets import TopK
from constrainedsparse.sets.base import register_pattern


@register_pattern
class HalfTopK(TopK):
    kind = "halftopk"


@dataclasses.dataclass
class KeepConfig(Hyperparameters):
    every: int = hyperparameter(2, "keep every n-th input")


@register_solver("every-nth")
class EveryNth(LayerwiseSolver):
    description = "keeps every n-th input of each row"
    Config = KeepConfig

    def prune(self, layer):
        mask = (torch.arange(layer.weight.shape[1]) % self.config.every == 0).expand_as(layer.weight).clone()
        return LayerResult(layer.weight * mask, mask)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


problem = LayerwiseProblem(
    name="every-nth",
    description="a Config dataclass under `from __future__ import annotations`, loaded twice",
    model=lambda options: Net().eval(),
    calibration=lambda options, seed: [{"x": torch.randn(16, 8)}],
)
"""


def test_a_problem_file_with_dataclasses_and_a_pattern_loads_twice(registry, tmp_path, capsys):
    path = tmp_path / "every_nth.py"
    path.write_text(textwrap.dedent(PROBLEM_FILE))
    common = ["--formulation", "every-nth", "--sparsity", "0.5", "--wandb", "disabled", "--no-progress"]
    for attempt in range(2):  # the same definitions register again
        assert main(["run", str(path), "--out", str(tmp_path / f"run{attempt}"), *common]) == 0
    capsys.readouterr()
    bad = ["run", str(path), "--out", str(tmp_path / "bad"), *common, "--set", "every=x"]
    assert "every" in fails_with_one_line(bad, capsys)


def test_a_solver_may_support_a_pattern_kind_of_any_size():
    class Blocks(LayerwiseSolver):
        description = "blocks of any size"
        supported_patterns = ("block", "row")

        def prune(self, layer):
            raise AssertionError

    for text in ("block:2x2", "block:4x8"):
        Blocks.check_target(cs.SparsityConfig.parse(text, 0.5))
    Blocks.check_target(cs.SparsityConfig(0.5, "row"))
    with pytest.raises(ValueError, match=r"^Blocks supports the block, row patterns, got 2:4$"):
        Blocks.check_target(cs.SparsityConfig.parse("2:4"))


BOOM_FILE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse import Formulation, Problem, register_formulation


@register_formulation("boom")
class Boom(Formulation):
    description = "fails at the start of every epoch"

    def on_start_epoch(self, epoch):
        return {}["missing"]

    def compute_hard_masks(self):
        return {t.name: torch.ones_like(t.tensor, dtype=torch.bool) for t in self.problem.targets}


def data(options):
    x = torch.randn(64, 8)
    return TensorDataset(x, (x[:, 0] > 0).long()), TensorDataset(x, (x[:, 0] > 0).long())


problem = Problem(name="boom", description="d", model=lambda o: nn.Sequential(nn.Linear(8, 2)), data=data)
"""


def test_a_formulation_of_ones_own_that_raises_is_one_line(registry, tmp_path, capsys):
    path = tmp_path / "boom.py"
    path.write_text(textwrap.dedent(BOOM_FILE))
    args = ["run", str(path), "--formulation", "boom", "--epochs", "1", "--pretrain-epochs", "1", "--wandb", "disabled",
            "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    line = fails_with_one_line(args, capsys)
    assert line == "error: formulation 'boom' failed: KeyError: 'missing' (--debug shows the traceback)"
    attach = "def attach(self):\n        {}['at attach']\n\n    def on_start_epoch"
    path.write_text(textwrap.dedent(BOOM_FILE).replace("def on_start_epoch", attach))
    line = fails_with_one_line(args, capsys)  # raised while the run checks it on a throwaway model, before training
    assert line == "error: formulation 'boom' failed: KeyError: 'at attach' (--debug shows the traceback)"


PATTERN_FILE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from constrainedsparse import Problem
from constrainedsparse.sets.base import FeasibleSet, register_pattern


@register_pattern
class Broken(FeasibleSet):
    kind = "broken"

    @classmethod
    def at_level(cls, shape, sparsity, **params):
        return cls()

    def mask(self, x):
        return torch.ones_like(x, dtype=torch.bool)  # keeps everything, which contains() refuses

    def lmo(self, grad, only_negative=False):
        return torch.ones_like(grad)

    def contains(self, x):
        return False


@register_pattern
class Raises(Broken):
    kind = "raises"

    def mask(self, x):
        return {}["oops"]


def data(options):
    x = torch.randn(64, 8)
    return TensorDataset(x, (x[:, 0] > 0).long()), TensorDataset(x, (x[:, 0] > 0).long())


problem = Problem(name="pat", description="d", model=lambda o: nn.Sequential(nn.Linear(8, 2)), data=data)
"""


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("broken", "error: pattern 'broken' (Broken): the hard mask of 0.weight from its mask() is outside the set by "
         "its contains() (16 of 16 kept): the two must agree"),
        ("raises", "error: pattern 'raises' failed: KeyError: 'oops' (--debug shows the traceback)"),
    ],
)  # fmt: skip
def test_a_pattern_of_ones_own_that_breaks_its_contract_or_raises_is_one_line(
    pattern, message, registry, tmp_path, capsys
):
    path = tmp_path / "pat.py"
    path.write_text(PATTERN_FILE)
    args = ["run", str(path), "--formulation", "magnitude", "--pattern", pattern, "--epochs", "1", "--pretrain-epochs",
            "1", "--wandb", "disabled", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert fails_with_one_line(args, capsys) == message
    assert not (tmp_path / "run").exists()


def test_a_pattern_subclassing_a_built_in_one_keeps_l0s_model_scope_and_our_bugs_their_traceback(registry, monkeypatch):
    """l0 in model scope takes one budget over every TopK (a user's subclass too): its hard masks are not held to
    each target's own k. A failure inside the inherited TopK code is ours (no one-line blame on the pattern)."""
    import constrainedsparse.sets.elementwise as elementwise
    from constrainedsparse.errors import failed_pattern

    @register_pattern
    class MyTopK(TopK):
        kind = "mytopk"

        def mask(self, x):
            return super().mask(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 2))
    targets = cs.Targets().resolve(model, cs.SparsityConfig(0.5, pattern="mytopk"))
    f = cs.make("l0", cs.SparsityProblem(model, nn.functional.cross_entropy, targets))
    f.setup(1, 1)
    with torch.no_grad():
        f.gates["0.weight"].log_alpha.normal_()  # gates apart: the global budget moves weights between layers
    masks = f.hard_masks()
    assert sum(int(m.sum()) for m in masks.values()) == sum(t.feasible_set.k for t in targets)
    monkeypatch.setattr(elementwise, "topk_mask", lambda *a: {}["internal"])
    for pattern in (MyTopK(3), type("Inherits", (TopK,), {"kind": "inherits"})(3)):
        with pytest.raises(KeyError) as caught:
            pattern.mask(torch.randn(4, 4))  # (MyTopK.mask, theirs ->) TopK.mask, ours -> the failure
        assert failed_pattern(caught.value) is None  # the deepest pattern code is ours: a bug of ours, its traceback

    class Own(TopK):
        kind = "own"

        @torch.no_grad()
        def mask(self, x):
            return self.__helper(x)

        def __helper(self, x):
            raise RuntimeError("theirs")

    with pytest.raises(RuntimeError) as caught:
        Own(3).mask(torch.randn(4, 4))  # decorated, through a name-mangled helper: still the pattern's own code
    assert failed_pattern(caught.value) == "pattern 'own' failed: RuntimeError: theirs (--debug shows the traceback)"


class _FlatMask(TopK):
    kind = "flatmask"

    def mask(self, x):
        return super().mask(x).reshape(-1)


class _FloatProjection(TopK):
    kind = "floatprojection"

    def project(self, x, out=None):
        return super().project(x).double()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks[0](x))


def _problem(model, kind):
    targets = cs.Targets().resolve(model, cs.SparsityConfig(0.5, pattern=kind))
    return cs.SparsityProblem(model, nn.functional.cross_entropy, targets)


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (_FlatMask, lambda m, kind: cs.prune_layerwise(m, [torch.randn(4, 8)], "wanda", pattern=kind)),
        (_FlatMask, lambda m, kind: _problem(m, kind)),  # resolve() asks the pattern already
        (_FloatProjection, lambda m, kind: cs.make("admm", _problem(m, kind))),
    ],
)
def test_a_patterns_wrong_answer_is_one_error_naming_it(cls, method, registry):
    register_pattern(cls)
    torch.manual_seed(0)
    model = _Net()
    before = [p.detach().clone() for p in model.parameters()]
    wanted = r"a torch\.bool tensor of the input's shape \(16, 8\), got torch\.bool \(128,\)"
    if cls is _FloatProjection:
        wanted = r"a torch\.float32 tensor of the input's shape \(16, 8\), got torch\.float64 \(16, 8\)"
    name = "mask" if cls is _FlatMask else "project"
    with pytest.raises(ValueError, match=rf"^pattern '{cls.kind}': {name}\(\) must return {wanted}$"):
        method(model, cls.kind)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_registration_refuses_a_second_name_a_config_that_is_not_hyperparameters_and_unknown_patterns(registry):
    class Good(LayerwiseSolver):
        description = "keeps the largest weights"

        def prune(self, layer):
            raise AssertionError

    register_solver("good")(Good)
    with pytest.raises(ValueError, match=r"^.*Good is already registered as layer-wise solver 'good': register a sub"):
        register_solver("good-again")(Good)
    assert Good.name == "good" and type("Sub", (Good,), {}).name == "Sub"  # an unregistered subclass: its own name

    class DictConfig(Good):
        Config = dict

    with pytest.raises(ValueError, match=r"^layer-wise solver 'dc' \(.*DictConfig\): Config must be a Hyperparameters"):
        register_solver("dc")(DictConfig)
    with pytest.raises(ValueError, match=r"^Good: config must be a NoSolverConfig, got dict$"):
        type("Good", (Good,), {})({"p": 1})

    @dataclasses.dataclass
    class Required(Hyperparameters):
        p: float  # no default: describe(), --set and make(p=...) could not build it

    wanted = r"^layer-wise solver 'rq' \(.*\): Required: hyperparameter 'p' needs a default \(make\(\) and --set"
    with pytest.raises(ValueError, match=wanted):
        register_solver("rq")(type("Rq", (Good,), {"Config": Required}))
    assert "rq" not in REGISTRY.names("layerwise")
    for supported, message in [
        ("row", r"supported_patterns must be None or a non-empty tuple of pattern texts .*got 'row'$"),
        (("row", 4), r"supported_patterns must hold pattern texts, got 4$"),
    ]:
        odd = type("Odd", (Good,), {"supported_patterns": supported})
        with pytest.raises(ValueError, match=rf"^layer-wise solver 'odd': {message}"):
            register_solver("odd")(odd)
    # names are matched at run time: a pattern of yours may be registered after the solver
    register_solver("fine")(type("Fine", (Good,), {"supported_patterns": ("row", "N:M", "later-pattern")}))


def test_patterns_register_with_any_readable_kind_a_static_at_level_and_inherited_answers_checked(registry):
    class Static(TopK):
        kind = "v2.block"

        @staticmethod
        def at_level(shape, sparsity, **params):
            return Static(1)

    register_pattern(Static)  # a dotted kind and a static at_level register

    class FloatMaskBase(TopK):  # a base class of yours, unregistered
        def mask(self, x):
            return super().mask(x).float()

    class Inherits(FloatMaskBase):
        kind = "inherits-float"

    register_pattern(Inherits)
    with pytest.raises(ValueError, match=r"^pattern 'inherits-float': mask\(\) must return a torch\.bool tensor"):
        Inherits(2).mask(torch.randn(4))


def test_a_pattern_of_yours_that_fixes_its_level_is_treated_like_nm(registry):
    from constrainedsparse.sets import RowTopK

    @register_pattern
    class FixedHalf(RowTopK):
        kind = "fixed-half"
        fixed_level = True

        @classmethod
        def level(cls, **params):
            return 0.5

        @classmethod
        def at_level(cls, shape, sparsity, **params):
            return super().at_level(shape, 0.5, **params)

    config = cs.SparsityConfig.parse("fixed-half")
    assert config.fixed_level and config.sparsity == 0.5 and config.with_sparsity(0.9) is config
    assert config.describe() == "fixed-half" and config.summary_fields() == {"pattern": "fixed-half"}
    model = _Net()
    with pytest.raises(ValueError, match=r"^Targets\.overrides set per-layer sparsity levels; the pattern fixed-half "):
        cs.prune_layerwise(model, [torch.randn(4, 8)], "wanda", pattern="fixed-half", targets=cs.Targets(
            overrides={"blocks.0.0.weight": 0.25}))  # fmt: skip


def test_the_registration_decorators_return_the_class_itself(registry):
    class KeepAll(LayerwiseSolver):
        description = "keeps every weight"

        def prune(self, layer):
            raise AssertionError

    class Mine(_Described):
        pass

    assert register_solver("keep-all-returned")(KeepAll) is KeepAll
    assert register_formulation("mine-returned")(Mine) is Mine
    assert REGISTRY.get("layerwise", "keep-all-returned") is KeepAll
    assert REGISTRY.get("training", "mine-returned") is Mine


def test_the_annotations_a_users_type_checker_reads_name_the_config_class():
    """``from_values`` returns the class it is called on and ``Config`` is a Hyperparameters class (was ``type``:
    a checker refused ``cs.SLRConfig.from_values({}).rho`` and ``formulation_class(n).Config.from_values``)."""
    import typing

    returned = typing.get_type_hints(Hyperparameters.from_values)["return"]
    assert isinstance(returned, typing.TypeVar) and returned.__bound__ == typing.ForwardRef("Hyperparameters")
    assert typing.get_type_hints(Hyperparameters.from_values.__func__)["cls"] == type[returned]
    for owner in (Formulation, LayerwiseSolver):
        assert typing.get_type_hints(owner)["Config"] == typing.ClassVar[type[Hyperparameters]]
