"""LlavaStablelmForCausalLM and MoELLaVAStablelmForCausalLM: registration, loading an official StableLM-2 folder
(both config formats), upcycled MoE == dense, stage-3 save/load round trip, cached generation, and the field
names of the published MoE-LLaVA-StableLM config."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.constants import IMAGE_TOKEN_INDEX as IMG
from moellava.model.language_model.llava_stablelm import LlavaStablelmConfig, LlavaStablelmForCausalLM
from moellava.model.language_model.llava_stablelm_moe import MoELLaVAStablelmConfig, MoELLaVAStablelmForCausalLM
from moellava.model.language_model.stablelm import StableLmForCausalLM
from moellava.model.moe import MoEBlock, moe_blocks

import family_checks
import published_layout
import tiny_llava
from test_backbone_stablelm import TINY, TINY_EPOCH, write_official_folder

PROMPT = torch.tensor([[1, 5, 6, IMG, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return tiny_llava.build_tiny_clip_tower(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stablelm")
    write_official_folder(folder, TINY, seed=3)
    return folder


@pytest.fixture(scope="module")
def dense(backbone, tower):
    return family_checks.llava_from_backbone(LlavaStablelmForCausalLM, backbone, tower)


def test_registration():
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    family_checks.assert_registered(fields, ("llava_stablelm", LlavaStablelmConfig, LlavaStablelmForCausalLM),
                                    ("moe_llava_stablelm", MoELLaVAStablelmConfig, MoELLaVAStablelmForCausalLM))


@torch.no_grad()
@pytest.mark.parametrize("config_dict", [TINY, TINY_EPOCH], ids=["stablelm", "stablelm_epoch"])
def test_llava_starts_from_the_official_backbone_folder(tmp_path, config_dict):
    state = write_official_folder(tmp_path, config_dict, seed=3)
    model, info = LlavaStablelmForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert model.config.model_type == "llava_stablelm"
    assert model.config.layer_norm_eps == 1e-5 and model.config.partial_rotary_factor == 0.25
    assert model.get_decoder_layers() is model.get_model().layers
    backbone = StableLmForCausalLM(model.config).eval()
    backbone.load_state_dict(state)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(model.eval()(ids).logits, backbone(ids).logits, rtol=0, atol=0)


@torch.no_grad()
def test_upcycled_moe_gives_the_dense_logits(dense):
    moe = family_checks.upcycle(MoELLaVAStablelmForCausalLM, dense, num_experts=4, top_k_experts=2)
    assert [block.layer_idx for block in moe_blocks(moe)] == [0]
    family_checks.assert_moe_gives_dense_logits(moe, dense, PROMPT, TINY["vocab_size"])


def test_dense_and_stage3_checkpoints_round_trip(dense, tmp_path):
    family_checks.assert_dense_and_stage3_checkpoints_round_trip(
        dense, MoELLaVAStablelmForCausalLM, "llava_stablelm", tmp_path, PROMPT,
        train_modules=["gate_proj", "up_proj", "down_proj", "wg"], moe_layers_idx=[0, 1])


@torch.no_grad()
def test_moe_generation_with_cache_equals_without(dense):
    moe = family_checks.upcycle(MoELLaVAStablelmForCausalLM, dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    family_checks.assert_cached_generation_equals_uncached(moe, PROMPT)


def test_published_moe_llava_stablelm_config_fields_load():
    # LanguageBind/MoE-LLaVA-StableLM-1.6B-4e's config.json (stablelm_epoch names, the `moe` dict), sizes
    # shrunk; without a tower here (the published one names a hub tower).
    fields = published_layout.published_config("stablelm", tower=None, pad_token_id=3)
    config = AutoConfig.for_model(**fields)
    assert type(config) is MoELLaVAStablelmConfig
    assert (config.layer_norm_eps, config.partial_rotary_factor, config.num_attention_heads) == (1e-5, 0.25, 4)
    model = AutoModelForCausalLM.from_config(config)
    layers = model.get_decoder_layers()
    assert isinstance(layers[0].mlp, MoEBlock) and not isinstance(layers[1].mlp, MoEBlock)
    assert layers[0].mlp.num_experts == 4
