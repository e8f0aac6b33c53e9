"""Llama backbone (model_type llama, moellava.model.language_model.llama): the official config and weight names
load unchanged, and the logits equal transformers 4.31's own LlamaForCausalLM (< 1e-5 in fp32) for a plain
batch, left- and right-padded batches, cached decoding, grouped-query attention, linear and dynamic rope
scaling and pretraining_tp; greedy generation, gradient checkpointing, half precision; LLaVA-Llama
checkpoints written on transformers' Llama load into it with the same names."""

import json

import pytest
import torch
import transformers

from moellava.model import LlavaLlamaConfig, LlavaLlamaForCausalLM
from moellava.model.language_model.llama import LlamaConfig, LlamaForCausalLM

import family_checks
import tiny_llava

# lmsys/vicuna-7b-v1.5 config.json, as published (written by transformers 4.31).
VICUNA_7B_V15_CONFIG = {
    "_name_or_path": "vicuna-7b-v1.5",
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0",
    "use_cache": True,
    "vocab_size": 32000,
}

# The official file with the sizes shrunk; 4 query heads share 2 key/value heads (Llama-2-70B style GQA).
TINY = dict(VICUNA_7B_V15_CONFIG, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=128, max_position_embeddings=64, torch_dtype="float32")


def reference_model(seed=0, **overrides):
    """transformers 4.31's LlamaForCausalLM with every parameter random (norms around 1)."""
    config = transformers.LlamaConfig(**{k: v for k, v in dict(TINY, **overrides).items() if k != "architectures"})
    model = transformers.LlamaForCausalLM(config)
    return family_checks.randomize_parameters(model, seed)


def ours_from(reference, tmp_path):
    """Our model loaded from the folder transformers' model saves (its official layout)."""
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = reference_model()
    return ours_from(reference, tmp_path_factory.mktemp("llama")), reference


def random_ids(shape, seed=1):
    return torch.randint(3, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def assert_parity(ours, theirs, **inputs):
    with torch.no_grad():
        mine, reference = ours(**inputs).logits, theirs(**inputs).logits
    mask = inputs.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones(mine.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(mine[real], reference[real], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- config, weights


def test_official_config_loads_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(VICUNA_7B_V15_CONFIG))
    for config_class in (LlamaConfig, LlavaLlamaConfig):
        config = config_class.from_pretrained(tmp_path)
        assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 32000)
        assert (config.num_attention_heads, config.num_key_value_heads) == (32, 32)
        assert config.max_position_embeddings == 4096
        assert (config.rope_scaling, config.pretraining_tp, config.rms_norm_eps) == (None, 1, 1e-5)
    assert LlavaLlamaConfig.from_pretrained(tmp_path).model_type == "llava_llama"


def test_state_dict_keys_are_the_official_names():
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    assert set(model.state_dict()) == family_checks.llama_layout_keys(TINY["num_hidden_layers"])
    assert model.get_decoder_layers() is model.model.layers
    assert model.get_input_embeddings() is model.model.embed_tokens


def test_transformers_checkpoint_loads_with_its_rotary_buffers_ignored(pair, tmp_path):
    reference = pair[1]
    # transformers 4.31 saves each layer's rotary inv_freq (lmsys/vicuna-7b-v1.5's index lists them too).
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in reference.state_dict()
    ours = ours_from(reference, tmp_path)
    state = ours.state_dict()
    for name, tensor in reference.state_dict().items():
        if not name.endswith("rotary_emb.inv_freq"):
            assert torch.equal(state[name], tensor), name


def test_attention_bias_of_newer_configs_adds_biases():
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, attention_bias=True)))
    keys = model.state_dict()
    assert all(f"model.layers.0.self_attn.{p}_proj.bias" in keys for p in "qkvo")


# ----------------------------------------------------------------------------------------------- parity


def test_logits_equal_transformers_llama(pair):
    ours, theirs = pair
    assert_parity(ours, theirs, input_ids=random_ids((2, 16)))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_equal_transformers_llama(pair, side):
    ours, theirs = pair
    samples = [random_ids((12,), seed=2), random_ids((7,), seed=3)]
    ids, mask = family_checks.pad_batch(samples, side)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if side == "left":
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them
    assert_parity(ours, theirs, **inputs)
    with torch.no_grad():  # and each sample alone gives the same logits
        batch = ours(**inputs).logits
        for row, sample in enumerate(samples):
            alone = ours(sample[None]).logits[0]
            torch.testing.assert_close(batch[row][mask[row].bool()], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_cached_decoding_equals_transformers_llama(pair):
    ours, theirs = pair
    ids = random_ids((2, 14))
    mine, past = family_checks.logits_through_cache(ours, ids, [4] + [1] * 10)
    reference, _ = family_checks.logits_through_cache(theirs, ids, [4] + [1] * 10)
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)
    chunks, _ = family_checks.logits_through_cache(ours, ids, [5, 6, 3])
    torch.testing.assert_close(chunks, ours(ids).logits, rtol=0, atol=1e-5)
    assert past[0][0].shape == (2, 2, 14, 16)  # key/value heads, not query heads


@pytest.mark.parametrize("overrides", [
    dict(rope_scaling={"type": "linear", "factor": 2.0}),
    dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=12),
    dict(pretraining_tp=2),
    dict(num_key_value_heads=4),
], ids=["linear_rope", "dynamic_rope", "pretraining_tp", "multi_head"])
def test_config_variants_equal_transformers_llama(tmp_path, overrides):
    # Fresh models per case: 4.31's dynamic rotary keeps the largest table it has built.
    theirs = reference_model(seed=4, **overrides)
    ours = ours_from(theirs, tmp_path)
    ids = random_ids((2, 20))  # longer than 12: the dynamic scaling acts
    assert_parity(ours, theirs, input_ids=ids)
    with torch.no_grad():
        mine, _ = family_checks.logits_through_cache(ours, ids, [6] + [1] * 14)
        reference, _ = family_checks.logits_through_cache(reference_model(seed=4, **overrides), ids, [6] + [1] * 14)
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)


@torch.no_grad()
def test_greedy_generation_of_a_left_padded_batch_equals_transformers_llama(pair):
    ours, theirs = pair
    prompts = [random_ids((9,), seed=5), random_ids((5,), seed=6)]
    ids, mask = family_checks.pad_batch(prompts, "left")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    mine = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(mine, theirs.generate(input_ids=ids, attention_mask=mask, **kwargs))
    seq = family_checks.greedy_by_full_forwards(ours, prompts[0][None], 8)
    assert torch.equal(mine[0], seq[0])


# ----------------------------------------------------------------------------------------------- training


def test_gradients_equal_transformers_llama(pair):
    ours, theirs = pair
    ids = random_ids((2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    grads = []
    for model in (ours, theirs):
        model.zero_grad()
        model(ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=0, atol=1e-5, msg=name)


def test_gradient_checkpointing_gives_the_same_loss_and_grads(pair):
    ids = random_ids((2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    family_checks.assert_gradient_checkpointing_changes_nothing(pair[0].train(), ids, labels)
    pair[0].eval()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_fp32(pair, dtype):
    family_checks.assert_half_precision_forward_close(pair[0], random_ids((2, 8)), dtype)


@torch.no_grad()
def test_replacing_mlp_is_all_a_moe_conversion_needs(pair, tmp_path):
    model = ours_from(pair[1], tmp_path)
    family_checks.assert_mlp_is_the_only_ffn(model, random_ids((2, 6)), TINY["num_hidden_layers"])


# ----------------------------------------------------------------------------------------------- LLaVA-Llama


@torch.no_grad()
def test_llava_llama_checkpoint_written_on_transformers_llama_loads(tmp_path):
    """The previous LLaVA-Llama ran on transformers' Llama and saved its rotary buffers: such a checkpoint
    (same names plus `rotary_emb.inv_freq`) loads with nothing missing, and its text path is transformers'
    Llama."""
    tokenizer_dir = tiny_llava.build_tiny_llama_tokenizer(tmp_path / "tokenizer")
    tower_dir = tiny_llava.build_tiny_clip_tower(tmp_path / "tower")
    dense = tiny_llava.tiny_llava_llama(tokenizer_dir, tower_dir)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(dense.config.to_dict())).eval()
    missing, unexpected = reference.load_state_dict(dense.state_dict(), strict=False)
    assert set(unexpected) == {n for n in dense.state_dict() if "mm_projector" in n or "image_tower" in n}
    assert all(n.endswith("rotary_emb.inv_freq") for n in missing)

    dense.save_pretrained(tmp_path / "llava")
    state = dict(dense.state_dict(), **{n: reference.state_dict()[n] for n in missing})
    family_checks.write_official_folder(tmp_path / "old", json.loads((tmp_path / "llava" / "config.json").read_text()),
                                        {n: t.contiguous() for n, t in state.items()})
    loaded, info = LlavaLlamaForCausalLM.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    ids = random_ids((1, 12), seed=8) % dense.config.vocab_size
    torch.testing.assert_close(loaded.eval()(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
