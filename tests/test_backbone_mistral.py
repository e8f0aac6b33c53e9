"""Mistral backbone (model_type mistral): official config fields and weight names, parity with transformers
4.31's Llama when no window applies, the sliding window, KV cache, padding, generation, gradient checkpointing,
half precision. Parity against transformers' own Mistral is checked by tools/parity/run_parity.py."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moellava.model.language_model.mistral import MistralConfig, MistralForCausalLM

import family_checks

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "official" / "mistral-7b-v0.1"

# Mistral-7B-v0.1 config.json, as published.
MISTRAL_7B_CONFIG = {
    "_name_or_path": "Hugofernandez/Mistral-7B-v0.1-colab-sharded",
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.35.2",
    "use_cache": True,
    "vocab_size": 32000,
}

# The official file with the sizes shrunk, grouped-query attention kept (4 query heads share 2 key/value heads).
TINY = dict(MISTRAL_7B_CONFIG, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)


def official_state_dict(config_dict, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config_dict["hidden_size"], config_dict["intermediate_size"], config_dict["vocab_size"]
    head_dim = hidden // config_dict["num_attention_heads"]
    q, kv = config_dict["num_attention_heads"] * head_dim, config_dict["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(config_dict["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, q),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    state = {}
    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator) * 0.15
        state[name] = 1.0 + tensor if "norm.weight" in name else tensor
    return state


def tiny_model(seed=0, **overrides):
    model = MistralForCausalLM(MistralConfig(**dict(TINY, **overrides)))
    return family_checks.randomize_parameters(model, seed)


def random_ids(shape, seed=1):
    return torch.randint(3, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def llama_twin(model):
    """transformers 4.31 Llama with the same weights: Mistral without a window is exactly Llama with GQA."""
    config = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
    ))
    # 4.31's Llama also stores its rotary inv_freq buffer; it computes that itself.
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == [] and all(name.endswith("rotary_emb.inv_freq") for name in missing)
    return llama.eval()


# ----------------------------------------------------------------------------------------------- config


def test_embedded_config_and_keys_equal_the_official_files():
    if not OFFICIAL.exists():
        pytest.skip(f"{OFFICIAL} is not available (../shared/reference beside the repository)")
    assert json.loads((OFFICIAL / "config.json").read_text()) == MISTRAL_7B_CONFIG
    index = json.loads((OFFICIAL / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == family_checks.llama_layout_keys(MISTRAL_7B_CONFIG["num_hidden_layers"])


def test_official_config_loads_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MistralConfig
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 32000)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert (config.sliding_window, config.rms_norm_eps, config.rope_theta) == (4096, 1e-5, 10000.0)
    assert config.max_position_embeddings == 32768 and config.tie_word_embeddings is False


@pytest.mark.parametrize("fields, message", [
    (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(sliding_window=0), "sliding_window=0 must be a positive number of tokens"),
    (dict(head_dim=15), "head_dim=15 must be even"),
])
def test_bad_config_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        MistralConfig(**dict(TINY, **fields))


# ----------------------------------------------------------------------------------------------- weights


def test_state_dict_keys_are_the_official_names():
    model = MistralForCausalLM(MistralConfig(**TINY))
    assert set(model.state_dict()) == family_checks.llama_layout_keys(TINY["num_hidden_layers"])
    assert model.get_decoder_layers() is model.model.layers
    assert model.get_input_embeddings() is model.model.embed_tokens


def test_from_pretrained_loads_the_official_layout(tmp_path):
    state = family_checks.write_official_folder(tmp_path, TINY, official_state_dict(TINY))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is MistralForCausalLM
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


@torch.no_grad()
def test_a_stored_rotary_buffer_is_ignored(tmp_path):
    state = official_state_dict(TINY)
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    family_checks.write_official_folder(tmp_path, TINY, state)
    model, info = MistralForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" not in model.state_dict()


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    reloaded = MistralForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids((2, 7))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- forward


@torch.no_grad()
@pytest.mark.parametrize("sliding_window", [None, 12])
def test_matches_transformers_llama_when_no_window_applies(sliding_window):
    model = tiny_model(sliding_window=sliding_window)
    llama = llama_twin(model)
    ids = random_ids((2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ours, theirs = model(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


@torch.no_grad()
def test_sliding_window_attends_to_the_last_window_tokens():
    window = 3
    model = tiny_model(sliding_window=window)
    ids = random_ids((1, 10))
    attentions = model(ids, output_attentions=True).attentions
    query, key = torch.arange(10)[:, None], torch.arange(10)[None, :]
    visible = (key <= query) & (key > query - window)
    for probs in attentions:
        assert probs.shape == (1, 4, 10, 10)
        assert torch.all(probs[..., ~visible] == 0)
        assert torch.all(probs[..., visible] > 0)
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 10))


@torch.no_grad()
def test_sliding_window_bounds_the_receptive_field():
    # With L layers and window W, the output at t depends on tokens t - L * (W - 1) .. t only.
    window, layers = 3, TINY["num_hidden_layers"]
    model = tiny_model(sliding_window=window)
    ids = random_ids((1, 12))
    t = 11
    first_seen = t - layers * (window - 1)
    base = model(ids).logits[0, t]
    outside, inside = ids.clone(), ids.clone()
    outside[0, first_seen - 1] = (ids[0, first_seen - 1] + 1) % TINY["vocab_size"]
    inside[0, first_seen] = (ids[0, first_seen] + 1) % TINY["vocab_size"]
    torch.testing.assert_close(model(outside).logits[0, t], base, rtol=0, atol=1e-6)
    assert (model(inside).logits[0, t] - base).abs().max() > 1e-3
    # Without a window every earlier token matters.
    no_window = tiny_model(sliding_window=None)
    assert (no_window(outside).logits[0, t] - no_window(ids).logits[0, t]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("sliding_window", [4096, 4])
def test_kv_cache_matches_full_forward(sliding_window):
    model = tiny_model(sliding_window=sliding_window)
    ids = random_ids((2, 12))
    mask = torch.ones_like(ids)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    steps, _ = family_checks.logits_through_cache(model, ids, [1] * ids.shape[1])
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    chunks, past = family_checks.logits_through_cache(model, ids, [5, 4, 3])
    torch.testing.assert_close(chunks, full, rtol=0, atol=1e-5)
    # Grouped-query cache: key/value heads, not query heads.
    assert len(past) == TINY["num_hidden_layers"]
    assert past[0][0].shape == past[0][1].shape == (2, 2, 12, 16)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("sliding_window", [4096, 4])
def test_padded_batch_matches_each_sample_alone(side, sliding_window):
    model = tiny_model(sliding_window=sliding_window)
    samples = [random_ids((9,), seed=2), random_ids((5,), seed=3), random_ids((7,), seed=4)]
    ids, mask = family_checks.pad_batch(samples, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, attention_mask=mask, position_ids=positions).logits
    for row, sample in enumerate(samples):
        alone = model(sample[None]).logits[0]
        torch.testing.assert_close(batch[row][mask[row].bool()], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_greedy_generation_of_a_left_padded_batch_matches_each_prompt_alone():
    model = tiny_model(sliding_window=4)
    prompts = [random_ids((8,), seed=5), random_ids((4,), seed=6)]
    ids, mask = family_checks.pad_batch(prompts, "left")
    # No end-of-sequence stop, so every sequence gets 6 new tokens. (4.31 ignores eos_token_id=None passed to
    # generate() and rebuilds the generation config from the model config, hence both.)
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    batch = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, 8:]
    assert batch.shape == (2, 6)
    for row, prompt in enumerate(prompts):
        alone = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt)), **kwargs)
        assert torch.equal(batch[row], alone[0, len(prompt):])
    seq = family_checks.greedy_by_full_forwards(model, prompts[0][None], 6)
    assert torch.equal(batch[0], seq[0, 8:])


@torch.no_grad()
def test_explicit_head_dim():
    # Mistral-Nemo style: heads * head_dim != hidden_size.
    model = tiny_model(head_dim=32)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (128, 64) and attn.k_proj.weight.shape == (64, 64)
    assert attn.o_proj.weight.shape == (64, 128)
    ids = random_ids((1, 6))
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    assert out.past_key_values[0][0].shape == (1, 2, 4, 32)
    step = model(ids[:, 4:], past_key_values=out.past_key_values).logits
    torch.testing.assert_close(torch.cat([out.logits, step], dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_replacing_mlp_is_all_a_moe_conversion_needs():
    family_checks.assert_mlp_is_the_only_ffn(tiny_model(), random_ids((2, 6)), TINY["num_hidden_layers"])


@torch.no_grad()
def test_inputs_embeds_equal_input_ids():
    model = tiny_model()
    ids = random_ids((2, 6))
    torch.testing.assert_close(model(inputs_embeds=model.get_input_embeddings()(ids)).logits, model(ids).logits)


# ----------------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    model = tiny_model(sliding_window=4).train()
    ids = random_ids((2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    family_checks.assert_gradient_checkpointing_changes_nothing(model, ids, labels)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_fp32(dtype):
    model = tiny_model(sliding_window=4)
    family_checks.assert_half_precision_forward_close(model, random_ids((2, 8)), dtype)
