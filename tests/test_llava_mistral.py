"""LlavaMistralForCausalLM and MoELLaVAMistralForCausalLM: registration, loading an official Mistral folder,
upcycled MoE == dense, stage-3 save/load round trip, cached generation and left-padded batches with a sliding
window shorter than the spliced sequence (16 image tokens + text)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.constants import IMAGE_TOKEN_INDEX as IMG
from moellava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from moellava.model.language_model.llava_mistral_moe import MoELLaVAMistralConfig, MoELLaVAMistralForCausalLM
from moellava.model.language_model.mistral import MistralForCausalLM
from moellava.model.moe import MoEBlock, build_moe_settings, moe_blocks

import tiny_llava
from test_backbone_mistral import TINY as TINY_BACKBONE, official_state_dict

# Window 8 < 16 image tokens + text: the window acts on the LLaVA sequence.
TINY = dict(TINY_BACKBONE, sliding_window=8)

PROMPT = torch.tensor([[1, 5, 6, IMG, 7, 8, 9, 10]])


def write_official_folder(folder, config_dict, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    state = official_state_dict(config_dict, seed)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return state


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return tiny_llava.build_tiny_clip_tower(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral")
    write_official_folder(folder, TINY, seed=3)
    return folder


@pytest.fixture(scope="module")
def dense(backbone, tower):
    model = LlavaMistralForCausalLM.from_pretrained(backbone)
    model.get_model().initialize_vision_modules(tiny_llava.tiny_model_args(tower))
    return model.eval()


def upcycle(dense_model, **moe_kwargs):
    model = MoELLaVAMistralForCausalLM(MoELLaVAMistralConfig.from_dict(dense_model.config.to_dict()))
    model.load_state_dict(dense_model.state_dict())
    model.initialize_moe_modules(build_moe_settings(model.config.num_hidden_layers, **moe_kwargs))
    return model.eval()


def test_registration():
    assert type(AutoConfig.for_model("llava_mistral")) is LlavaMistralConfig
    assert type(AutoConfig.for_model("moe_llava_mistral")) is MoELLaVAMistralConfig
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    assert type(AutoModelForCausalLM.from_config(LlavaMistralConfig(**fields))) is LlavaMistralForCausalLM
    assert type(AutoModelForCausalLM.from_config(MoELLaVAMistralConfig(**fields))) is MoELLaVAMistralForCausalLM


@torch.no_grad()
def test_llava_starts_from_the_official_backbone_folder(tmp_path):
    state = write_official_folder(tmp_path, TINY, seed=3)
    model, info = LlavaMistralForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert model.config.model_type == "llava_mistral"
    assert (model.config.sliding_window, model.config.num_key_value_heads) == (8, 2)
    assert model.get_decoder_layers() is model.get_model().layers
    backbone = MistralForCausalLM(model.config).eval()
    backbone.load_state_dict(state)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    torch.testing.assert_close(model.eval()(ids).logits, backbone(ids).logits, rtol=0, atol=0)


@torch.no_grad()
def test_upcycled_moe_gives_the_dense_logits(dense):
    moe = upcycle(dense, num_experts=4, top_k_experts=2)
    assert [block.layer_idx for block in moe_blocks(moe)] == [0]
    pixels = tiny_llava.random_pixels(1)
    expected = dense(PROMPT, images=pixels).logits
    assert expected.shape == (1, PROMPT.shape[1] - 1 + 16, TINY["vocab_size"])
    torch.testing.assert_close(moe(PROMPT, images=pixels).logits, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_dense_and_stage3_checkpoints_round_trip(dense, tmp_path):
    pixels = tiny_llava.random_pixels(1)
    stage2 = tmp_path / "stage2"
    dense.save_pretrained(stage2)
    assert json.loads((stage2 / "config.json").read_text())["model_type"] == "llava_mistral"
    reloaded, info = AutoModelForCausalLM.from_pretrained(stage2, output_loading_info=True)
    assert type(reloaded) is LlavaMistralForCausalLM and info["missing_keys"] == []
    torch.testing.assert_close(reloaded.eval()(PROMPT, images=pixels).logits, dense(PROMPT, images=pixels).logits,
                               rtol=0, atol=0)

    model = MoELLaVAMistralForCausalLM.from_pretrained(stage2).eval()
    model.initialize_moe_modules(build_moe_settings(2, num_experts=4, moe_mode="dense", top_k_experts=2,
                                                    train_modules=["gate_proj", "up_proj", "down_proj", "wg"]))
    tiny_llava.perturb_experts(model)  # experts and routers that differ, so the round trip is meaningful
    before = model(PROMPT, images=pixels).logits
    stage3 = tmp_path / "stage3"
    model.save_pretrained(stage3)
    config = json.loads((stage3 / "config.json").read_text())
    assert config["model_type"] == "moe_llava_mistral" and config["moe"]["moe_layers_idx"] == [0, 1]
    loaded, info = AutoModelForCausalLM.from_pretrained(stage3, output_loading_info=True)
    assert type(loaded) is MoELLaVAMistralForCausalLM
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert all(isinstance(layer.mlp, MoEBlock) for layer in loaded.get_decoder_layers())
    torch.testing.assert_close(loaded.eval()(PROMPT, images=pixels).logits, before, rtol=0, atol=0)


@torch.no_grad()
def test_moe_generation_with_cache_equals_without(dense):
    moe = upcycle(dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    pixels = tiny_llava.random_pixels(1)
    kwargs = dict(images=pixels, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    cached = moe.generate(PROMPT, use_cache=True, **kwargs)
    assert cached.shape == (1, PROMPT.shape[1] + 8)
    assert torch.equal(cached, moe.generate(PROMPT, use_cache=False, **kwargs))


@torch.no_grad()
def test_left_padded_batch_generation_matches_single_prompts(dense):
    moe = upcycle(dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    prompts = [PROMPT[0], torch.tensor([1, IMG, 7, 8])]
    length = max(len(p) for p in prompts)
    ids = torch.zeros((2, length), dtype=torch.long)
    mask = torch.zeros((2, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    pixels = tiny_llava.random_pixels(2)
    kwargs = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    moe.config.tokenizer_padding_side = "left"
    try:
        batch = moe.generate(ids, attention_mask=mask, images=pixels, **kwargs)
        singles = [moe.generate(p[None], images=pixels[i:i + 1], **kwargs) for i, p in enumerate(prompts)]
    finally:
        moe.config.tokenizer_padding_side = None
    for i, single in enumerate(singles):
        assert batch[i, length:].tolist() == single[0, len(prompts[i]):].tolist()
