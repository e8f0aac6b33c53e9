"""LlavaMistralForCausalLM and MoELLaVAMistralForCausalLM: registration, loading an official Mistral folder,
upcycled MoE == dense, stage-3 save/load round trip, cached generation and left-padded batches with a sliding
window shorter than the spliced sequence (16 image tokens + text)."""

import pytest
import torch

from moellava.constants import IMAGE_TOKEN_INDEX as IMG
from moellava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from moellava.model.language_model.llava_mistral_moe import MoELLaVAMistralConfig, MoELLaVAMistralForCausalLM
from moellava.model.language_model.mistral import MistralForCausalLM
from moellava.model.moe import moe_blocks

import family_checks
import tiny_llava
from test_backbone_mistral import TINY as TINY_BACKBONE, official_state_dict

# Window 8 < 16 image tokens + text: the window acts on the LLaVA sequence.
TINY = dict(TINY_BACKBONE, sliding_window=8)

PROMPT = torch.tensor([[1, 5, 6, IMG, 7, 8, 9, 10]])


def write_official_folder(folder, config_dict, seed=0):
    return family_checks.write_official_folder(folder, config_dict, official_state_dict(config_dict, seed))


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
    return family_checks.llava_from_backbone(LlavaMistralForCausalLM, backbone, tower)


def test_registration():
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    family_checks.assert_registered(fields, ("llava_mistral", LlavaMistralConfig, LlavaMistralForCausalLM),
                                    ("moe_llava_mistral", MoELLaVAMistralConfig, MoELLaVAMistralForCausalLM))


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
    moe = family_checks.upcycle(MoELLaVAMistralForCausalLM, dense, num_experts=4, top_k_experts=2)
    assert [block.layer_idx for block in moe_blocks(moe)] == [0]
    family_checks.assert_moe_gives_dense_logits(moe, dense, PROMPT, TINY["vocab_size"])


def test_dense_and_stage3_checkpoints_round_trip(dense, tmp_path):
    family_checks.assert_dense_and_stage3_checkpoints_round_trip(
        dense, MoELLaVAMistralForCausalLM, "llava_mistral", tmp_path, PROMPT,
        train_modules=["gate_proj", "up_proj", "down_proj", "wg"], moe_layers_idx=[0, 1])


@torch.no_grad()
def test_moe_generation_with_cache_equals_without(dense):
    moe = family_checks.upcycle(MoELLaVAMistralForCausalLM, dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    family_checks.assert_cached_generation_equals_uncached(moe, PROMPT)


@torch.no_grad()
def test_left_padded_batch_generation_matches_single_prompts(dense):
    moe = family_checks.upcycle(MoELLaVAMistralForCausalLM, dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    prompts = [PROMPT[0], torch.tensor([1, IMG, 7, 8])]
    family_checks.assert_left_padded_batch_generation_matches_singles(moe, prompts)
