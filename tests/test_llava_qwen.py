"""LlavaQWenForCausalLM and MoELLaVAQWenForCausalLM: registration, loading an official QWen v1 folder (official
weight names kept), upcycled MoE == dense (top-1 and top-2), dense and stage-3 round trips through
load_pretrained_model, cached and left-padded generation, the published MoE-LLaVA-Qwen config fields and weight
names, and the family's default train_modules."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.constants import IMAGE_TOKEN_INDEX as IMG
from moellava.model.builder import load_pretrained_model
from moellava.model.language_model.llava_qwen import LlavaQWenConfig, LlavaQWenForCausalLM
from moellava.model.language_model.llava_qwen_moe import MoELLaVAQWenConfig, MoELLaVAQWenForCausalLM
from moellava.model.language_model.qwen import QWenLMHeadModel
from moellava.model.moe import MoEBlock, build_moe_settings, freeze_for_moe_training, moe_blocks
from moellava.tokenization import FAMILIES, load_tokenizer
from moellava.train.train import set_trainable

import family_checks
import published_layout
import tiny_llava
from test_backbone_qwen import TINY as TINY_BACKBONE, write_official_checkpoint
from test_llava_llama import saturate_routers

# Vocabulary large enough for the toy QWen tokenizer (720 tokens); seq_length above every length used here,
# so dynamic NTK and log-n attention (eval mode, beyond seq_length) stay off.
TINY = dict(TINY_BACKBONE, vocab_size=768, seq_length=64)

PROMPT = torch.tensor([[1, 5, 6, IMG, 7, 8, 9, 10]])
QWEN_TRAIN_MODULES = list(FAMILIES["qwen"].train_modules)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return tiny_llava.build_tiny_clip_tower(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    write_official_checkpoint(folder, TINY, seed=3)
    return folder


@pytest.fixture(scope="module")
def dense(backbone, tower):
    return family_checks.llava_from_backbone(LlavaQWenForCausalLM, backbone, tower)


def test_registration():
    fields = {k: v for k, v in TINY.items() if k not in ("model_type", "auto_map")}
    family_checks.assert_registered(fields, ("llava_qwen", LlavaQWenConfig, LlavaQWenForCausalLM),
                                    ("moe_llava_qwen", MoELLaVAQWenConfig, MoELLaVAQWenForCausalLM))


@torch.no_grad()
def test_llava_starts_from_the_official_backbone_folder(tmp_path):
    state = write_official_checkpoint(tmp_path, TINY, seed=3)
    model, info = LlavaQWenForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert model.config.model_type == "llava_qwen"
    assert set(model.state_dict()) == set(state)  # official names: transformer.wte, transformer.h.N..., lm_head
    assert model.get_decoder_layers() is model.get_model().h and model.get_model() is model.transformer
    backbone = QWenLMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    torch.testing.assert_close(model.eval()(ids, attention_mask=mask).logits,
                               backbone(ids, attention_mask=mask).logits, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_moe_gives_the_dense_logits(dense, top_k):
    moe = family_checks.upcycle(MoELLaVAQWenForCausalLM, dense, num_experts=4, top_k_experts=top_k)
    assert [block.layer_idx for block in moe_blocks(moe)] == [0, 2]
    assert all(block.backend == "native" for block in moe_blocks(moe))
    if top_k == 1:
        saturate_routers(moe)  # a top-1 output is scaled by its router probability: make it 1
    family_checks.assert_moe_gives_dense_logits(moe, dense, PROMPT, TINY["vocab_size"])


def save_with_tokenizer(model, folder, toy_tokenizer_dir):
    model.save_pretrained(folder)
    load_tokenizer(toy_tokenizer_dir("qwen")).save_pretrained(folder)


@torch.no_grad()
def test_dense_and_stage3_checkpoints_round_trip(dense, tmp_path, toy_tokenizer_dir):
    pixels = tiny_llava.random_pixels(1)
    stage2 = tmp_path / "stage2"
    save_with_tokenizer(dense, stage2, toy_tokenizer_dir)
    assert json.loads((stage2 / "config.json").read_text())["model_type"] == "llava_qwen"
    tokenizer, reloaded, processor, _ = load_pretrained_model(str(stage2))
    assert type(reloaded) is LlavaQWenForCausalLM and processor["image"] is not None
    assert type(tokenizer).__name__ == "QWenTokenizer" and tokenizer.pad_token == "<|extra_0|>"
    torch.testing.assert_close(reloaded(PROMPT, images=pixels).logits, dense(PROMPT, images=pixels).logits,
                               rtol=0, atol=0)

    model = MoELLaVAQWenForCausalLM.from_pretrained(stage2).eval()
    model.initialize_moe_modules(build_moe_settings(3, num_experts=4, moe_mode="dense", top_k_experts=2,
                                                    train_modules=QWEN_TRAIN_MODULES))
    tiny_llava.perturb_experts(model)  # experts and routers that differ, so the round trip is meaningful
    before = model(PROMPT, images=pixels).logits
    stage3 = tmp_path / "stage3"
    save_with_tokenizer(model, stage3, toy_tokenizer_dir)
    config = json.loads((stage3 / "config.json").read_text())
    assert config["model_type"] == "moe_llava_qwen" and config["moe"]["moe_layers_idx"] == [0, 1, 2]
    _, info = AutoModelForCausalLM.from_pretrained(stage3, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    _, loaded, _, _ = load_pretrained_model(str(stage3))
    assert type(loaded) is MoELLaVAQWenForCausalLM
    assert all(isinstance(layer.mlp, MoEBlock) for layer in loaded.get_decoder_layers())
    torch.testing.assert_close(loaded(PROMPT, images=pixels).logits, before, rtol=0, atol=0)


@torch.no_grad()
def test_moe_generation_with_cache_equals_without(dense):
    moe = family_checks.upcycle(MoELLaVAQWenForCausalLM, dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    family_checks.assert_cached_generation_equals_uncached(moe, PROMPT)


@torch.no_grad()
def test_left_padded_batch_generation_matches_single_prompts(dense):
    moe = family_checks.upcycle(MoELLaVAQWenForCausalLM, dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    prompts = [PROMPT[0], torch.tensor([1, IMG, 7, 8])]
    family_checks.assert_left_padded_batch_generation_matches_singles(moe, prompts)


def test_published_moe_llava_qwen_config_fields_load(tower, tmp_path):
    # LanguageBind/MoE-LLaVA-Qwen-1.8B-4e's config.json, sizes shrunk. Like the published file it only names
    # the tower (here the tiny local one), without the tower configs this project adds.
    fields = published_layout.published_config("qwen", tower=tower)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MoELLaVAQWenConfig and config.bf16 is True and config.layer_norm_epsilon == 1e-6
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is MoELLaVAQWenForCausalLM
    layers = model.get_decoder_layers()
    assert [isinstance(layer.mlp, MoEBlock) for layer in layers] == [True, False, True]
    assert layers[0].mlp.num_experts == 4 and layers[0].mlp.top_k == 2
    # The published checkpoints' weight names.
    names = set(model.state_dict())
    expected = {
        "transformer.h.0.mlp.deepspeed_moe.gate.wg.weight",
        "transformer.h.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.w1.weight",
        "transformer.h.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.c_proj.weight",
        "transformer.h.1.mlp.w2.weight",
        "transformer.mm_projector.image_spatial_proj.2.weight",
        "transformer.image_tower.image_tower.vision_model.embeddings.patch_embedding.weight",
    }
    assert expected <= names and "transformer.h.0.mlp.w1.weight" not in names
    ids = torch.tensor([[1, IMG, 7, 8]])
    with torch.no_grad():
        assert model.eval()(ids, images=tiny_llava.random_pixels(1)).logits.shape == (1, 3 + 16, 128)


def test_family_train_modules_freeze_ffns_and_routers_only(dense):
    moe = family_checks.upcycle(MoELLaVAQWenForCausalLM, dense, num_experts=4, top_k_experts=2)
    trainable = set(freeze_for_moe_training(moe, QWEN_TRAIN_MODULES))
    assert trainable == {name for name, p in moe.named_parameters() if p.requires_grad}
    # Every FFN weight trains (experts and the dense FFN of layer 1, as the original's substring match did),
    # every router trains; the attention output projection c_proj does not, nor anything else.
    expected = {name for name, _ in moe.named_parameters()
                if ".mlp." in name and name.startswith("transformer.h.")}
    assert trainable == expected
    assert "transformer.h.0.mlp.deepspeed_moe.gate.wg.weight" in trainable
    assert "transformer.h.1.mlp.c_proj.weight" in trainable
    assert not any("attn.c_proj" in name for name in trainable)

    # The stage-3 training settings: the projector trains too (as in MoE-LLaVA), the tower stays frozen.
    model_args = SimpleNamespace(moe_enable=True, tune_mm_mlp_adapter=False, freeze_backbone=False,
                                 mm_use_im_start_end=False)
    set_trainable(moe, model_args, SimpleNamespace(freeze_mm_mlp_adapter=False), QWEN_TRAIN_MODULES)
    now = {name for name, p in moe.named_parameters() if p.requires_grad}
    projector = {name for name, _ in moe.named_parameters() if name.startswith("transformer.mm_projector.")}
    assert projector and now == expected | projector


def test_stage3_checkpoint_keeps_the_official_backbone_names(dense, tmp_path):
    moe = family_checks.upcycle(MoELLaVAQWenForCausalLM, dense, num_experts=4, moe_mode="sparse", top_k_experts=2)
    moe.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight",
            "transformer.h.1.attn.c_attn.bias", "transformer.h.1.mlp.w1.weight",
            "transformer.h.2.mlp.deepspeed_moe.experts.deepspeed_experts.0.w2.weight"} <= keys
    assert not any(key.startswith("model.") for key in keys)
