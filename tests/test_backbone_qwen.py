"""QWen v1 backbone (official config/weight layout, parity with transformers 4.31's Llama, cache, padding,
dynamic NTK and log-n beyond seq_length, checkpointing, half precision) and the shared pieces in
moellava/model/language_model/common.py."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moellava.model.language_model.common import (
    DecoderGenerationHooks,
    RMSNorm,
    RotaryEmbedding,
    SwiGLUMLP,
    apply_rotary_pos_emb,
    attention_core,
    attention_mask_if_needed,
    build_attention_mask,
    causal_lm_loss,
    dynamic_ntk_alpha,
    repeat_kv,
)
from moellava.model.language_model.qwen import QWenConfig, QWenLMHeadModel
from moellava.model.language_model.qwen.modeling_qwen import qwen_logn_scale, qwen_ntk_alpha

import family_checks

OFFICIAL = Path("/work/shared/reference/official")

# Qwen/Qwen-1_8B config.json, as published.
QWEN_1_8B_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "attn_dropout_prob": 0.0,
    "bf16": False,
    "emb_dropout_prob": 0.0,
    "fp16": False,
    "fp32": False,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "initializer_range": 0.02,
    "kv_channels": 128,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "onnx_safe": None,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 8192,
    "tie_word_embeddings": False,
    "tokenizer_class": "QWenTokenizer",
    "transformers_version": "4.32.0",
    "use_cache": True,
    "use_dynamic_ntk": True,
    "use_flash_attn": "auto",
    "use_logn_attn": True,
    "vocab_size": 151936,
}

# The official file with the sizes shrunk (kv_channels * heads = hidden, as in every official config);
# seq_length 16 so that dynamic NTK and log-n attention can be exercised beyond it.
TINY = dict(
    QWEN_1_8B_CONFIG,
    hidden_size=64,
    intermediate_size=256,
    kv_channels=16,
    num_attention_heads=4,
    num_hidden_layers=3,
    vocab_size=128,
    max_position_embeddings=64,
    seq_length=16,
)


def official_shapes(cfg: dict) -> dict:
    """Official QWen v1 weight names and shapes, written from the architecture description."""
    hidden, vocab, ff = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"] // 2
    proj = cfg["kv_channels"] * cfg["num_attention_heads"]
    shapes = {
        "transformer.wte.weight": (vocab, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (hidden,),
                p + "attn.c_attn.weight": (3 * proj, hidden),
                p + "attn.c_attn.bias": (3 * proj,),
                p + "attn.c_proj.weight": (hidden, proj),
                p + "ln_2.weight": (hidden,),
                p + "mlp.w1.weight": (ff, hidden),
                p + "mlp.w2.weight": (ff, hidden),
                p + "mlp.c_proj.weight": (hidden, ff),
            }
        )
    return shapes


def write_official_checkpoint(folder: Path, cfg: dict, seed: int = 0) -> dict:
    """config.json + model.safetensors keyed exactly by the official names; returns the tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in official_shapes(cfg).items():
        tensors[name] = torch.randn(shape, generator=gen) * 0.1 + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
    return family_checks.write_official_folder(folder, cfg, tensors)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_tiny")
    return folder, write_official_checkpoint(folder, TINY)


@pytest.fixture(scope="module")
def model(checkpoint):
    return QWenLMHeadModel.from_pretrained(checkpoint[0]).eval()


def tiny_model(seed=0, **overrides) -> QWenLMHeadModel:
    torch.manual_seed(seed)
    cfg = QWenConfig(**{k: v for k, v in dict(TINY, **overrides).items() if k not in ("architectures", "auto_map")})
    model = QWenLMHeadModel(cfg).eval()
    # Larger than the 0.02 init so attention is peaked and positions visibly matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0, 0.1)
    return model


def inputs(batch=2, length=9, seed=1):
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Official layout


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="official reference files not available")
def test_official_files_match_the_facts_used_here():
    assert json.loads((OFFICIAL / "qwen-1_8b/config.json").read_text()) == QWEN_1_8B_CONFIG
    chat_7b = json.loads((OFFICIAL / "qwen-7b-chat-finetune/config.json").read_text())
    index = json.loads((OFFICIAL / "qwen-7b-chat-finetune/model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(official_shapes(chat_7b))


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="official reference files not available")
@pytest.mark.parametrize("folder", ["qwen-1_8b", "qwen-7b-chat-finetune"])
def test_official_configs_load_unchanged(folder):
    config = AutoConfig.from_pretrained(OFFICIAL / folder)
    assert isinstance(config, QWenConfig)
    assert (config.kv_channels, config.rotary_pct, config.rotary_emb_base) == (128, 1.0, 10000)
    assert (config.seq_length, config.use_dynamic_ntk, config.use_logn_attn) == (8192, True, True)
    assert config.layer_norm_epsilon == 1e-6 and config.no_bias is True


def test_parameter_names_and_shapes_are_the_official_ones():
    assert {k: tuple(v.shape) for k, v in tiny_model().state_dict().items()} == official_shapes(TINY)
    mlp = tiny_model().transformer.h[0].mlp
    assert mlp.w1.out_features == TINY["intermediate_size"] // 2  # the official config value is doubled


def test_official_checkpoint_loads_with_no_missing_or_unexpected_keys(checkpoint):
    folder, tensors = checkpoint
    loaded, info = QWenLMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    state = loaded.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is QWenLMHeadModel


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = QWenLMHeadModel.from_pretrained(tmp_path).eval()
    x = inputs()
    assert torch.equal(model(x).logits, again(x).logits)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen" and saved["seq_length"] == 16 and saved["use_flash_attn"] == "auto"


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers 4.31's Llama: with a zero c_attn bias, QWen v1 is Llama with the fused q|k|v
# projection split, gate_proj = w2 (the silu branch), up_proj = w1, down_proj = mlp.c_proj.


def to_llama(qwen: QWenLMHeadModel) -> LlamaForCausalLM:
    c = qwen.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size // 2,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.layer_norm_epsilon,
            tie_word_embeddings=False,
        )
    ).eval()
    src = qwen.state_dict()
    dst = {
        "model.embed_tokens.weight": src["transformer.wte.weight"],
        "model.norm.weight": src["transformer.ln_f.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        wq, wk, wv = src[p + "attn.c_attn.weight"].chunk(3, dim=0)
        dst.update(
            {
                q + "self_attn.q_proj.weight": wq,
                q + "self_attn.k_proj.weight": wk,
                q + "self_attn.v_proj.weight": wv,
                q + "self_attn.o_proj.weight": src[p + "attn.c_proj.weight"],
                q + "mlp.gate_proj.weight": src[p + "mlp.w2.weight"],
                q + "mlp.up_proj.weight": src[p + "mlp.w1.weight"],
                q + "mlp.down_proj.weight": src[p + "mlp.c_proj.weight"],
                q + "input_layernorm.weight": src[p + "ln_1.weight"],
                q + "post_attention_layernorm.weight": src[p + "ln_2.weight"],
            }
        )
    missing, unexpected = llama.load_state_dict(dst, strict=False)
    assert not unexpected and set(missing) <= {name for name, _ in llama.named_buffers()}, missing
    return llama


@torch.no_grad()
def test_logits_match_transformers_llama_when_c_attn_bias_is_zero():
    qwen = tiny_model()
    for block in qwen.transformer.h:
        block.attn.c_attn.bias.zero_()
    llama = to_llama(qwen)
    x = inputs(length=14)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        ours, ref = qwen(x, **kwargs).logits, llama(x, **kwargs).logits
        real = mask.bool() if kwargs else torch.ones_like(mask).bool()
        assert (ours - ref)[real].abs().max().item() < 1e-5


@torch.no_grad()
def test_c_attn_bias_is_used(model):
    x = inputs()
    without = copy.deepcopy(model)
    for block in without.transformer.h:
        block.attn.c_attn.bias.zero_()
    assert (model(x).logits - without(x).logits).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# Cache and masks


@torch.no_grad()
def test_kv_cache_token_by_token_and_chunked_equal_full_forward(model):
    x = inputs(length=10)
    full = model(x).logits
    for chunks in ([1] * 10, [3, 4, 1, 2]):
        logits, past = family_checks.logits_through_cache(model, x, chunks)
        assert torch.allclose(logits, full, atol=1e-5), chunks
    assert len(past) == 3 and past[0][0].shape == (2, 4, 10, 16)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sample_alone(model, side):
    samples = [inputs(1, 9, seed=2)[0], inputs(1, 4, seed=3)[0], inputs(1, 7, seed=4)[0]]
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
    seq = family_checks.greedy_by_full_forwards(model, prompts[0][None], 6)
    assert torch.equal(seq[0, 6:], batched[0, 6:])


# ---------------------------------------------------------------------------------------------------------
# Beyond seq_length: dynamic NTK and log-n attention (eval only)


def test_official_ntk_alpha_and_logn_values():
    assert [qwen_ntk_alpha(n, 8192) for n in (1, 100, 8192, 8193, 16384, 16385, 32768, 32769)] == [
        1.0, 1.0, 1.0, 3.0, 3.0, 7.0, 7.0, 15.0,
    ]
    positions = torch.tensor([[0, 15, 16, 17, 40]])
    expected = [1.0, 1.0, math.log(17, 16), math.log(18, 16), math.log(41, 16)]
    assert torch.allclose(qwen_logn_scale(positions, 16).flatten(), torch.tensor(expected))


def with_weights_of(source: QWenLMHeadModel, **overrides) -> QWenLMHeadModel:
    target = tiny_model(**overrides)
    target.load_state_dict(source.state_dict())
    return target


@torch.no_grad()
def test_dynamic_ntk_rebases_rotary_beyond_seq_length_only():
    ntk = tiny_model(use_logn_attn=False)
    plain = with_weights_of(ntk, use_logn_attn=False, use_dynamic_ntk=False)
    short, long = inputs(length=16), inputs(length=24)
    assert torch.equal(ntk(short).logits, plain(short).logits)
    # 24 tokens, seq_length 16: alpha = 2 ** ceil(log2(24 / 16) + 1) - 1 = 3 -> base 10000 * 3 ** (16 / 14)
    rebased = with_weights_of(ntk, use_logn_attn=False, use_dynamic_ntk=False, rotary_emb_base=10000 * 3 ** (16 / 14))
    assert torch.allclose(ntk(long).logits, rebased(long).logits, atol=1e-5)
    assert (ntk(long).logits - plain(long).logits).abs().max() > 1e-2
    ntk.train()  # the official model only extends the context in eval mode
    assert torch.allclose(ntk(long).logits, plain(long).logits, atol=1e-5)


@torch.no_grad()
def test_dynamic_ntk_keeps_the_prompt_alpha_while_decoding():
    ntk = tiny_model(use_logn_attn=False)
    plain = with_weights_of(ntk, use_logn_attn=False, use_dynamic_ntk=False)
    x = inputs(length=24)
    # A 10-token prompt (alpha 1) decoded past seq_length keeps alpha 1, so cached keys and new queries agree.
    out = ntk(x[:, :10], use_cache=True)
    pieces, past = [out.logits], out.past_key_values
    for t in range(10, 24):
        out = ntk(x[:, t : t + 1], past_key_values=past, use_cache=True)
        pieces.append(out.logits)
        past = out.past_key_values
    assert torch.allclose(torch.cat(pieces, dim=1), plain(x).logits, atol=1e-5)
    # A 24-token prompt (alpha 3) continues with alpha 3.
    rebased = with_weights_of(ntk, use_logn_attn=False, use_dynamic_ntk=False, rotary_emb_base=10000 * 3 ** (16 / 14))
    longer = inputs(length=26)
    out = ntk(longer[:, :24], use_cache=True)
    step = ntk(longer[:, 24:], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step, rebased(longer).logits[:, 24:], atol=1e-5)


@torch.no_grad()
def test_dynamic_ntk_uses_each_samples_real_length_under_a_padding_mask():
    model = tiny_model()
    long_sample, short_sample = inputs(1, 33, seed=7)[0], inputs(1, 20, seed=8)[0]
    ids = torch.zeros(2, 33, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = long_sample, 1
    ids[1, :20], mask[1, :20] = short_sample, 1
    batched = model(ids, attention_mask=mask).logits  # alphas 7 (33 tokens) and 3 (20 tokens)
    assert torch.allclose(batched[0], model(long_sample[None]).logits[0], atol=1e-5)
    assert torch.allclose(batched[1, :20], model(short_sample[None]).logits[0], atol=1e-5)
    rebased = with_weights_of(model, use_dynamic_ntk=False, rotary_emb_base=10000 * 3 ** (16 / 14))
    assert torch.allclose(batched[1, :20], rebased(short_sample[None]).logits[0], atol=1e-5)


@torch.no_grad()
def test_logn_attention_scales_queries_beyond_seq_length():
    logn = tiny_model(num_hidden_layers=1, use_dynamic_ntk=False)
    plain = with_weights_of(logn, num_hidden_layers=1, use_dynamic_ntk=False, use_logn_attn=False)
    short, long = inputs(length=16), inputs(length=24)
    assert torch.equal(logn(short).logits, plain(short).logits)
    # One layer: the last position's output only depends on its own query, so scaling that query by
    # log(24) / log(16) equals scaling the query rows of c_attn.
    scaled = copy.deepcopy(plain)
    factor = math.log(24) / math.log(16)
    scaled.transformer.h[0].attn.c_attn.weight[:64] *= factor
    scaled.transformer.h[0].attn.c_attn.bias[:64] *= factor
    assert torch.allclose(logn(long).logits[:, -1], scaled(long).logits[:, -1], atol=1e-5)
    assert (logn(long).logits[:, -1] - plain(long).logits[:, -1]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# Forward variants, training, precision


@torch.no_grad()
def test_inputs_embeds_and_output_attentions_paths(model):
    x = inputs()
    reference = model(x)
    assert torch.allclose(model(inputs_embeds=model.get_input_embeddings()(x)).logits, reference.logits, atol=1e-6)
    explicit = model(x, output_attentions=True, output_hidden_states=True)
    assert torch.allclose(explicit.logits, reference.logits, atol=1e-5)
    assert len(explicit.attentions) == 3 and explicit.attentions[0].shape == (2, 4, 9, 9)
    assert len(explicit.hidden_states) == 4
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


@torch.no_grad()
def test_loss_is_shifted_cross_entropy_ignoring_minus_100(model):
    x = inputs()
    labels = x.clone()
    labels[1, :5] = -100
    out = model(x, labels=labels)
    expected = nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, TINY["vocab_size"]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    model = tiny_model(attn_dropout_prob=0.1, emb_dropout_prob=0.1)  # dropout must replay identically
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
    assert model.transformer.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert torch.equal(plain_loss, ckpt_loss)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_half_precision_forward_is_close_to_fp32(checkpoint, model, dtype, tolerance):
    half = QWenLMHeadModel.from_pretrained(checkpoint[0], torch_dtype=dtype).eval()
    assert half.lm_head.weight.dtype == dtype
    x = inputs(length=12)
    with torch.no_grad():
        reference, low = model(x).logits, half(x).logits
    assert low.dtype == dtype  # the official QWen keeps logits in the model dtype
    assert (low.float() - reference).abs().max().item() < tolerance * reference.abs().max().item()


@torch.no_grad()
def test_each_decoder_layer_ffn_is_the_mlp_attribute(model):
    assert model.get_decoder_layers() is model.transformer.h
    assert model.get_input_embeddings() is model.transformer.wte
    swapped, zeroed = copy.deepcopy(model), copy.deepcopy(model)

    class Zero(nn.Module):
        def forward(self, hidden_states):
            return torch.zeros_like(hidden_states)

    for layer, zero_layer in zip(swapped.get_decoder_layers(), zeroed.get_decoder_layers()):
        layer.mlp = Zero()
        zero_layer.mlp.c_proj.weight.zero_()
    x = inputs()
    assert torch.allclose(swapped(x).logits, zeroed(x).logits, atol=1e-6)
    assert (swapped(x).logits - model(x).logits).abs().max() > 1e-2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kv_channels=8), "must equal hidden_size"),
        (dict(intermediate_size=255), "must be even"),
        (dict(rotary_pct=0.05), "rotary channels"),
        (dict(rotary_pct=0.0), "rotary_pct must be in"),
        (dict(scale_attn_weights=False), "scale_attn_weights=False is not supported"),
        (dict(use_cache_quantization=True), "not implemented"),
    ],
)
def test_bad_config_fails_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        QWenConfig(**dict(TINY, **overrides))


@torch.no_grad()
def test_partial_rotary_leaves_the_remaining_channels_unrotated():
    model = tiny_model(rotary_pct=0.5)
    assert model.transformer.rotary_emb.dim == 8
    q = torch.randn(1, 4, 5, 16)
    cos, sin = model.transformer.rotary_emb(torch.arange(5)[None])
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.equal(rotated[..., 8:], q[..., 8:])
    assert not torch.allclose(rotated[..., 1:, :8], q[..., 1:, :8])
    x = inputs()
    out = model(x, use_cache=True)
    step = model(inputs(2, 1, seed=9), past_key_values=out.past_key_values).logits
    full = model(torch.cat([x, inputs(2, 1, seed=9)], dim=1)).logits[:, -1:]
    assert torch.allclose(step, full, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Shared pieces (common.py)


def allowed(mask: torch.Tensor) -> torch.Tensor:
    return (mask == 0).int()


def test_attention_mask_causal_padding_past_and_sliding_window():
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask = build_attention_mask(padding, 2, 2, 3, torch.float32, torch.device("cpu"))
    assert mask.shape == (2, 1, 2, 5) and mask.dtype == torch.float32
    assert allowed(mask)[0, 0].tolist() == [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert allowed(mask)[1, 0].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert mask.min().item() == torch.finfo(torch.float32).min
    window = build_attention_mask(None, 1, 5, 0, torch.bfloat16, torch.device("cpu"), sliding_window=2)
    assert window.dtype == torch.bfloat16
    assert allowed(window)[0, 0].tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    decode = build_attention_mask(None, 1, 1, 4, torch.float32, torch.device("cpu"), sliding_window=3)
    assert allowed(decode)[0, 0].tolist() == [[0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match=r"\[batch, past \+ new tokens\] = \[2, 5\]"):
        build_attention_mask(padding[:, :4], 2, 2, 3, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        build_attention_mask(None, 1, 2, 0, torch.float32, torch.device("cpu"), sliding_window=0)


def test_fully_masked_rows_stay_finite_and_sdpa_equals_explicit_attention():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    padding = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask = build_attention_mask(padding, 2, 4, 2, torch.float32, torch.device("cpu"))
    fused, none = attention_core(q, k, v, mask)
    explicit, weights = attention_core(q, k, v, mask, output_attentions=True)
    assert none is None and fused.shape == (2, 4, 24)
    assert torch.isfinite(fused).all() and torch.allclose(fused, explicit, atol=1e-6)
    scores = (q @ k.transpose(2, 3)) / math.sqrt(8) + mask
    assert torch.allclose(weights, scores.softmax(-1), atol=1e-6)
    half, _ = attention_core(q.half() * 300, k.half() * 300, v.half(), mask.half(), upcast=True)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_a_mask_is_built_only_where_plain_causal_attention_differs():
    cpu, f32 = torch.device("cpu"), torch.float32
    ones = torch.ones(2, 5)
    right, left = torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    # Flash-eligible (None): no padding, right padding in a whole-sequence pass, a single decoding step.
    assert attention_mask_if_needed(None, 2, 5, 0, f32, cpu) is None
    assert attention_mask_if_needed(ones, 2, 5, 0, f32, cpu) is None
    assert attention_mask_if_needed(right, 2, 5, 0, f32, cpu) is None
    assert attention_mask_if_needed(ones, 2, 1, 4, f32, cpu) is None
    assert attention_mask_if_needed(None, 1, 4, 0, f32, cpu, sliding_window=4) is None  # the window covers all
    # A mask: left padding, padding in the cache, a chunk after cached tokens, a window that acts.
    needed = [(left, 2, 5, 0, None), (right, 2, 1, 4, None), (ones, 2, 2, 3, None), (None, 1, 5, 0, 4)]
    for mask, batch, new, past, window in needed:
        built = attention_mask_if_needed(mask, batch, new, past, f32, cpu, sliding_window=window)
        expected = build_attention_mask(mask, batch, new, past, f32, cpu, sliding_window=window)
        torch.testing.assert_close(built, expected)
    with pytest.raises(ValueError, match=r"\[batch, past \+ new tokens\] = \[2, 6\]"):
        attention_mask_if_needed(ones, 2, 1, 5, f32, cpu)


def test_no_mask_means_causal_and_equals_the_explicit_mask_on_real_tokens():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    right = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    explicit, _ = attention_core(q, k, v, build_attention_mask(right, 2, 5, 0, torch.float32, torch.device("cpu")))
    causal, none = attention_core(q, k, v, None)
    weights = attention_core(q, k, v, None, output_attentions=True)[1]
    assert none is None and torch.all(weights.triu(1) == 0)
    real = right.bool()
    torch.testing.assert_close(causal[real], explicit[real], rtol=0, atol=1e-6)
    step, _ = attention_core(q[:, :, -1:], k, v, None)  # one query sees every key
    torch.testing.assert_close(step, causal[:, -1:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention_core(q[:, :, 3:], k, v, None)


def test_repeat_kv_matches_repeat_interleave():
    kv = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(kv, 4), kv.repeat_interleave(4, dim=1))
    assert repeat_kv(kv, 1) is kv


def test_rotary_is_relative_and_supports_per_sample_ntk():
    rotary = RotaryEmbedding(8, base=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        cos_m, sin_m = rotary(torch.tensor([[m]]))
        cos_n, sin_n = rotary(torch.tensor([[n]]))
        return (apply_rotary_pos_emb(q, q, cos_m, sin_m)[0] * apply_rotary_pos_emb(k, k, cos_n, sin_n)[1]).sum()

    assert torch.allclose(score(7, 3), score(104, 100), atol=1e-4)
    cos, _ = rotary(torch.arange(4)[None].expand(2, -1), ntk_alpha=torch.tensor([1.0, 3.0]))
    rebased = RotaryEmbedding(8, base=10000.0 * 3.0 ** (8 / 6))
    assert torch.allclose(cos[0], rotary(torch.arange(4)[None])[0][0])
    assert torch.allclose(cos[1], rebased(torch.arange(4)[None])[0][0], atol=1e-6)
    linear = RotaryEmbedding(8, scaling_factor=4.0)
    assert torch.allclose(linear(torch.tensor([[8]]))[0], rotary(torch.tensor([[2]]))[0])
    assert dynamic_ntk_alpha(100, 128, 2.0) == 1.0 and dynamic_ntk_alpha(256, 128, 2.0) == 3.0
    with pytest.raises(ValueError, match="positive even number"):
        RotaryEmbedding(7)


def test_rmsnorm_swiglu_and_loss_formulas():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 3, 6)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16

    mlp = SwiGLUMLP(6, 10)
    assert set(dict(mlp.named_parameters())) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    expected = mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert torch.allclose(mlp(x), expected)
    with pytest.raises(ValueError, match="unknown hidden_act"):
        SwiGLUMLP(6, 10, hidden_act="nope")

    logits, labels = torch.randn(2, 4, 7), torch.tensor([[1, 2, -100, 3], [-100, 5, 6, 0]])
    kept = [(0, 0, 2), (0, 2, 3), (1, 0, 5), (1, 1, 6), (1, 2, 0)]
    manual = torch.stack([-logits[b, t].log_softmax(-1)[y] for b, t, y in kept]).mean()
    assert torch.allclose(causal_lm_loss(logits, labels), manual, atol=1e-6)


def test_generation_hooks_positions_from_the_padding_mask():
    hooks = DecoderGenerationHooks()
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    first = hooks.prepare_inputs_for_generation(ids, attention_mask=mask, use_cache=True)
    assert first["position_ids"].tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]
    assert torch.equal(first["input_ids"], ids) and first["past_key_values"] is None
    past = ((torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2)),)
    longer, longer_mask = torch.cat([ids, ids[:, -1:]], 1), torch.cat([mask, mask[:, -1:]], 1)
    step = hooks.prepare_inputs_for_generation(longer, past_key_values=past, attention_mask=longer_mask)
    assert step["input_ids"].tolist() == [[6], [10]] and step["position_ids"].tolist() == [[2], [4]]
    embeds = torch.randn(2, 4, 3)
    assert "inputs_embeds" in hooks.prepare_inputs_for_generation(ids, inputs_embeds=embeds, attention_mask=mask)
    reordered = DecoderGenerationHooks._reorder_cache(
        ((torch.arange(2.0)[:, None], torch.arange(2.0)[:, None]),), torch.tensor([1, 1])
    )
    assert reordered[0][0].flatten().tolist() == [1.0, 1.0]
