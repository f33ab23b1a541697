"""prune_layerwise on models outside the transformers zoo: blocks that are bare layers, computations between
blocks (an activation, a residual sum), a layer whose forward never runs (nn.MultiheadAttention's out_proj), and
targets of a module type layer-wise pruning cannot prune."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from constrainedsparse import Targets, prune_layerwise
from constrainedsparse.errors import UserInputError
from constrainedsparse.layerwise.checks import check_consecutive


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def _refused_untouched(model: nn.Module, message: str, **options: object) -> None:
    """``prune_layerwise`` (wanda at 0.5 on one batch of 8 x 16) refuses ``model`` with exactly ``message``, before
    any weight changes."""
    before = _snapshot(model)
    with pytest.raises(UserInputError, match=f"^{re.escape(message)}$"):
        prune_layerwise(model, [torch.randn(8, 16)], "wanda", sparsity=0.5, **options)
    assert _unchanged(model, before)


class LinearTower(nn.Module):
    """Blocks that are bare ``nn.Linear`` layers."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


class Encoder(nn.Module):
    """A plain nn.TransformerEncoder: its attention reads out_proj.weight without calling out_proj."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


class ConvStack(nn.Module):
    def __init__(self, conv: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(conv(8, 8, 1), nn.ReLU()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_blocks_that_are_bare_layers_are_pruned_and_named_by_their_weight():
    torch.manual_seed(0)
    model = LinearTower()
    report = prune_layerwise(model, [torch.randn(32, 16)], "wanda", sparsity=0.5)
    names = [f"blocks.{index}.weight" for index in range(3)]
    assert report.layer_sparsity == dict.fromkeys(names, 0.5)
    assert list(report.layer_error) == names
    assert all(float((block.weight == 0).float().mean()) == 0.5 for block in model.blocks)


class Residual(nn.Module):
    """``x + inner(x)``: a residual sum inside a block."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class OutsideResidual(nn.Module):
    """Blocks of two layers whose residual sum the model computes between the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class Chain(nn.Module):
    """The same computation with everything inside the blocks."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _chained_twin(model: nn.Module) -> nn.Module:
    """``model`` with what runs between its blocks moved into them (same weights, same outputs)."""
    import copy

    blocks = copy.deepcopy(list(model.blocks))
    if isinstance(model, LinearTower):
        return Chain([nn.Sequential(block, nn.ReLU()) for block in blocks])
    return Chain([Residual(block) for block in blocks])


@pytest.mark.parametrize("model_class", [LinearTower, OutsideResidual])
def test_what_runs_between_blocks_reaches_the_next_blocks_calibration(model_class):
    torch.manual_seed(0)
    model = model_class()
    twin = _chained_twin(model)
    batches = [torch.randn(32, 16) for _ in range(2)]
    x = batches[0]
    assert torch.equal(model(x), twin(x))
    report = prune_layerwise(model, batches, "sparsegpt", sparsity=0.5)
    expected = prune_layerwise(twin, batches, "sparsegpt", sparsity=0.5)
    # The walk runs the model up to each next block (its activation or residual sum included), so both
    # models calibrate every layer on the same inputs: identical pruned weights and errors.
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    twin_weights = [p for n, p in twin.named_parameters() if n.endswith("weight")]
    assert all(torch.equal(a, b) for a, b in zip(weights, twin_weights, strict=True))
    assert list(report.layer_error.values()) == pytest.approx(list(expected.layer_error.values()))


class _Gained(nn.Module):
    """``x + fc(x * gain)``, with ``gain`` given by the caller or kept by the block."""

    def __init__(self, fc: nn.Linear, gain: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fc, self.gain = fc, gain

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.fc(x * (self.gain if gain is None else gain))


class OwnArguments(nn.Module):
    """Each block called with an argument of its own, as Gemma 2/3's local and global layers get their own
    attention mask or rotary embeddings."""

    def __init__(self, gains: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.gains = gains or [torch.linspace(0.1, 3.0, 16), torch.linspace(3.0, 0.1, 16), torch.ones(16)]
        self.blocks = nn.ModuleList(_Gained(nn.Linear(16, 16)) for _ in self.gains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, gain in zip(self.blocks, self.gains, strict=True):
            x = block(x, gain=gain)
        return x


ALTERNATING = [torch.linspace(0.1, 3.0, 16), torch.linspace(3.0, 0.1, 16)] * 2  # Gemma 2's local / global


@pytest.mark.parametrize("gains", [None, ALTERNATING], ids=["each-its-own", "alternating"])
@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
def test_blocks_called_with_arguments_of_their_own_are_calibrated_with_them(solver, gains):
    """The walk ran every block with the first block's keyword arguments: Gemma 2's sliding-window masks and
    Gemma 3's local rotary embeddings were block 0's, and later blocks were calibrated on wrong inputs. Calls that
    recur (alternating) are captured ahead and each block runs on the previous one's output with its own."""
    torch.manual_seed(0)
    model = OwnArguments(gains)
    twin = Chain([_Gained(copy.deepcopy(b.fc), gain) for b, gain in zip(model.blocks, model.gains, strict=True)])
    batches = [torch.randn(32, 16) for _ in range(2)]
    assert torch.equal(model(batches[0]), twin(batches[0]))
    report = prune_layerwise(model, batches, solver, sparsity=0.5)
    expected = prune_layerwise(twin, batches, solver, sparsity=0.5)
    for block, twin_block in zip(model.blocks, twin.blocks, strict=True):
        assert torch.equal(block.fc.weight, twin_block.fc.weight)
    assert list(report.layer_error.values()) == pytest.approx(list(expected.layer_error.values()))


def test_a_walk_that_reruns_the_model_up_to_every_block_says_why_and_what_it_costs():
    """The fallback for blocks that are not a chain ran about L²/2 block forwards without a word (Gemma 2/3's
    26-62 layers: 13-31 times the chained walk's)."""
    torch.manual_seed(0)
    own = OwnArguments([torch.linspace(0.1, 3.0, 16), torch.linspace(3.0, 0.1, 16), torch.ones(16), torch.ones(16)])
    outside = OutsideResidual()
    outside.blocks.append(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)))
    cost = r": each of the 4 blocks' calibration inputs come from a forward of the model up to it, about 10 block " \
        r"forwards a pass instead of 4$"  # fmt: skip
    for model, why in (
        (own, r"^blocks\.1 and 1 more of the 4 blocks get other arguments than any block before them \(3 distinct "
              r"calls: a walk reuses calls that serve two blocks each on average\)"),
        (outside, r"^blocks\.1 is not called with blocks\.0's output \(the model computes between them: a norm, an "
                  r"activation, a residual sum outside the blocks\)"),
    ):  # fmt: skip
        with pytest.warns(UserWarning, match=why + cost) as caught:
            prune_layerwise(model, [torch.randn(8, 16)], "wanda", sparsity=0.5)
        assert [w.filename for w in caught if "block forwards" in str(w.message)] == [__file__]
    for quiet in (Chain([nn.Linear(16, 16) for _ in range(4)]), OwnArguments(ALTERNATING)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prune_layerwise(quiet, [torch.randn(8, 16)], "wanda", sparsity=0.5)


def test_same_call_compares_everything_but_the_hidden_states():
    import numpy as np

    from constrainedsparse.layerwise.blockinputs import BlockInputs

    h, mask, cos = torch.randn(2, 3, 4), torch.ones(2, 1, 3, 3), torch.randn(3, 4)
    call = BlockInputs((h,), {"attention_mask": mask, "position_embeddings": (cos, cos), "use_cache": False}, None)
    assert call.same_call(call.with_hidden(torch.zeros(2, 3, 4)))
    same = BlockInputs((h * 2,), {"attention_mask": mask.clone(), "position_embeddings": (cos.clone(), cos),
                                  "use_cache": False}, None)  # fmt: skip
    assert call.same_call(same)
    for key, other in (
        ("attention_mask", mask.triu()),  # a sliding-window layer's mask
        ("attention_mask", mask.double()),
        ("attention_mask", None),
        ("position_embeddings", (cos * 2, cos)),  # a local layer's rotary embeddings
        ("position_embeddings", [cos, cos]),
        ("use_cache", True),
        ("use_cache", np.zeros(2)),  # == is no truth value: different
    ):
        assert not call.same_call(BlockInputs((h,), {**call.kwargs, key: other}, None)), key
    by_keyword = BlockInputs((), {"hidden_states": h, "attention_mask": mask}, None)
    assert by_keyword.same_call(by_keyword.with_hidden(h + 1)) and not by_keyword.same_call(call)


class FusedExperts(nn.Module):
    """A block whose experts are one 3-D parameter (transformers' Mixtral, Qwen2-MoE, OLMoE), beside an attention
    ``nn.Linear`` layer-wise pruning prunes."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.experts = nn.Parameter(torch.randn(4, 16, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + torch.einsum("bi,eoi->bo", x, self.experts) / 4


class _ExpertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + sum(expert(x) for expert in self.experts) / 8


class ExpertLists(Chain):
    """Two layers of eight experts each (ModuleLists inside the blocks, longer than the list of blocks)."""

    def __init__(self) -> None:
        super().__init__([_ExpertLayer() for _ in range(2)])


def test_weights_outside_prunable_layers_warn_and_blocks_are_the_outer_list():
    torch.manual_seed(0)
    model = Chain([FusedExperts() for _ in range(2)])
    with pytest.warns(UserWarning, match=r"^blocks\.0\.experts and 1 more \(80% of the blocks' matrix weights\) are "
                      r"not in a layer layer-wise pruning prunes .* and stay dense"):  # fmt: skip
        report = prune_layerwise(model, [torch.randn(32, 16)], "wanda", sparsity=0.5)
    assert list(report.layer_sparsity) == ["blocks.0.attn.weight", "blocks.1.attn.weight"]
    assert torch.count_nonzero(model.blocks[0].experts) == model.blocks[0].experts.numel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bare layers: nothing outside
        prune_layerwise(LinearTower(), [torch.randn(32, 16)], "wanda", sparsity=0.5)
    experts = ExpertLists()  # the blocks are the layers, not a layer's longer list of experts
    report = prune_layerwise(experts, [torch.randn(32, 16)], "wanda", sparsity=0.5)
    assert len(report.layer_sparsity) == 16 and list(report.layer_sparsity)[0] == "blocks.0.experts.0.weight"


def test_two_block_lists_of_one_length_are_refused_naming_both():
    class TwoTowers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text, self.image = LinearTower(), LinearTower()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.text(x) + self.image(x)

    model = TwoTowers()
    refusal = r"^TwoTowers has 2 lists of 3 blocks \(text\.blocks, image\.blocks\): name the one to prune with blocks="
    with pytest.raises(ValueError, match=refusal):
        prune_layerwise(model, [torch.randn(8, 16)], "wanda", sparsity=0.5)
    report = prune_layerwise(model, [torch.randn(8, 16)], "wanda", sparsity=0.5, blocks=model.text.blocks)
    assert list(report.layer_sparsity) == [f"text.blocks.{i}.weight" for i in range(3)]


def test_find_blocks_takes_the_list_with_layers_to_prune_and_warns_of_a_shorter_one():
    from constrainedsparse.layerwise.layers import find_blocks

    class WithNorms(LinearTower):  # a list of norms beside the blocks holds nothing to prune
        def __init__(self) -> None:
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in range(3))

    model = WithNorms()
    assert find_blocks(model) is model.blocks
    wrapped = nn.Module()
    wrapped.inner = nn.ModuleList([LinearTower()])  # a wrapper's list of one: the blocks are inside it
    assert find_blocks(wrapped) is wrapped.inner[0].blocks
    root = nn.ModuleList(_ExpertLayer() for _ in range(2))  # the model is the list: its experts are no blocks
    assert find_blocks(root) is root
    single = Chain([nn.Linear(16, 16)])  # one block
    assert find_blocks(single) is single.blocks

    class Uneven(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = LinearTower(), Chain([nn.Linear(16, 16) for _ in range(2)])

    uneven = Uneven()
    with pytest.warns(UserWarning, match=r"^the blocks pruned are encoder\.blocks \(3\); decoder\.blocks \(2\) also "
                      r"hold layers and stay dense: name the blocks to prune with blocks=$"):  # fmt: skip
        assert find_blocks(uneven) is uneven.encoder.blocks


def test_blocks_given_as_bare_layers_are_pruned_and_blocks_out_of_order_refused():
    torch.manual_seed(0)
    model = LinearTower()
    report = prune_layerwise(model, [torch.randn(32, 16)], "wanda", sparsity=0.5, blocks=list(model.blocks)[:2])
    assert list(report.layer_error) == ["blocks.0.weight", "blocks.1.weight"]

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Sequential(nn.Linear(16, 16)), nn.Sequential(nn.Linear(16, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Named()
    before = _snapshot(model)
    message = "blocks must be the model's blocks in execution order, each called once: a ran first"
    with pytest.raises(UserInputError, match=f"^{re.escape(message)}$"):
        prune_layerwise(model, [torch.randn(32, 16)], "wanda", sparsity=0.5, blocks=[model.b, model.a])
    assert _unchanged(model, before)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_a_layer_whose_forward_never_runs_is_refused_naming_why_before_any_weight_changes(true_sequential):
    torch.manual_seed(0)
    model = Encoder()
    before = _snapshot(model)
    message = (
        "enc.layers.0.self_attn.out_proj.weight: its forward never ran on the 2 calibration batches (a module that "
        "reads its weight directly, such as nn.MultiheadAttention's out_proj, or an expert no token was routed to): "
        "exclude it from the targets"
    )
    with pytest.raises(UserInputError, match=f"^{re.escape(message)}$"):
        prune_layerwise(
            model, [torch.randn(2, 4, 16) for _ in range(2)], "wanda", sparsity=0.5, true_sequential=true_sequential
        )
    assert _unchanged(model, before)


def test_a_layer_that_ran_on_padding_only_keeps_the_padding_message():
    model = LinearTower()
    before = _snapshot(model)
    batch = {"x": torch.randn(2, 3, 16), "attention_mask": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(UserInputError, match=r"^blocks\.0\.weight: no calibration token reached it \(every position"):
        prune_layerwise(model, [batch], "wanda", sparsity=0.5)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    ("model", "shape", "targets", "name", "kind"),
    [
        (ConvStack(nn.Conv2d), (2, 8, 6, 6), Targets(module_types=(nn.Conv2d,)), "blocks.0.0.weight", "nn.Conv2d"),
        (
            ConvStack(nn.Conv1d),
            (2, 8, 8),
            Targets(module_types=(nn.Conv1d, nn.Linear)),
            "blocks.0.0.weight",
            "nn.Conv1d",
        ),
        (
            Encoder(),
            (2, 4, 16),
            Targets(module_types=(nn.MultiheadAttention,), param_names=("in_proj_weight",)),
            "enc.layers.0.self_attn.in_proj_weight",
            "nn.MultiheadAttention",
        ),
    ],
    ids=["conv2d", "conv1d", "attention-in-proj"],
)
def test_targets_of_a_module_type_layerwise_cannot_prune_are_refused_up_front(model, shape, targets, name, kind):
    before = _snapshot(model)
    message = (
        f"{name} is a parameter of {kind}, a module type layer-wise pruning cannot prune: it prunes the weights of "
        "nn.Linear and transformers' Conv1D layers only (narrow Targets.module_types, or exclude it)"
    )
    with pytest.raises(UserInputError, match=f"^{re.escape(message)}$"):
        prune_layerwise(model, [torch.randn(shape)], "sparsegpt", sparsity=0.5, targets=targets)
    assert _unchanged(model, before)


class _KeywordBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x)


class _Keywords(nn.Module):
    """Blocks called with their hidden states under a keyword other than hidden_states; can fail between blocks."""

    def __init__(self, fail_between: bool = False) -> None:
        super().__init__()
        self.fail_between = fail_between
        self.blocks = nn.ModuleList(_KeywordBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = torch.relu(block(x=x))
            if self.fail_between and index == 0:
                raise RuntimeError("the model fails here")
        return x


def test_keyword_hidden_states_gaps_and_a_failure_between_blocks():
    torch.manual_seed(0)
    batches = [torch.randn(32, 16)]
    report = prune_layerwise(_Keywords(), batches, "sparsegpt", sparsity=0.5)  # reached by running the model
    assert list(report.layer_error) == [f"blocks.{index}.linear.weight" for index in range(3)]
    model = _Keywords(fail_between=True)
    before = _snapshot(model)
    message = (
        "calibration batch 0: the model's forward failed after blocks.0, before the next block ran: RuntimeError: "
        "the model fails here"
    )
    with pytest.raises(UserInputError, match=f"^{re.escape(message)}$"):
        prune_layerwise(model, batches, "sparsegpt", sparsity=0.5)
    assert _unchanged(model, before)
    # A gap is found by the chain check (blocks.2 is called with blocks.1's output): blocks.1 runs dense between.
    model = Chain([nn.Sequential(nn.Linear(16, 16)) for _ in range(3)])
    twin, fresh = _chained_twin_of_gap(model), copy.deepcopy(model)
    report = prune_layerwise(model, batches, "sparsegpt", sparsity=0.5, blocks=[model.blocks[0], model.blocks[2]])
    dense_middle = Targets(module_types=(nn.Linear,), exclude=["blocks.1.0.*"])  # the skipped block stays dense
    expected = prune_layerwise(twin, batches, "sparsegpt", sparsity=0.5, targets=dense_middle)
    assert list(report.layer_error.values()) == pytest.approx(list(expected.layer_error.values()))
    # offload=True where the model already is moves nothing (the docs' "does nothing"): the chain check still runs
    offloaded = prune_layerwise(fresh, batches, "sparsegpt", sparsity=0.5, blocks=[fresh.blocks[0], fresh.blocks[2]],
                                offload=True)  # fmt: skip
    assert list(offloaded.layer_error.values()) == pytest.approx(list(report.layer_error.values()))


def test_a_gap_is_refused_where_offload_moves_blocks_to_another_device():
    # moved elsewhere, the walk runs each block on the previous one's outputs (no forward of the whole model there)
    with pytest.raises(UserInputError, match=r"^with offload, blocks must follow each other without a gap: "
                       r"blocks\.0 is followed by blocks\.2, which skips blocks\.1 "):  # fmt: skip
        check_consecutive(["blocks.0", "blocks.2"], offload=True)
    check_consecutive(["blocks.0", "blocks.2"], offload=False)


def _chained_twin_of_gap(model: nn.Module) -> nn.Module:
    """``Chain`` of blocks 0 and 1 + 2 of ``model`` (copies): the skipped block 1 runs inside block 2."""
    import copy

    blocks = copy.deepcopy(list(model.blocks))
    return Chain([blocks[0], nn.Sequential(blocks[1], blocks[2])])


def test_a_dense_block_fit_target_is_refused_where_the_model_computes_between_blocks():
    # The dense target follows the dense blocks' outputs from block to block: wrong where an activation sits
    # between them. block_fit_target=block (each block's dense outputs on its own inputs) is right there.
    torch.manual_seed(0)
    model = LinearTower()
    before = _snapshot(model)
    batches = [torch.randn(32, 16)]
    with pytest.raises(UserInputError, match=r"^block_fit_target=dense fits each block .* set block_fit_target=block"):
        prune_layerwise(model, batches, "wanda", sparsity=0.5, block_fit_epochs=1)
    assert _unchanged(model, before)
    report = prune_layerwise(model, batches, "wanda", sparsity=0.5, block_fit_epochs=1, block_fit_target="block")
    assert len(report.layer_error) == 3


def test_offload_where_the_model_is_still_checks_the_chain():
    # offload=True with the model already on the compute device moves nothing: the chain check still runs, so an
    # activation between blocks reaches the next block's calibration as without offload.
    batches = [torch.randn(32, 16)]
    reports = []
    for offload in (False, True):
        torch.manual_seed(0)
        reports.append(prune_layerwise(LinearTower(), batches, "sparsegpt", sparsity=0.5, offload=offload))
    assert list(reports[0].layer_error.values()) == pytest.approx(list(reports[1].layer_error.values()))


def test_blocks_without_parameters_are_walked_through_and_the_layers_between_them_pruned():
    # single layers of an nn.Sequential as its blocks, activations included: they have nothing to prune or move
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    twin = nn.Sequential(*(nn.Sequential(layer) for layer in copy.deepcopy(list(model))))
    batches = [torch.randn(16, 16) for _ in range(2)]
    for offload in (False, True):
        pruned = copy.deepcopy(model)
        report = prune_layerwise(pruned, batches, "wanda", sparsity=0.5, blocks=list(pruned), offload=offload)
        assert list(report.layer_sparsity) == ["0.weight", "2.weight", "4.weight"]
        assert all(level == pytest.approx(0.5) for level in report.layer_sparsity.values())
    expected = prune_layerwise(twin, batches, "wanda", sparsity=0.5, blocks=list(twin))  # the same, as chained blocks
    assert list(report.layer_error.values()) == pytest.approx(list(expected.layer_error.values()))


class _Partial(nn.Module):
    """Holds three blocks, its forward calls two."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](x))


def test_a_block_the_forward_never_calls_is_refused_before_pruning():
    # the walk would have fed blocks.2 the outputs of blocks.1, which the model never gives it
    torch.manual_seed(0)
    message = (
        "blocks.2 never ran on calibration batch 0: blocks must be blocks the model's forward calls, in execution order"
    )
    _refused_untouched(_Partial(), message)


def test_a_block_returning_a_dict_is_refused_naming_it_and_keyword_inputs_name_what_needs_them():
    torch.manual_seed(0)
    message = (
        "blocks.0: a block returned a dict: a block's output must be its hidden states, a tensor or the first element "
        "of a tuple"
    )
    _refused_untouched(_OutputBlocks("dict"), message)
    # blocks called as block(x=x): plain pruning runs the model up to each block; running a block on its own cannot
    message = (
        "a block is called with its input neither as its first positional argument nor as hidden_states= (keywords: "
        "x): running a block on its own (block_fit_epochs, block_mask_rounds, allocation=lagrangian) needs its input "
        "there"
    )
    for options in ({"block_fit_epochs": 1, "block_fit_target": "block"}, {"allocation": "lagrangian"}):
        _refused_untouched(_Keywords(), message, **options)


class _ReadsKeys(nn.Module):
    """Reads its batch as a dict before the first block (as transformers models read a cache object)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch.get("x")
        for block in self.blocks:
            x = block(x)
        return x


def test_batches_the_model_cannot_take_or_without_values_are_one_line_before_pruning():
    model = _ReadsKeys()
    before = _snapshot(model)
    message = (
        "calibration batch 0: the model's forward failed before the block to calibrate: AttributeError: 'Tensor' "
        "object has no attribute 'get' (check the batches' shapes, dtypes and token ids)"
    )
    _refused_untouched(model, message)
    with pytest.raises(ValueError, match=r"^calibration batch 1 holds a tensor on the meta device \(a shape without"):
        prune_layerwise(model, [{"x": torch.randn(8, 16)}, {"x": torch.randn(8, 16, device="meta")}], "wanda")
    assert _unchanged(model, before)


class _OutputBlock(nn.Module):
    """Returns its hidden states as a transformers ModelOutput, a dict, or a tuple whose first element is None."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.linear = kind, nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> object:
        from transformers.modeling_outputs import BaseModelOutput

        h = x + self.linear(x)
        return {"output": BaseModelOutput(last_hidden_state=h), "dict": {"out": h}, "none": (None, h)}[self.kind]


class _OutputBlocks(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_OutputBlock(kind) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(x)
            x = out[1] if isinstance(out, tuple) else out["out"] if isinstance(out, dict) and "out" in out else out[0]
        return x


def test_blocks_returning_a_model_output_prune_as_tensor_blocks_and_a_none_first_element_is_named():
    torch.manual_seed(0)
    model = _OutputBlocks("output")
    plain = Chain([nn.Sequential(_Residual16(block.linear)) for block in copy.deepcopy(list(model.blocks))])
    batches = [torch.randn(8, 16)]
    report = prune_layerwise(model, batches, "sparsegpt", sparsity=0.5)
    expected = prune_layerwise(plain, batches, "sparsegpt", sparsity=0.5)
    assert list(report.layer_error.values()) == pytest.approx(list(expected.layer_error.values()))
    message = (
        "blocks.0: a block returned a tuple whose first element is a NoneType: a block's output must be its hidden "
        "states, a tensor or the first element of a tuple"
    )
    _refused_untouched(_OutputBlocks("none"), message)


class _Residual16(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


def _tiny_gemma(arch: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, sliding_window=4, attn_implementation="eager")  # fmt: skip
    if arch == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**shape)).eval()
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**shape)).eval()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_local_and_global_layers_are_walked_as_a_chain_with_their_own_masks(arch, monkeypatch):
    """Gemma 2/3's sliding-window and global layers get masks (and Gemma 3 rotary embeddings) of their own: the walk
    re-ran the model up to every block, L(L+1)/2 block forwards a pass. Their calls are now captured ahead: the
    same pruned weights as that walk's, in a number of block forwards linear in L."""
    model = _tiny_gemma(arch)
    rerun = copy.deepcopy(model)
    batches = [{"input_ids": torch.randint(0, 64, (2, 10))} for _ in range(2)]
    counts = []
    for pruned in (model, rerun):
        count = [0]
        for layer in pruned.model.layers:
            layer.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        if pruned is rerun:
            _rerun_walk(monkeypatch)
        prune_layerwise(pruned, batches, "sparsegpt", sparsity=0.5)
        counts.append(count[0])
    for ours, theirs in zip(model.parameters(), rerun.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert counts[0] < counts[1], counts  # 37 against 42 here, 6 blocks; the rerun grows with L², this with L


def _rerun_walk(monkeypatch) -> None:
    """Forces the walk that runs the model up to every block (the reference: nothing captured ahead)."""
    from constrainedsparse.layerwise import driver
    from constrainedsparse.layerwise.capture import BlockChain

    monkeypatch.setattr(driver, "walk_chained", lambda *args, **kwargs: BlockChain(False))


class _ValueBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.fc(x if first is None else x * first)


class ValueResidual(nn.Module):
    """ResFormer-style: every block after the first also gets the first block's output, two distinct calls."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ValueBlock() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = None
        for index, block in enumerate(self.blocks):
            x = block(x, first=first)
            first = x if index == 0 else first
        return x


def test_arguments_computed_from_earlier_blocks_are_not_captured_ahead(monkeypatch):
    """Two distinct calls, but the second carries the first block's output: captured from the dense model ahead,
    blocks 1-3 were calibrated with the unpruned block 0's output."""
    torch.manual_seed(0)
    model = ValueResidual()
    rerun = copy.deepcopy(model)
    batches = [torch.randn(32, 16) for _ in range(2)]
    why = (
        r"^blocks\.1 is called with arguments computed from the weights of the blocks before it, which pruning changes"
    )
    with pytest.warns(UserWarning, match=why):
        prune_layerwise(model, batches, "sparsegpt", sparsity=0.5)
    _rerun_walk(monkeypatch)
    prune_layerwise(rerun, batches, "sparsegpt", sparsity=0.5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), rerun.parameters(), strict=True))


def test_the_chain_is_judged_on_the_longest_batch(monkeypatch):
    """Judged on a first batch within Gemma 2's sliding window (every layer the same mask), the blocks passed for a
    plain chain and the longer batches ran every layer with the first layer's mask. Longest by sequence, not by size:
    the short batch has more rows."""
    model = _tiny_gemma("gemma2")
    rerun = copy.deepcopy(model)
    batches = [{"input_ids": torch.randint(0, 64, (4, 3))}, {"input_ids": torch.randint(0, 64, (1, 12))}]
    prune_layerwise(model, batches, "sparsegpt", sparsity=0.5)
    _rerun_walk(monkeypatch)
    prune_layerwise(rerun, batches, "sparsegpt", sparsity=0.5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), rerun.parameters(), strict=True))


def test_a_key_value_cache_in_the_batches_is_refused_before_any_weight_changes():
    """A batch's use_cache=True overrode the config's use_cache=False: every block run appended to one cache object
    (a size mismatch, or wrong weights without an error)."""
    model = _tiny_gemma("gemma3")
    before = copy.deepcopy(model.state_dict())
    batches = [{"input_ids": torch.randint(0, 64, (2, 10)), "use_cache": True}]
    message = (r"^calibration batch 0: a block is called with a key/value cache \(\w+: DynamicCache\): the walk "
               r"runs every block more than once a batch, and each run would add to it; calibrate without one "
               r"\(model\.config\.use_cache = False, which prune_layerwise sets, and no use_cache=True or "
               r"past_key_values in the batches\)$")  # fmt: skip
    with pytest.raises(UserInputError, match=message):
        prune_layerwise(model, batches, "wanda", sparsity=0.5)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_a_batch_the_model_cannot_take_is_named_in_one_line_where_blocks_have_calls_of_their_own():
    """The calls of blocks with arguments of their own were captured before the walk's checked capture: a batch the
    model fails on (a token id past the vocabulary) raised the embedding's raw IndexError."""
    model = _tiny_gemma("gemma2")
    batches = [{"input_ids": torch.randint(0, 64, (2, 12))}, {"input_ids": torch.full((2, 6), 999)}]
    with pytest.raises(UserInputError, match=r"^calibration batch 1: the model's forward failed before the block"):
        prune_layerwise(model, batches, "wanda", sparsity=0.5)


# From a mutation review of the walk: each test below fails under a mutant that survived the suite.


def test_gemma_with_padded_batches_longer_than_its_window_prunes_as_the_rerun_walk(monkeypatch):
    """The own-calls walk keeps each batch's padding (token_mask) with its captured calls: without it, the layers after
    the first counted the padding in their Gram matrices."""
    model = _tiny_gemma("gemma2")
    rerun = copy.deepcopy(model)
    torch.manual_seed(1)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 5:] = 0  # right padding, past the sliding window of 4
    batches = [{"input_ids": torch.randint(0, 64, (2, 10)), "attention_mask": mask}]
    prune_layerwise(model, batches, "sparsegpt", sparsity=0.5)
    _rerun_walk(monkeypatch)
    prune_layerwise(rerun, batches, "sparsegpt", sparsity=0.5)
    for ours, theirs in zip(model.parameters(), rerun.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_dense_block_fit_target_is_refused_where_blocks_have_calls_of_their_own():
    model = _tiny_gemma("gemma2")
    with pytest.raises(UserInputError, match=r"^block_fit_target=dense fits each block .* arguments of their own"):
        prune_layerwise(model, [{"input_ids": torch.randint(0, 64, (2, 10))}], "wanda", sparsity=0.5,
                        block_fit_epochs=1)  # fmt: skip


class _Block16(nn.Module):
    def __init__(self, scale: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = hidden_states + torch.relu(self.fc(hidden_states))
        return out * 2 if self.scale else out


class _Tower16(nn.Module):
    """Three ``_Block16``: called by keyword, or doubling each output in place between blocks, or doubling inside."""

    def __init__(self, call: str) -> None:
        super().__init__()
        self.call = call
        self.blocks = nn.ModuleList(_Block16(scale=call == "inside") for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(hidden_states=x) if self.call == "keyword" else block(x)
            if self.call == "in place":
                x.mul_(2)
        return x


@pytest.mark.parametrize(("call", "twin"), [("keyword", "positional"), ("in place", "inside")])
def test_blocks_called_by_keyword_or_changed_in_place_between_prune_as_their_twins(call, twin):
    """A block called with hidden_states= gets the previous block's output as a positional call does; an output
    changed in place between blocks (x.mul_(2)) is seen as computed between them, as the twin's scaling inside is."""
    torch.manual_seed(0)
    model, reference = _Tower16(call), _Tower16(twin)
    reference.load_state_dict(model.state_dict())
    batches = [torch.randn(32, 16) for _ in range(2)]
    assert torch.equal(model(batches[0].clone()), reference(batches[0]))
    prune_layerwise(model, batches, "sparsegpt", sparsity=0.5)
    prune_layerwise(reference, batches, "sparsegpt", sparsity=0.5)
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_list_batch_is_positional_arguments_as_a_tuple_is():
    torch.manual_seed(0)
    model = _Tower16("positional")
    reference = copy.deepcopy(model)
    x = torch.randn(32, 16)
    prune_layerwise(model, [[x]], "wanda", sparsity=0.5)
    prune_layerwise(reference, [(x,)], "wanda", sparsity=0.5)
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)
