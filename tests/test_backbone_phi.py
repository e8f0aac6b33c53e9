"""Phi backbone: official config/weight layout, cache, padding, checkpointing, half precision, and parity
with transformers 4.31's GPT-NeoX (the same parallel block once its two LayerNorms are tied)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from moellava.model.language_model.phi import PhiConfig, PhiForCausalLM

import family_checks

OFFICIAL_DIR = Path("/work/shared/reference/official/phi-2")

# microsoft/phi-2 config.json (HF-native format, model_type "phi"), as published.
PHI2_CONFIG = {
    "_name_or_path": "microsoft/phi-2",
    "architectures": ["PhiForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_phi.PhiConfig",
        "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM",
    },
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "vocab_size": 51200,
}

# The official file with the sizes shrunk; every other field (partial_rotary_factor 0.4, gelu_new,
# resid_pdrop 0.1, ...) is kept. head_dim 16 -> int(16 * 0.4) = 6 rotary channels.
TINY = dict(
    PHI2_CONFIG,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=128,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)


def official_shapes(cfg: dict) -> dict:
    """Official phi weight names and shapes, written from the architecture description."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * hidden // cfg["num_attention_heads"]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.final_layernorm.weight": (hidden,),
        "model.final_layernorm.bias": (hidden,),
        "lm_head.weight": (vocab, hidden),
        "lm_head.bias": (vocab,),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "input_layernorm.bias": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.q_proj.bias": (hidden,),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.dense.weight": (hidden, hidden),
                p + "self_attn.dense.bias": (hidden,),
                p + "mlp.fc1.weight": (inter, hidden),
                p + "mlp.fc1.bias": (inter,),
                p + "mlp.fc2.weight": (hidden, inter),
                p + "mlp.fc2.bias": (hidden,),
            }
        )
    return shapes


def write_official_checkpoint(folder: Path, cfg: dict, seed: int = 0) -> dict:
    """config.json + model.safetensors keyed exactly by the official names; returns the tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen) * 0.1 for name, shape in official_shapes(cfg).items()}
    for name in tensors:
        if name.endswith("layernorm.weight"):
            tensors[name] += 1.0
    return family_checks.write_official_folder(folder, cfg, tensors)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi_tiny")
    tensors = write_official_checkpoint(folder, TINY)
    return folder, tensors


@pytest.fixture(scope="module")
def model(checkpoint):
    return PhiForCausalLM.from_pretrained(checkpoint[0]).eval()


def tiny_model(seed=0, **overrides) -> PhiForCausalLM:
    torch.manual_seed(seed)
    cfg = PhiConfig(**{k: v for k, v in dict(TINY, **overrides).items() if k not in ("architectures", "auto_map")})
    model = PhiForCausalLM(cfg).eval()
    # Larger than the 0.02 init so attention is peaked and positions visibly matter; random biases and
    # norms too, so every parameter counts.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("layernorm.weight") else 0.0, 0.1)
    return model


def inputs(batch=2, length=9, seed=1):
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Official layout


@pytest.mark.skipif(not OFFICIAL_DIR.is_dir(), reason="official reference files not available")
def test_official_files_match_the_facts_used_here():
    assert json.loads((OFFICIAL_DIR / "config.json").read_text()) == PHI2_CONFIG
    index = json.loads((OFFICIAL_DIR / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(official_shapes(PHI2_CONFIG))


@pytest.mark.skipif(not OFFICIAL_DIR.is_dir(), reason="official reference files not available")
def test_official_config_loads_unchanged():
    config = AutoConfig.from_pretrained(OFFICIAL_DIR)
    assert isinstance(config, PhiConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.partial_rotary_factor) == (2560, 32, 0.4)
    assert (config.hidden_act, config.resid_pdrop, config.rope_theta) == ("gelu_new", 0.1, 10000.0)
    assert (config.bos_token_id, config.eos_token_id, config.tie_word_embeddings) == (50256, 50256, False)


def test_parameter_names_and_shapes_are_the_official_ones():
    model = tiny_model()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(TINY)


def test_official_checkpoint_loads_with_no_missing_or_unexpected_keys(checkpoint):
    folder, tensors = checkpoint
    loaded, info = PhiForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    state = loaded.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    auto = AutoModelForCausalLM.from_pretrained(folder)
    assert type(auto) is PhiForCausalLM
    assert auto.config.partial_rotary_factor == 0.4 and auto.model.rotary_emb.dim == 6


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = PhiForCausalLM.from_pretrained(tmp_path).eval()
    x = inputs()
    assert torch.equal(model(x).logits, again(x).logits)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "phi" and saved["partial_rotary_factor"] == 0.4


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers 4.31's GPT-NeoX: parallel residual, partial rotary (rotate-half), biased
# attention, fp32 attention scores. Phi is that model with one LayerNorm shared by both branches.


def to_neox(phi: PhiForCausalLM) -> GPTNeoXForCausalLM:
    c = phi.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    neox_cfg = GPTNeoXConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads,
        intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act,
        rotary_pct=c.partial_rotary_factor,
        rotary_emb_base=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    neox = GPTNeoXForCausalLM(neox_cfg).eval()
    src = phi.state_dict()
    dst = {"gpt_neox.embed_in.weight": src["model.embed_tokens.weight"], "embed_out.weight": src["lm_head.weight"]}
    for suffix in ("weight", "bias"):
        dst[f"gpt_neox.final_layer_norm.{suffix}"] = src[f"model.final_layernorm.{suffix}"]
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"gpt_neox.layers.{i}."
        for suffix in ("weight", "bias"):
            dst[q + f"input_layernorm.{suffix}"] = src[p + f"input_layernorm.{suffix}"]
            dst[q + f"post_attention_layernorm.{suffix}"] = src[p + f"input_layernorm.{suffix}"]
            dst[q + f"attention.dense.{suffix}"] = src[p + f"self_attn.dense.{suffix}"]
            dst[q + f"mlp.dense_h_to_4h.{suffix}"] = src[p + f"mlp.fc1.{suffix}"]
            dst[q + f"mlp.dense_4h_to_h.{suffix}"] = src[p + f"mlp.fc2.{suffix}"]
            # NeoX fuses q/k/v per head: rows ordered [head][q|k|v][head_dim].
            qkv = [src[p + f"self_attn.{n}_proj.{suffix}"].reshape(heads, head_dim, -1) for n in "qkv"]
            dst[q + f"attention.query_key_value.{suffix}"] = torch.stack(qkv, dim=1).reshape(3 * c.hidden_size, -1).squeeze(-1)
    missing, unexpected = neox.load_state_dict(dst, strict=False)
    assert not unexpected and set(missing) <= {name for name, _ in neox.named_buffers()}, missing
    return neox


def test_logits_match_transformers_gpt_neox():
    model = tiny_model(resid_pdrop=0.0)
    with torch.no_grad():
        model.lm_head.bias.zero_()  # GPT-NeoX's output head has no bias
    neox = to_neox(model)
    x = inputs(length=12)
    with torch.no_grad():
        ours, ref = model(x).logits, neox(x).logits
    assert (ours - ref).abs().max().item() < 1e-5


def test_lm_head_bias_is_used(model):
    x = inputs()
    without_bias = copy.deepcopy(model)
    with torch.no_grad():
        without_bias.lm_head.bias.zero_()
        assert model.lm_head.bias.abs().sum() > 0
        assert torch.allclose(without_bias(x).logits + model.lm_head.bias, model(x).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Cache and masks


@torch.no_grad()
def test_kv_cache_token_by_token_and_chunked_equal_full_forward(model):
    x = inputs(length=10)
    full = model(x).logits
    for chunks in ([1] * 10, [4, 3, 1, 2]):
        logits, past = family_checks.logits_through_cache(model, x, chunks)
        assert torch.allclose(logits, full, atol=1e-5), chunks
    assert len(past) == TINY["num_hidden_layers"]
    assert past[0][0].shape == (2, TINY["num_key_value_heads"], 10, 16)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sample_alone(model, side):
    samples = [inputs(1, 9, seed=2)[0], inputs(1, 5, seed=3)[0], inputs(1, 7, seed=4)[0]]
    ids, mask = family_checks.pad_batch(samples, side)
    batched = model(ids, attention_mask=mask).logits
    assert torch.isfinite(batched).all()
    for row, s in enumerate(samples):
        alone = model(s[None]).logits[0]
        assert torch.allclose(batched[row][mask[row].bool()], alone, atol=1e-5), (side, row)


@torch.no_grad()
def test_greedy_generation_of_a_left_padded_batch_matches_each_prompt_alone(model):
    prompts = [inputs(1, 6, seed=5)[0], inputs(1, 3, seed=6)[0]]
    ids, mask = family_checks.pad_batch(prompts, "left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(batched[row, 6:], alone[0, len(p) :])
    # the cached generation equals greedy decoding recomputed from scratch
    seq = family_checks.greedy_by_full_forwards(model, prompts[0][None], 6)
    assert torch.equal(seq[0, 6:], batched[0, 6:])


# ---------------------------------------------------------------------------------------------------------
# Forward variants


@torch.no_grad()
def test_inputs_embeds_and_output_attentions_paths(model):
    x = inputs()
    reference = model(x)
    by_embeds = model(inputs_embeds=model.get_input_embeddings()(x))
    assert torch.allclose(by_embeds.logits, reference.logits, atol=1e-6)
    explicit = model(x, output_attentions=True, output_hidden_states=True)
    assert torch.allclose(explicit.logits, reference.logits, atol=1e-5)
    assert len(explicit.attentions) == 3 and explicit.attentions[0].shape == (2, 4, 9, 9)
    assert torch.allclose(explicit.attentions[0].sum(-1), torch.ones(2, 4, 9), atol=1e-5)
    assert torch.equal(explicit.attentions[0].triu(1), torch.zeros_like(explicit.attentions[0]))
    assert len(explicit.hidden_states) == 4
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(x, inputs_embeds=model.get_input_embeddings()(x))


@torch.no_grad()
def test_loss_is_shifted_cross_entropy_ignoring_minus_100(model):
    x = inputs()
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, TINY["vocab_size"])
    expected = nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    tuple_out = model(x, labels=labels, return_dict=False)
    assert torch.equal(tuple_out[0], out.loss) and torch.equal(tuple_out[1], out.logits)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    model = tiny_model()  # resid_pdrop 0.1: checkpointing must replay the same dropout masks
    model.train()
    x = inputs()

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(123)
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert torch.equal(plain_loss, ckpt_loss)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name
    model.eval()
    with torch.no_grad():  # dropout was active: eval differs from train
        assert not torch.allclose(model(x, labels=x).loss, plain_loss)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_half_precision_forward_is_close_to_fp32(checkpoint, model, dtype, tolerance):
    half = PhiForCausalLM.from_pretrained(checkpoint[0], torch_dtype=dtype).eval()
    assert half.lm_head.weight.dtype == dtype
    x = inputs(length=12)
    with torch.no_grad():
        reference, low = model(x).logits, half(x).logits
    assert low.dtype == torch.float32  # logits are upcast, as in the official model
    assert (low - reference).abs().max().item() < tolerance * reference.abs().max().item()


def test_attention_runs_in_the_model_dtype_unless_the_config_asks_for_fp32(model):
    assert model.config.upcast_attention is False
    assert not any(layer.self_attn.upcast_attention for layer in model.get_decoder_layers())
    upcast = PhiForCausalLM(PhiConfig.from_dict({**model.config.to_dict(), "upcast_attention": True})).eval()
    upcast.load_state_dict(model.state_dict())
    assert all(layer.self_attn.upcast_attention for layer in upcast.get_decoder_layers())
    x = inputs(length=12)
    with torch.no_grad():
        # In fp32 the two are the same computation; in bf16 both stay close to it.
        torch.testing.assert_close(upcast(x).logits, model(x).logits, rtol=0, atol=0)
        reference = model(x).logits
        for fp32_attention in (False, True):
            low = copy.deepcopy(upcast if fp32_attention else model).to(torch.bfloat16)
            assert (low(x).logits - reference).abs().max() < 0.03 * reference.abs().max()


# ---------------------------------------------------------------------------------------------------------
# Contract with the MoE conversion and the LLaVA wrappers


@torch.no_grad()
def test_each_decoder_layer_ffn_is_the_mlp_attribute(model):
    layers = model.get_decoder_layers()
    assert layers is model.model.layers and len(layers) == 3
    assert model.get_input_embeddings() is model.model.embed_tokens
    x = inputs()
    swapped = copy.deepcopy(model)
    zeroed = copy.deepcopy(model)

    class Zero(nn.Module):
        def forward(self, hidden_states):
            return torch.zeros_like(hidden_states)

    for layer, zero_layer in zip(swapped.get_decoder_layers(), zeroed.get_decoder_layers()):
        layer.mlp = Zero()
        zero_layer.mlp.fc2.weight.zero_()
        zero_layer.mlp.fc2.bias.zero_()
    assert torch.allclose(swapped(x).logits, zeroed(x).logits, atol=1e-6)
    assert not torch.allclose(swapped(x).logits, model(x).logits, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# Rope scaling and config errors


@torch.no_grad()
def test_linear_rope_scaling_divides_positions():
    plain = tiny_model()
    scaled = tiny_model(rope_scaling={"type": "linear", "factor": 2.0})
    scaled.load_state_dict(plain.state_dict())
    x = inputs(length=8)
    positions = torch.arange(8)[None].expand(2, -1)
    # positions 0,2,4,.. scaled by 1/2 are 0,1,2,..: same phases as the plain model at 0,1,2,..
    assert torch.allclose(scaled(x, position_ids=positions * 2).logits, plain(x).logits, atol=1e-5)
    assert (scaled(x).logits - plain(x).logits).abs().max() > 1e-2


@torch.no_grad()
def test_dynamic_rope_scaling_only_acts_beyond_max_positions():
    plain = tiny_model(max_position_embeddings=8)
    dynamic = tiny_model(max_position_embeddings=8, rope_scaling={"type": "dynamic", "factor": 2.0})
    dynamic.load_state_dict(plain.state_dict())
    short, long = inputs(length=8), inputs(length=12)
    assert torch.equal(dynamic(short).logits, plain(short).logits)
    # beyond: base * alpha ** (d / (d - 2)), alpha = 2 * 12 / 8 - 1 = 2
    rebased = tiny_model(max_position_embeddings=8, rope_theta=10000.0 * 2.0 ** (6 / 4))
    rebased.load_state_dict(plain.state_dict())
    assert torch.allclose(dynamic(long).logits, rebased(long).logits, atol=1e-5)
    assert (dynamic(long).logits - plain(long).logits).abs().max() > 1e-2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=5), "divisible by num_attention_heads"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(partial_rotary_factor=0.1), "rotary channels"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "'linear' or 'dynamic'"),
        (dict(rope_scaling={"type": "linear"}), "exactly the fields"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor must be a number > 1"),
    ],
)
def test_bad_config_fails_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        PhiConfig(**dict(TINY, **overrides))


@torch.no_grad()
def test_grouped_query_attention_equals_repeated_heads():
    gqa = tiny_model(num_key_value_heads=2)
    mha = tiny_model(num_key_value_heads=4)
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if "k_proj" in name or "v_proj" in name:  # each kv head serves two query heads
            state[name] = tensor.reshape(2, 16, *tensor.shape[1:]).repeat_interleave(2, dim=0).reshape(64, *tensor.shape[1:])
    mha.load_state_dict(state)
    x = inputs()
    assert torch.allclose(gqa(x).logits, mha(x).logits, atol=1e-5)
    assert gqa(x, use_cache=True).past_key_values[0][0].shape[1] == 2
