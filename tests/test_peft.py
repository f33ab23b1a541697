"""LoRA adapters (peft) on a model pruned one-shot: the adapters are named wherever targets would take them,
an adapters-only save is refused by the export, and the documented recipe (train the adapters, merge them,
``hard_prune`` again) keeps the pattern."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import constrainedsparse as cs
from constrainedsparse.export import export_compressed, load_compressed_model

ADAPTERS = r"the targets hold 4 weights of PEFT adapters \(.*q_proj\.lora_A\.default\.weight, .*q_proj\.lora_B\.defa"


def _pruned_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (4, 16))
    cs.prune_layerwise(model, [{"input_ids": ids}], "magnitude", pattern="2:4")
    return model, ids


def _lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_targets_and_prune_layerwise_name_the_adapters_they_would_prune():
    # Pruned as any Linear: lora_B (zeros) then got an empty mask and never trained, merged weights stayed dense.
    model, ids = _pruned_llama()
    lora = _lora(model)
    with pytest.warns(
        UserWarning, match="^" + ADAPTERS + r".*\(Targets\(exclude=\['\*\.lora_A\.\*', '\*\.lora_B\.\*'\]\)\)$"
    ):
        targets = cs.Targets(exclude=["*lm_head*"]).resolve(lora, cs.SparsityConfig(pattern="2:4"))
    assert sum(".lora_" in t.name for t in targets) == 4
    with pytest.raises(ValueError, match=r"^apply_masks\(targets, masks\): the mask of .*q_proj\.lora_B\.default\.w"):
        cs.apply_masks(targets, {t.name: t.tensor != 0 for t in targets})
    assert not any(torch.nn.utils.parametrize.is_parametrized(t.module) for t in targets)  # nothing applied
    with pytest.warns(UserWarning, match=ADAPTERS):
        cs.prune_layerwise(lora, [{"input_ids": ids}], "magnitude", pattern="2:4", targets=cs.Targets())
    base = cs.Targets(exclude=["*lm_head*", "*lora_*"]).resolve(lora, cs.SparsityConfig(pattern="2:4"))
    assert len(base) == 7 and sum(".base_layer." in t.name for t in base) == 2  # q_proj's and v_proj's


def test_apply_masks_refuses_a_mask_that_keeps_nothing_unless_allowed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    targets = cs.Targets().resolve(model, cs.SparsityConfig(0.5))
    empty = {"0.weight": torch.zeros(4, 4, dtype=torch.bool), "1.weight": torch.ones(2, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"^apply_masks\(targets, masks\): the mask of 0\.weight keeps no weight \("):
        cs.apply_masks(targets, empty)
    assert not cs.masks.parametrized(model)
    cs.apply_masks(targets, empty, allow_empty=True)
    assert not model[0].weight.any() and model[1].weight.all()


def test_the_lora_recipe_keeps_the_pattern_and_the_export_refuses_adapters_alone(tmp_path):
    model, ids = _pruned_llama()
    targets = cs.Targets(exclude=["lm_head.*"]).resolve(model, cs.SparsityConfig(pattern="2:4"))
    masks = {t.name: t.tensor != 0 for t in targets}  # before the adapters: the base model's names
    lora = _lora(model)
    with pytest.raises(ValueError, match=r"^the model carries PEFT adapters \(save_pretrained would write them only"):
        export_compressed(lora, to=tmp_path / "export")
    lora.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"'.*adapter' holds PEFT adapters only \(adapter_config\.json\): merge_and"):
        export_compressed(tmp_path / "adapter", to=tmp_path / "export")
    assert not (tmp_path / "export").exists()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        lora(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    merged = lora.merge_and_unload()
    merged.peft_config = lora.peft_config  # peft releases before 2026 left it on the merged model: no adapter now
    q = merged.model.layers[0].self_attn.q_proj.weight
    assert (q != before).float().mean() > 0.9  # the merge wrote the adapters' dense product
    cs.hard_prune(targets, masks)  # the targets' modules are the merged model's
    assert torch.equal(q != 0, masks["model.layers.0.self_attn.q_proj.weight"]) and not torch.equal(q, before)
    report = export_compressed(merged, to=tmp_path / "export")
    assert report["format"] == "sparse-24-bitmask" and len(report["layers"]) == 7
    reloaded = load_compressed_model(tmp_path / "export")
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, q)
