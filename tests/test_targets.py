"""Targets: which parameters, which level, which pattern — validated up front."""

import pytest
import torch
from torch import nn

from constrainedsparse.sets import BlockSparse, NMSparse, RowTopK, StructuredGroups, TopK
from constrainedsparse.targets import SparsityConfig, Targets


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)
        self.norm = nn.LayerNorm(32)


def test_default_targets_are_linear_and_conv_weights_in_model_order():
    resolved = Targets().resolve(Net(), SparsityConfig(sparsity=0.75))
    assert [t.name for t in resolved] == ["conv.weight", "encoder.0.weight", "encoder.1.weight", "head.weight"]
    assert all(isinstance(t.feasible_set, TopK) for t in resolved)
    assert resolved[1].feasible_set.k == round(0.25 * 16 * 32)


def test_filter_include_exclude_and_overrides():
    targets = Targets(
        filter_fn=lambda module, fqn: not fqn.startswith("conv"),
        exclude=["head.*"],
        overrides={"encoder.1.*": 0.5},
    )
    resolved = targets.resolve(Net(), SparsityConfig(sparsity=0.9))
    assert [(t.name, t.sparsity) for t in resolved] == [("encoder.0.weight", 0.9), ("encoder.1.weight", 0.5)]
    only = Targets(include=["encoder.*"], param_names=("weight", "bias")).resolve(Net(), SparsityConfig(0.5))
    assert [t.name for t in only] == ["encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias"]


def test_patterns_map_to_feasible_sets():
    net = Net()
    assert isinstance(Targets().resolve(net, SparsityConfig(0.5, "row"))[0].feasible_set, RowTopK)
    structured = Targets().resolve(net, SparsityConfig(0.5, "structured"))[0].feasible_set
    assert isinstance(structured, StructuredGroups) and structured.k == 4
    nm = Targets(exclude=["conv.*"]).resolve(net, SparsityConfig.from_pattern("2:4"))
    assert all(isinstance(t.feasible_set, NMSparse) for t in nm)
    assert SparsityConfig.from_pattern("2:4").sparsity == 0.5


def test_validation_errors():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        SparsityConfig(sparsity=1.0)
    with pytest.raises(
        ValueError, match=r"pattern must be one of unstructured, row, nm, structured, block, got 'diag'"
    ):
        SparsityConfig(0.5, "diag")
    with pytest.raises(ValueError, match=r"^include 'nothing\.\*' matches no parameter; the candidates are conv"):
        Targets(include=["nothing.*"]).resolve(Net(), SparsityConfig(0.5))
    with pytest.raises(
        ValueError,
        match=r"^the target filter selects no parameters \(module_types=Linear, Conv1d, Conv2d, Conv3d, "
        r"param_names=\['weights'\], filter_fn=None, include=\[\], exclude=\[\]\); the model's parameters are conv",
    ):
        Targets(param_names=("weights",)).resolve(Net(), SparsityConfig(0.5))
    with pytest.raises(ValueError, match=r"selects no parameters \(.*filter_fn=given"):
        Targets(filter_fn=lambda module, fqn: fqn == "nope").resolve(Net(), SparsityConfig(0.5))
    with pytest.raises(
        ValueError, match=r"conv.weight: N:M pattern 2:4 needs the input width divisible by 4, got width 3"
    ):
        Targets().resolve(Net(), SparsityConfig.from_pattern("2:4"))
    with pytest.raises(ValueError, match=r"override 'head.\*' must be a sparsity in \[0, 1\), got 1.5"):
        Targets(overrides={"head.*": 1.5})
    names = ", ".join(t.name for t in Targets().resolve(Net(), SparsityConfig(0.5)))
    with pytest.raises(ValueError, match=rf"^override 'encodr\.\*' matches no targeted parameter; they are {names}$"):
        Targets(overrides={"encodr.*": 0.5}).resolve(Net(), SparsityConfig(0.5))
    for kind in ("include", "exclude"):  # a typo would prune what was meant to be kept, or keep what was not
        globs = {"include": ["conv.*", "hed.*"]} if kind == "include" else {"exclude": ["hed.*"]}
        with pytest.raises(ValueError, match=rf"^{kind} 'hed\.\*' matches no parameter; the candidates are {names}$"):
            Targets(**globs).resolve(Net(), SparsityConfig(0.5))
    with pytest.raises(ValueError, match=r"module_types must name at least one module class"):
        Targets(module_types=())


def test_set_at_rescales_the_same_pattern():
    target = Targets().resolve(Net(), SparsityConfig(0.5, "row"))[1]
    assert isinstance(target.set_at(0.25), RowTopK) and target.set_at(0.25).k == 12
    assert torch.equal(target.tensor, Net().encoder[0].weight) is False  # different init, same shape
    assert target.tensor.shape == (32, 16)


@pytest.mark.parametrize(
    ("text", "sparsity", "kind", "cls", "params"),
    [
        ("row", 0.5, "row", RowTopK, {}),
        ("unstructured", 0.5, "unstructured", TopK, {}),
        ("2:4", None, "nm", NMSparse, {"n": 2, "m": 4}),
        ("structured", 0.5, "structured", StructuredGroups, {"dim": 0}),
        ("structured:rows", 0.5, "structured", StructuredGroups, {"dim": 0}),
        ("structured:columns", 0.5, "structured", StructuredGroups, {"dim": 1}),
        ("block:4x8", 0.5, "block", BlockSparse, {"rows": 4, "cols": 8}),
        ("block:4", 0.5, "block", BlockSparse, {"rows": 4, "cols": 4}),
    ],
)
def test_one_pattern_vocabulary_from_text_to_sets(text, sparsity, kind, cls, params):
    config = SparsityConfig.parse(text, sparsity)
    assert config.pattern == kind and config.options == params
    assert SparsityConfig.parse(config.pattern_text(), sparsity) == config  # the text round-trips
    given = {} if sparsity is None else {"sparsity": sparsity}
    if ":" in text:  # text with parameters, as the README's SparsityConfig(sparsity=0.9, pattern="block:4x4")
        assert SparsityConfig(pattern=text, **given) == config
    feasible = config.feasible_set((32, 16))
    assert isinstance(feasible, cls)
    target = Targets(exclude=["conv.*"]).resolve(Net(), config)[0]
    assert isinstance(target.feasible_set, cls) and target.set_at(0.25) is not None


def test_pattern_text_errors():
    with pytest.raises(
        ValueError,
        match=r"^unknown pattern 'diag'; patterns: unstructured, row, 2:4, structured:rows, structured:columns, "
        r"block:4x4$",
    ):
        SparsityConfig.parse("diag", 0.5)
    with pytest.raises(ValueError, match=r"structured takes :rows or :columns"):
        SparsityConfig.parse("structured:diag", 0.5)
    with pytest.raises(ValueError, match=r"block takes RxC with positive integers"):
        SparsityConfig.parse("block:0x4", 0.5)
    with pytest.raises(
        ValueError, match=r"^pattern must look like N:M with integers 0 < N <= M \(e.g. 2:4\), got '4:2'$"
    ):
        SparsityConfig.parse("4:2")
    with pytest.raises(ValueError, match=r"fixes its own level"):
        SparsityConfig.parse("2:4", 0.5)
    with pytest.raises(ValueError, match=r"^pattern 2:4 fixes its own level 0\.5, got sparsity=0\.9: give one or"):
        SparsityConfig(sparsity=0.9, pattern="2:4")
    with pytest.raises(ValueError, match=r"^unknown pattern 'diag:3'; patterns: unstructured, row, 2:4,"):
        SparsityConfig(0.5, "diag:3")
    with pytest.raises(
        ValueError,
        match=r"^head.weight: block pattern 8x8 needs dims 0 and 1 divisible by \(8, 8\), got shape \(4, 32\)$",
    ):
        Targets(include=["head.*"]).resolve(Net(), SparsityConfig.parse("block:8x8", 0.5))


def test_a_tied_weight_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.fc(self.emb(x)))

    with pytest.raises(ValueError, match=r"^head\.weight is tied to emb\.weight \(the same tensor\): pruning a tied"):
        Targets().resolve(Tied(), SparsityConfig(0.5))
    hint = r"exclude every name of it \(exclude=\['emb\.weight', 'head\.weight'\]\)"  # one name is not enough
    with pytest.raises(ValueError, match=hint):
        Targets(module_types=(nn.Linear, nn.Embedding)).resolve(Tied(), SparsityConfig(0.5))
    chosen = Targets(module_types=(nn.Linear, nn.Embedding), exclude=["head.weight", "emb.weight"])
    assert [t.name for t in chosen.resolve(Tied(), SparsityConfig(0.5))] == ["fc.weight"]
    assert [t.name for t in Targets(exclude=["head.*"]).resolve(Tied(), SparsityConfig(0.5))] == ["fc.weight"]
    # the advice names only what exclude can name (emb.weight is no candidate of the default Linear targets)
    with pytest.raises(ValueError, match=r"exclude every name of it \(exclude=\['head\.weight'\]\)"):
        Targets().resolve(Tied(), SparsityConfig(0.5))


def test_one_module_under_two_attribute_names_is_one_layer_not_a_tie():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    model.again = model[0]  # an alias: the module's masks reach both names
    assert [t.name for t in Targets().resolve(model, SparsityConfig(0.5))] == ["0.weight", "2.weight"]
    # patterns match the first name; one that matches only the second says so
    with pytest.raises(ValueError, match=r"^exclude 'again\.weight' matches again\.weight, a second name of 0\.weight"):
        Targets(exclude=["again.weight"]).resolve(model, SparsityConfig(0.5))
    assert [t.name for t in Targets(exclude=["0.weight"]).resolve(model, SparsityConfig(0.5))] == ["2.weight"]
    model[0].register_parameter("weight_alias", model[0].weight)  # one module, its weight under a second name
    with pytest.raises(ValueError, match=r"^0\.weight is tied to 0\.weight_alias \(the same tensor\)"):
        Targets().resolve(model, SparsityConfig(0.5))


def _spectral():
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 4))


def _weight_norm():
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 4))


def _buffer_weight():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    del model[0].weight
    model[0].register_buffer("weight", torch.ones(8, 4))
    return model


def _torch_pruned():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    from torch.nn.utils import prune

    prune.l1_unstructured(model[0], "weight", amount=0.5)  # weight: recomputed from weight_orig by a pre-hook
    return model


@pytest.mark.parametrize(
    ("build", "config", "message"),
    [
        (
            _spectral,
            SparsityConfig(0.5),
            r"^0\.weight carries a parametrization of yours \(_SpectralNorm\): masks and "
            r"gates replace the weight .*remove_parametrizations\(module, 'weight'\)\) or exclude 0\.weight$",
        ),
        (_weight_norm, SparsityConfig(0.5), r"^0\.weight carries a parametrization of yours \(_WeightNorm\)"),
        (
            _buffer_weight,
            SparsityConfig(0.5),
            r"^0\.weight is a Tensor, not an nn\.Parameter \(a buffer, .*exclude it$",
        ),
        (
            lambda: nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4)),
            SparsityConfig(0.5),
            r"^0\.weight is not initialized yet \(LazyLinear is lazy\): run one forward pass of the model",
        ),
        (
            lambda: nn.Sequential(nn.ConvTranspose2d(8, 4, 3)),
            SparsityConfig(0.5, pattern="row"),
            r"^0\.weight: a ConvTranspose2d stores its weight as \(inputs, outputs, \.\.\.\), so pattern 'row' would "
            r"group its outputs; only unstructured targets it in training$",
        ),
        (
            _torch_pruned,
            SparsityConfig(0.5),
            r"^0\.weight is a Tensor, not an nn\.Parameter .* as torch\.nn\.utils\.prune, spectral_norm .*take the "
            r"hook off first \(torch\.nn\.utils\.prune\.remove, remove_spectral_norm, remove_weight_norm\) or "
            r"exclude it$",
        ),
    ],
    ids=["spectral_norm", "weight_norm", "buffer", "lazy", "conv-transpose-row", "torch-prune"],
)
def test_weights_that_cannot_be_pruned_as_they_are_are_refused_at_resolve(build, config, message):
    with pytest.raises(ValueError, match=message):
        Targets(module_types=(nn.Linear, nn.ConvTranspose2d)).resolve(build(), config)


def test_a_conv_transpose_is_pruned_unstructured():
    targets = Targets(module_types=(nn.ConvTranspose2d,)).resolve(
        nn.Sequential(nn.ConvTranspose2d(8, 4, 3)), SparsityConfig(0.5)
    )
    assert [t.name for t in targets] == ["0.weight"]


def test_a_level_that_keeps_no_weight_is_refused_at_resolve():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"^2\.weight: sparsity 0\.9 keeps none of its 2 weights \(the layer would be"):
        Targets().resolve(model, SparsityConfig(0.9))
    kept = Targets(overrides={"2.*": 0.5}).resolve(model, SparsityConfig(0.9))
    assert [t.sparsity for t in kept] == [0.9, 0.5]
    assert len(Targets().resolve(model, SparsityConfig(0.9), allow_empty=True)) == 2


def test_overrides_next_to_an_n_m_pattern_are_refused_at_resolve():
    # The level of an N:M tensor is its pattern's: an override was dropped without a word (2:4 at 0.5 for 0.3).
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"^Targets\.overrides set per-layer sparsity levels; the N:M pattern 2:4"):
        Targets(overrides={"0.weight": 0.3}).resolve(model, SparsityConfig.parse("2:4"))
    assert len(Targets().resolve(model, SparsityConfig.parse("2:4"))) == 2


def test_a_fixed_level_given_as_well_must_match_it():
    assert SparsityConfig(sparsity=1 / 3, pattern="nm", nm=(2, 3)).sparsity == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"^pattern 2:3 fixes its own level 0\.33333333333333337, got sparsity=0\.5"):
        SparsityConfig(sparsity=0.5, pattern="nm", nm=(2, 3))


def test_a_torch_compile_wrapper_resolves_to_the_modules_own_names():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    compiled = torch.compile(model, backend="eager")  # wraps lazily: nothing compiles here
    targets = Targets().resolve(compiled, SparsityConfig(0.5))
    assert [t.name for t in targets] == ["0.weight", "2.weight"]  # no "_orig_mod." prefix
    assert targets[0].module is model[0]


def test_a_tensor_listed_twice_is_refused_where_the_targets_are_taken():
    """Two overlapping resolves joined: magnitude kept the last pattern and counted the tensor twice, l0 gated it
    twice and crashed in finalize, slr/admm named a constraint already registered."""
    import constrainedsparse as cs

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    targets = Targets().resolve(model, SparsityConfig(0.75)) + Targets(include=["0.weight"]).resolve(
        model, SparsityConfig.parse("2:4")
    )
    message = r"targets list 0\.weight twice: give each tensor once \(for another level or pattern on some layers, "
    with pytest.raises(ValueError, match="^" + message):
        cs.SparsityProblem(model, nn.functional.cross_entropy, targets)
    with pytest.raises(ValueError, match=r"^achieved_sparsity\(targets\): " + message):
        cs.achieved_sparsity(targets)
    with pytest.raises(ValueError, match=r"^param_names lists 'weight' twice: name each parameter once$"):
        Targets(param_names=("weight", "weight"))


def test_module_types_given_as_a_list_resolve_and_an_unlisted_conv1d_is_named_when_nothing_is_selected():
    """``Targets(module_types=[nn.Linear])`` (a list, as the error text allows) raised isinstance()'s TypeError; a GPT-2
    model under the default module types selected nothing without saying its layers are transformers' Conv1D."""
    from transformers.pytorch_utils import Conv1D

    assert [t.name for t in Targets(module_types=[nn.Linear]).resolve(nn.Linear(4, 4), SparsityConfig(0.5))] == [
        "weight"
    ]
    gpt2_like = nn.Sequential(Conv1D(8, 4), nn.ReLU(), Conv1D(2, 8))
    with pytest.raises(
        ValueError,
        match=r"\(its Conv1D layers are not in module_types: add their class, e.g. "
        r"transformers\.pytorch_utils\.Conv1D for GPT-2\)$",
    ):
        Targets().resolve(gpt2_like, SparsityConfig(0.5))
    with pytest.raises(ValueError, match=r"the model.s parameters are .* \(10 in all\)$"):
        Targets(param_names=("weights",)).resolve(Net(), SparsityConfig(0.5))  # nothing unlisted: no hint
    chosen = Targets(module_types=[nn.Linear, Conv1D]).resolve(gpt2_like, SparsityConfig(0.5))
    assert [t.name for t in chosen] == ["0.weight", "2.weight"]


@pytest.mark.parametrize(
    ("pattern", "params", "message"),
    [
        ("structured", (("bogus", 2),), r"^pattern 'structured' takes params like \('dim', 1\), got"),
        ("structured", (("dim", 2),), r"^structured groups take dim 0 \(rows\) or 1 \(columns\), got 2$"),
        ("block", (("rows", 0), ("cols", 2)), r"^params \(\('rows', 0\), \('cols', 2\)\): pattern 'block:0x2': block"),
    ],
)
def test_pattern_params_its_text_cannot_say_are_refused_when_the_config_is_built(pattern, params, message):
    """``dim=2`` was taken and refused only at resolve, as 'need a tensor with 3 dimensions' (no tensor would do)."""
    with pytest.raises(ValueError, match=message):
        SparsityConfig(0.5, pattern, params=params)
    assert SparsityConfig(0.5, "structured", params=(("dim", 1),)).pattern_text() == "structured:columns"
