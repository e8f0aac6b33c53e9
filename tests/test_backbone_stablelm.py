"""StableLM backbone (model_type stablelm and stablelm_epoch): official config fields and weight names,
a plain-torch reference forward, KV cache, padding, generation, gradient checkpointing, half precision.
Parity against transformers' own StableLM is checked by tools/parity/run_parity.py (another environment)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.stablelm import (
    StableLMEpochConfig,
    StableLMEpochForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)
from moellava.model.language_model.stablelm.modeling_stablelm import StableLmLayerNormPerHead

import family_checks

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "official" / "stablelm-2-1_6b"

# stabilityai/stablelm-2-1_6b config.json (model_type stablelm), as published.
STABLELM_2_CONFIG = {
    "_name_or_path": "stabilityai/stablelm-2-1_6b",
    "architectures": ["StableLmForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 100257,
    "eos_token_id": 100257,
    "hidden_act": "silu",
    "hidden_dropout": 0.0,
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 4096,
    "model_type": "stablelm",
    "num_attention_heads": 32,
    "num_hidden_layers": 24,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.25,
    "rope_scaling": None,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "transformers_version": "4.38.2",
    "use_cache": True,
    "use_qkv_bias": True,
    "vocab_size": 100352,
}

# The same model's older remote-code config (model_type stablelm_epoch), which MoE-LLaVA-StableLM used.
STABLELM_2_EPOCH_CONFIG = {
    "_name_or_path": "stabilityai/stablelm-2-1_6b",
    "architectures": ["StableLMEpochForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_stablelm_epoch.StableLMEpochConfig",
        "AutoModelForCausalLM": "stabilityai/stablelm-2-1_6b--modeling_stablelm_epoch.StableLMEpochForCausalLM",
    },
    "bos_token_id": 100257,
    "eos_token_id": 100257,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 4096,
    "model_type": "stablelm_epoch",
    "norm_eps": 1e-05,
    "num_attention_heads": 32,
    "num_heads": 32,
    "num_hidden_layers": 24,
    "num_key_value_heads": 32,
    "rope_pct": 0.25,
    "rope_theta": 10000,
    "rotary_scaling_factor": 1.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.37.2",
    "use_cache": True,
    "use_qkv_bias": True,
    "vocab_size": 100352,
}

# The official files with the sizes shrunk: head_dim 16, so 25% rotary = 4 channels.
SHRINK = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
              num_hidden_layers=2, vocab_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
TINY = dict(STABLELM_2_CONFIG, **SHRINK)
TINY_EPOCH = dict(STABLELM_2_EPOCH_CONFIG, **SHRINK, num_heads=4)


def official_keys(num_layers):
    """Weight names of stabilityai/stablelm-2-1_6b's model.safetensors for `num_layers` layers."""
    per_layer = [
        "input_layernorm.bias", "input_layernorm.weight",
        "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "post_attention_layernorm.bias", "post_attention_layernorm.weight",
        "self_attn.k_proj.bias", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
        "self_attn.q_proj.bias", "self_attn.q_proj.weight", "self_attn.v_proj.bias", "self_attn.v_proj.weight",
    ]
    keys = {"model.embed_tokens.weight", "model.norm.bias", "model.norm.weight", "lm_head.weight"}
    keys |= {f"model.layers.{i}.{name}" for i in range(num_layers) for name in per_layer}
    return keys


def official_state_dict(config_dict, seed=0):
    """Random weights keyed by the official names, shaped from the config fields."""
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config_dict["hidden_size"], config_dict["intermediate_size"], config_dict["vocab_size"]
    kv = config_dict["num_key_value_heads"] * hidden // config_dict["num_attention_heads"]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,), "model.norm.bias": (hidden,),
    }
    for i in range(config_dict["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "input_layernorm.bias": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,), p + "post_attention_layernorm.bias": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    state = {}
    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator) * 0.15
        state[name] = 1.0 + tensor if "norm.weight" in name else tensor
    return state


def write_official_folder(folder, config_dict, seed=0):
    return family_checks.write_official_folder(folder, config_dict, official_state_dict(config_dict, seed))


def tiny_model(seed=0, **overrides):
    config = StableLmConfig(**dict(TINY, **overrides))
    model = StableLmForCausalLM(config)
    # Random norms and biases too, so that every parameter takes part in the checks.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.15
            param.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def random_ids(shape, seed=1):
    return torch.randint(3, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def reference_forward(model, input_ids):
    """StableLM written out in plain torch from the architecture description (one sample, no cache): rotary
    as complex rotation of channel pairs (i, i + rot/2) over the first 25% of each head."""
    config = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // heads
    rot = int(head_dim * config.partial_rotary_factor)
    seq = input_ids.shape[0]
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [seq, rot/2]
    rotation = torch.polar(torch.ones_like(angles), angles)

    def rope(x):  # [heads, seq, head_dim]
        pairs = torch.complex(x[..., : rot // 2], x[..., rot // 2 : rot]) * rotation
        return torch.cat([pairs.real, pairs.imag, x[..., rot:]], dim=-1)

    def ln(x, name):
        return F.layer_norm(x, (hidden,), sd[name + ".weight"], sd[name + ".bias"], config.layer_norm_eps)

    x = sd["model.embed_tokens.weight"][input_ids]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        h = ln(x, p + "input_layernorm")
        q, k, v = (
            (h @ sd[p + f"self_attn.{n}_proj.weight"].T + sd[p + f"self_attn.{n}_proj.bias"])
            .view(seq, heads, head_dim).transpose(0, 1)
            for n in "qkv"
        )
        scores = rope(q) @ rope(k).transpose(1, 2) / math.sqrt(head_dim)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + attn.transpose(0, 1).reshape(seq, hidden) @ sd[p + "self_attn.o_proj.weight"].T
        h = ln(x, p + "post_attention_layernorm")
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return ln(x, "model.norm") @ sd["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name, embedded", [("config.json", STABLELM_2_CONFIG),
                                            ("config.stablelm_epoch.json", STABLELM_2_EPOCH_CONFIG)])
def test_embedded_configs_equal_the_official_files(name, embedded):
    path = OFFICIAL / name
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared/reference beside the repository)")
    assert json.loads(path.read_text()) == embedded


@pytest.mark.parametrize("config_dict, config_class", [(STABLELM_2_CONFIG, StableLmConfig),
                                                       (STABLELM_2_EPOCH_CONFIG, StableLMEpochConfig)])
def test_official_configs_load_unchanged(tmp_path, config_dict, config_class):
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is config_class
    assert config.model_type == config_dict["model_type"]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (2048, 24, 100352)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 32)
    assert config.layer_norm_eps == 1e-5 and config.partial_rotary_factor == 0.25
    assert config.use_qkv_bias is True and config.rope_theta == 10000
    assert config.qk_layernorm is False and config.use_parallel_residual is False
    # The epoch names read the same values.
    assert (config.norm_eps, config.rope_pct, config.num_heads) == (1e-5, 0.25, 32)


def test_epoch_config_saves_and_reloads_with_its_model_type(tmp_path):
    config = StableLMEpochConfig(**{k: v for k, v in TINY_EPOCH.items() if k != "model_type"})
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "stablelm_epoch"
    assert saved["layer_norm_eps"] == 1e-5 and saved["partial_rotary_factor"] == 0.25
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is StableLMEpochConfig
    fields = {k: v for k, v in reloaded.to_dict().items() if k != "_name_or_path"}
    assert fields == {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


@pytest.mark.parametrize("fields, message", [
    (dict(norm_eps=1e-6), "layer_norm_eps=1e-05 and its stablelm_epoch name norm_eps=1e-06"),
    (dict(rope_pct=0.5), "partial_rotary_factor=0.25 and its stablelm_epoch name rope_pct=0.5"),
    (dict(num_heads=8), "num_attention_heads=4 and its stablelm_epoch name num_heads=8"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rotary_scaling_factor=2.0), "rotary_scaling_factor=2.0 is not supported"),
    (dict(partial_rotary_factor=0.1), "partial_rotary_factor=0.1 gives 1 rotary dims"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(hidden_size=66), "hidden_size=66 is not divisible by num_attention_heads=4"),
])
def test_bad_config_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        StableLmConfig(**dict(TINY, **fields))


# ----------------------------------------------------------------------------------------------- weights


def test_state_dict_keys_are_the_official_names():
    model = StableLmForCausalLM(StableLmConfig(**TINY))
    assert set(model.state_dict()) == official_keys(TINY["num_hidden_layers"])
    assert model.get_decoder_layers() is model.model.layers
    assert model.get_input_embeddings() is model.model.embed_tokens


@pytest.mark.parametrize("config_dict, model_class", [(TINY, StableLmForCausalLM),
                                                      (TINY_EPOCH, StableLMEpochForCausalLM)])
def test_from_pretrained_loads_the_official_layout(tmp_path, config_dict, model_class):
    state = write_official_folder(tmp_path, config_dict)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is model_class
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    # Both formats give the same model.
    ids = random_ids((1, 9))
    other = StableLmForCausalLM(StableLmConfig(**TINY)).eval()
    other.load_state_dict(state)
    torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=0, atol=0)


@torch.no_grad()
def test_a_stored_rotary_buffer_is_ignored(tmp_path):
    state = official_state_dict(TINY)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(2)
    family_checks.write_official_folder(tmp_path, TINY, state)
    model, info = StableLmForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in model.state_dict()


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    reloaded = StableLmForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids((2, 7))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- forward


@torch.no_grad()
def test_logits_match_a_plain_torch_reference():
    model = tiny_model()
    ids = random_ids((11,))
    expected = reference_forward(model, ids)
    torch.testing.assert_close(model(ids[None]).logits[0].double(), expected, rtol=0, atol=2e-5)


@torch.no_grad()
def test_per_head_layernorm_equals_one_layernorm_per_head():
    norm = StableLmLayerNormPerHead(head_dim=8, num_heads=3, eps=1e-5)
    for i, layer in enumerate(norm.norms):
        layer.weight.data = torch.arange(8.0) * 0.1 + i
    x = torch.randn(2, 3, 5, 8)
    expected = torch.stack([norm.norms[h](x[:, h]) for h in range(3)], dim=1)
    torch.testing.assert_close(norm(x), expected)
    assert sorted(n for n, _ in norm.named_parameters()) == [f"norms.{h}.weight" for h in range(3)]


@torch.no_grad()
def test_parallel_residual_block():
    model = tiny_model(use_parallel_residual=True, qk_layernorm=True)
    layer = model.model.layers[0]
    assert not hasattr(layer, "post_attention_layernorm")
    x = torch.randn(1, 5, TINY["hidden_size"])
    rotary = model.model.rotary_emb(torch.arange(5)[None])
    mask = torch.zeros(1, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), torch.finfo(x.dtype).min)
    normed = layer.input_layernorm(x)
    expected = x + layer.self_attn(normed, mask, rotary)[0] + layer.mlp(normed)
    torch.testing.assert_close(layer(x, mask, rotary)[0], expected)


@torch.no_grad()
@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True)])
def test_kv_cache_matches_full_forward(overrides):
    model = tiny_model(**overrides)
    ids = random_ids((2, 12))
    mask = torch.ones_like(ids)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    steps, _ = family_checks.logits_through_cache(model, ids, [1] * ids.shape[1])  # token by token
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    chunks, past = family_checks.logits_through_cache(model, ids, [5, 4, 3])
    torch.testing.assert_close(chunks, full, rtol=0, atol=1e-5)
    kv_heads = model.config.num_key_value_heads
    assert len(past) == TINY["num_hidden_layers"]
    assert past[0][0].shape == (2, kv_heads, 12, TINY["hidden_size"] // TINY["num_attention_heads"])


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sample_alone(side):
    model = tiny_model()
    samples = [random_ids((9,), seed=2), random_ids((5,), seed=3), random_ids((7,), seed=4)]
    ids, mask = family_checks.pad_batch(samples, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, attention_mask=mask, position_ids=positions).logits
    for row, sample in enumerate(samples):
        alone = model(sample[None]).logits[0]
        torch.testing.assert_close(batch[row][mask[row].bool()], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_greedy_generation_of_a_left_padded_batch_matches_each_prompt_alone():
    model = tiny_model()
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
    # Greedy from the cache equals argmax of full forwards.
    seq = family_checks.greedy_by_full_forwards(model, prompts[0][None], 6)
    assert torch.equal(batch[0], seq[0, 8:])


@torch.no_grad()
def test_inputs_embeds_equal_input_ids():
    model = tiny_model()
    ids = random_ids((2, 6))
    torch.testing.assert_close(model(inputs_embeds=model.get_input_embeddings()(ids)).logits, model(ids).logits)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model.model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))


@torch.no_grad()
def test_replacing_mlp_is_all_a_moe_conversion_needs():
    family_checks.assert_mlp_is_the_only_ffn(tiny_model(), random_ids((2, 6)), TINY["num_hidden_layers"])


# ----------------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    model = tiny_model().train()
    ids = random_ids((2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    plain_loss = family_checks.assert_gradient_checkpointing_changes_nothing(model, ids, labels)
    # The loss is next-token cross entropy over the unmasked labels.
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(plain_loss, expected)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_fp32(dtype):
    model = tiny_model()
    family_checks.assert_half_precision_forward_close(model, random_ids((2, 8)), dtype)
