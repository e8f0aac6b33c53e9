"""LlavaPhiForCausalLM and MoELLaVAPhiForCausalLM: registration, loading an official phi-2 folder (official weight
names and the biased lm_head kept: the original dropped lm_head.bias), upcycled MoE == dense (top-1 and top-2),
dense and stage-3 round trips through load_pretrained_model, cached and left-padded generation, the published
MoE-LLaVA-Phi2 config fields and weight names, and the family's default train_modules (the image tower's own
fc1/fc2 stay frozen)."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.constants import IMAGE_TOKEN_INDEX as IMG
from moellava.model.builder import load_pretrained_model
from moellava.model.language_model.llava_phi import LlavaPhiConfig, LlavaPhiForCausalLM
from moellava.model.language_model.llava_phi_moe import MoELLaVAPhiConfig, MoELLaVAPhiForCausalLM
from moellava.model.language_model.phi import PhiForCausalLM
from moellava.model.moe import MoEBlock, build_moe_settings, freeze_for_moe_training, moe_blocks
from moellava.tokenization import FAMILIES, load_tokenizer
from moellava.train.train import set_trainable

import family_checks
import published_layout
import tiny_llava
from test_backbone_phi import TINY as TINY_BACKBONE, write_official_checkpoint
from test_llava_llama import saturate_routers

# Vocabulary large enough for the toy phi tokenizer (552 tokens with the added unk <|extra_0|>).
TINY = dict(TINY_BACKBONE, vocab_size=640)

PROMPT = torch.tensor([[1, 5, 6, IMG, 7, 8, 9, 10]])
PHI_TRAIN_MODULES = list(FAMILIES["phi"].train_modules)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return tiny_llava.build_tiny_clip_tower(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi")
    write_official_checkpoint(folder, TINY, seed=3)
    return folder


@pytest.fixture(scope="module")
def dense(backbone, tower):
    return family_checks.llava_from_backbone(LlavaPhiForCausalLM, backbone, tower)


def test_registration():
    fields = {k: v for k, v in TINY.items() if k not in ("model_type", "auto_map")}
    family_checks.assert_registered(fields, ("llava_phi", LlavaPhiConfig, LlavaPhiForCausalLM),
                                    ("moe_llava_phi", MoELLaVAPhiConfig, MoELLaVAPhiForCausalLM))


@torch.no_grad()
def test_llava_starts_from_the_official_backbone_folder(tmp_path):
    state = write_official_checkpoint(tmp_path, TINY, seed=3)
    model, info = LlavaPhiForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert model.config.model_type == "llava_phi" and model.config.partial_rotary_factor == 0.4
    assert set(model.state_dict()) == set(state)  # official names: model.layers.N..., lm_head.{weight,bias}
    assert model.get_decoder_layers() is model.get_model().layers and model.get_model() is model.model
    # phi-2's trained lm_head bias is loaded (random and non-zero here), not dropped.
    assert torch.equal(model.lm_head.bias, state["lm_head.bias"]) and state["lm_head.bias"].abs().sum() > 0
    backbone = PhiForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    torch.testing.assert_close(model.eval()(ids, attention_mask=mask).logits,
                               backbone(ids, attention_mask=mask).logits, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_moe_gives_the_dense_logits(dense, top_k):
    moe = family_checks.upcycle(MoELLaVAPhiForCausalLM, dense, num_experts=4, top_k_experts=top_k)
    assert [block.layer_idx for block in moe_blocks(moe)] == [0, 2]
    assert all(block.backend == "native" for block in moe_blocks(moe))
    if top_k == 1:
        saturate_routers(moe)  # a top-1 output is scaled by its router probability: make it 1
    family_checks.assert_moe_gives_dense_logits(moe, dense, PROMPT, TINY["vocab_size"])


def save_with_tokenizer(model, folder, toy_tokenizer_dir):
    # As train() saves a checkpoint: the tokenizer after the phi rules (unk <|extra_0|> added) beside the model.
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(toy_tokenizer_dir("phi")).save_pretrained(folder)


@torch.no_grad()
def test_dense_and_stage3_checkpoints_round_trip(dense, tmp_path, toy_tokenizer_dir):
    pixels = tiny_llava.random_pixels(1)
    stage2 = tmp_path / "stage2"
    save_with_tokenizer(dense, stage2, toy_tokenizer_dir)
    assert json.loads((stage2 / "config.json").read_text())["model_type"] == "llava_phi"
    tokenizer, reloaded, processor, _ = load_pretrained_model(str(stage2))
    assert type(reloaded) is LlavaPhiForCausalLM and processor["image"] is not None
    assert tokenizer.pad_token == "<|extra_0|>"
    torch.testing.assert_close(reloaded(PROMPT, images=pixels).logits, dense(PROMPT, images=pixels).logits,
                               rtol=0, atol=0)

    model = MoELLaVAPhiForCausalLM.from_pretrained(stage2).eval()
    model.initialize_moe_modules(build_moe_settings(3, num_experts=4, moe_mode="dense", top_k_experts=2,
                                                    train_modules=PHI_TRAIN_MODULES))
    tiny_llava.perturb_experts(model)  # experts and routers that differ, so the round trip is meaningful
    model.lm_head.bias.add_(1.0)  # a bias that differs from the stage-2 one must survive the round trip
    before = model(PROMPT, images=pixels).logits
    stage3 = tmp_path / "stage3"
    save_with_tokenizer(model, stage3, toy_tokenizer_dir)
    config = json.loads((stage3 / "config.json").read_text())
    assert config["model_type"] == "moe_llava_phi" and config["moe"]["moe_layers_idx"] == [0, 1, 2]
    with safe_open(str(stage3 / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("lm_head.bias"), model.lm_head.bias)
    _, info = AutoModelForCausalLM.from_pretrained(stage3, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    _, loaded, _, _ = load_pretrained_model(str(stage3))
    assert type(loaded) is MoELLaVAPhiForCausalLM
    assert all(isinstance(layer.mlp, MoEBlock) for layer in loaded.get_decoder_layers())
    assert torch.equal(loaded.lm_head.bias, model.lm_head.bias)
    torch.testing.assert_close(loaded(PROMPT, images=pixels).logits, before, rtol=0, atol=0)


def test_lm_head_bias_follows_the_stored_tensors(dense, tmp_path, toy_tokenizer_dir):
    folder = tmp_path / "stage2"
    save_with_tokenizer(dense, folder, toy_tokenizer_dir)
    config = json.loads((folder / "config.json").read_text())
    assert config["lm_head_bias"] is True
    del config["lm_head_bias"]  # a config that does not say: the stored tensors decide
    (folder / "config.json").write_text(json.dumps(config))
    _, model, _, _ = load_pretrained_model(str(folder))
    assert model.config.lm_head_bias is True and torch.equal(model.lm_head.bias, dense.lm_head.bias)

    # A config that says there is a bias, over weights without one, is a broken checkpoint.
    (folder / "config.json").write_text(json.dumps({**config, "lm_head_bias": True}))
    weights = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items() if k != "lm_head.bias"}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights for \['lm_head.bias'\]"):
        load_pretrained_model(str(folder))


@torch.no_grad()
def test_moe_generation_with_cache_equals_without(dense):
    moe = family_checks.upcycle(MoELLaVAPhiForCausalLM, dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    family_checks.assert_cached_generation_equals_uncached(moe, PROMPT)


@torch.no_grad()
def test_left_padded_batch_generation_matches_single_prompts(dense):
    moe = family_checks.upcycle(MoELLaVAPhiForCausalLM, dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    prompts = [PROMPT[0], torch.tensor([1, IMG, 7, 8])]
    family_checks.assert_left_padded_batch_generation_matches_singles(moe, prompts)


def test_published_moe_llava_phi_config_fields_load(tmp_path):
    # LanguageBind/MoE-LLaVA-Phi2-2.7B-4e-384's config.json, sizes shrunk. Like the published file it only
    # names the tower (here a tiny local SigLIP), not the tower configs.
    tower = tiny_llava.build_tiny_siglip_tower(tmp_path / "siglip")
    fields = published_layout.published_config("phi", tower=tower)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MoELLaVAPhiConfig
    assert (config.partial_rotary_factor, config.bos_token_id, config.eos_token_id) == (0.4, None, None)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is MoELLaVAPhiForCausalLM
    layers = model.get_decoder_layers()
    assert [isinstance(layer.mlp, MoEBlock) for layer in layers] == [True, False, True]
    assert layers[0].mlp.num_experts == 4 and layers[0].mlp.top_k == 2
    names = set(model.state_dict())
    expected = {
        "model.layers.0.mlp.deepspeed_moe.gate.wg.weight",
        "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc1.bias",
        "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc2.weight",
        "model.layers.1.mlp.fc1.weight",
        "model.mm_projector.image_spatial_proj.2.weight",
        "model.image_tower.image_tower.vision_model.embeddings.patch_embedding.weight",
        "lm_head.weight",
    }
    assert expected <= names and "model.layers.0.mlp.fc1.weight" not in names
    ids = torch.tensor([[1, IMG, 7, 8]])
    with torch.no_grad():  # the original's SigLIP features: the first of the 16 patches dropped
        assert model.eval()(ids, images=tiny_llava.random_pixels(1)).logits.shape == (1, 3 + 15, 128)


def test_family_train_modules_freeze_ffns_and_routers_only(dense):
    moe = family_checks.upcycle(MoELLaVAPhiForCausalLM, dense, num_experts=4, top_k_experts=2)
    llm_ffn = {name for name, _ in moe.named_parameters() if name.startswith("model.layers.") and ".mlp." in name}
    projector = {name for name, _ in moe.named_parameters() if name.startswith("model.mm_projector.")}
    tower = {name for name, _ in moe.named_parameters() if name.startswith("model.image_tower.")}
    tower_ffn = {name for name in tower if ".fc1." in name or ".fc2." in name}
    assert tower_ffn  # CLIP's MLPs are named fc1/fc2 too

    trainable = set(freeze_for_moe_training(moe, PHI_TRAIN_MODULES))
    # Every FFN weight of the LLM trains (experts and the dense FFN of layer 1), every router trains.
    assert trainable - tower == llm_ffn
    assert "model.layers.0.mlp.deepspeed_moe.gate.wg.weight" in trainable
    assert not any(".self_attn." in name or name.startswith("lm_head") for name in trainable)

    # The stage-3 training settings: the projector trains too (as in MoE-LLaVA), the tower's fc1/fc2,
    # which the substring "fc1"/"fc2" also matches, are frozen again with the rest of the tower.
    model_args = SimpleNamespace(moe_enable=True, tune_mm_mlp_adapter=False, freeze_backbone=False,
                                 mm_use_im_start_end=False)
    set_trainable(moe, model_args, SimpleNamespace(freeze_mm_mlp_adapter=False), PHI_TRAIN_MODULES)
    now = {name for name, p in moe.named_parameters() if p.requires_grad}
    assert projector and now == llm_ffn | projector
