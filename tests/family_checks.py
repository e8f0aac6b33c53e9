"""Set-up and checks shared by the per-family test files (test_llava_<family>.py, test_backbone_<family>.py).

Each family file keeps its own test functions and calls these for the parts that are the same in every family;
the assertions live here once, with the tolerances the family tests used.
"""

import copy
import json

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.moe import MoEBlock, build_moe_settings

import tiny_llava

# ----------------------------------------------------------------------------------------------- backbones


LLAMA_LAYER_KEYS = [
    "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.weight", "self_attn.v_proj.weight",
]


def llama_layout_keys(num_layers):
    """Weight names of the Llama layout (Llama-2, Vicuna, Mistral: their pytorch_model.bin.index.json, less
    4.31's rotary buffers) for `num_layers` layers."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    return keys | {f"model.layers.{i}.{name}" for i in range(num_layers) for name in LLAMA_LAYER_KEYS}


def randomize_parameters(model, seed=0, scale=0.15):
    """Every parameter of `model` random, norms around 1 (so each matters to a parity check); returns it in eval."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(1.0 + noise if "norm" in name else noise)
    return model.eval()


def write_official_folder(folder, config_dict, state):
    """An official-layout model folder: `config_dict` as config.json and `state` as model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return state


def pad_batch(samples, side):
    """1-D id tensors padded with 0 to the longest on `side` ("left" or "right"): `(ids, attention_mask)`."""
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        span = slice(width - len(sample), width) if side == "left" else slice(0, len(sample))
        ids[row, span], mask[row, span] = sample, 1
    return ids, mask


def logits_through_cache(model, ids, chunk_sizes):
    """`ids` fed in chunks of `chunk_sizes` through the KV cache (all-ones mask so far): `(logits, past)`."""
    past, start, pieces = None, 0, []
    for size in chunk_sizes:
        mask = torch.ones(ids.shape[0], start + size, dtype=torch.long)
        out = model(ids[:, start : start + size], attention_mask=mask, past_key_values=past, use_cache=True)
        past, start = out.past_key_values, start + size
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1), past


def greedy_by_full_forwards(model, prompt, steps):
    """Greedy decoding of a [1, T] prompt recomputed from scratch (no cache) for `steps` tokens."""
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq


def assert_mlp_is_the_only_ffn(model, ids, num_layers):
    """Wrapping each decoder layer's `mlp` changes nothing and each wrapper runs once per forward: swapping
    `mlp` for a MoE block is all a conversion needs."""
    expected = model(ids).logits

    class Recording(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, hidden_states):
            self.calls += 1
            return self.inner(hidden_states)

    for layer in model.get_decoder_layers():
        layer.mlp = Recording(layer.mlp)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert [layer.mlp.calls for layer in model.get_decoder_layers()] == [1] * num_layers


def assert_gradient_checkpointing_changes_nothing(model, ids, labels):
    """A checkpointed copy of `model` (train mode, no dropout) gives the same loss and grads; returns the loss."""

    def loss_and_grads(m):
        m.zero_grad()
        loss = m(ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    plain_loss, plain_grads = loss_and_grads(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.model.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(checkpointed)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in plain_grads.values())
    return plain_loss


def assert_half_precision_forward_close(model, ids, dtype):
    """A `dtype` copy of `model` keeps its cache in `dtype` and its logits (the second row left-padded by 3)
    within 5% of the fp32 range."""
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    reference = model(ids, attention_mask=mask).logits
    half = copy.deepcopy(model).to(dtype)
    out = half(ids, attention_mask=mask, use_cache=True)
    assert out.past_key_values[0][0].dtype == dtype
    real = mask.bool()
    error = (out.logits.float() - reference).abs()[real].max()
    assert error < 0.05 * reference[real].abs().max(), (dtype, error)


# ----------------------------------------------------------------------------------------------- LLaVA

# The tiny CLIP tower (32 px, patch 8) gives 16 patch features, each one image token in the LLaVA sequence.
NUM_IMAGE_TOKENS = 16


def llava_from_backbone(llava_class, backbone_dir, tower_dir):
    """A dense LLaVA model loaded from an official backbone folder, with the tiny tower attached (eval mode)."""
    model = llava_class.from_pretrained(backbone_dir)
    model.get_model().initialize_vision_modules(tiny_llava.tiny_model_args(tower_dir))
    return model.eval()


def upcycle(moe_class, dense_model, **moe_kwargs):
    """A MoE copy of `dense_model` (stage 3): experts upcycled from its FFNs; `moe_kwargs` go to
    `build_moe_settings`."""
    model = moe_class(moe_class.config_class.from_dict(dense_model.config.to_dict()))
    model.load_state_dict(dense_model.state_dict())
    model.initialize_moe_modules(build_moe_settings(model.config.num_hidden_layers, **moe_kwargs))
    return model.eval()


def assert_registered(fields, *registrations):
    """Each `(model_type, config_class, model_class)`: the Auto classes resolve the type and the config to them."""
    for model_type, config_class, model_class in registrations:
        assert type(AutoConfig.for_model(model_type)) is config_class
        assert type(AutoModelForCausalLM.from_config(config_class(**fields))) is model_class


def assert_moe_gives_dense_logits(moe, dense, prompt, vocab_size):
    """The upcycled model reproduces the dense logits over the image-spliced sequence."""
    pixels = tiny_llava.random_pixels(1)
    expected = dense(prompt, images=pixels).logits
    assert expected.shape == (1, prompt.shape[1] - 1 + NUM_IMAGE_TOKENS, vocab_size)
    torch.testing.assert_close(moe(prompt, images=pixels).logits, expected, rtol=1e-5, atol=1e-5)


def assert_cached_generation_equals_uncached(model, prompt):
    """Greedy generation of 8 tokens for one image prompt is the same with and without the KV cache."""
    pixels = tiny_llava.random_pixels(1)
    kwargs = dict(images=pixels, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert cached.shape == (1, prompt.shape[1] + 8)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))


def assert_left_padded_batch_generation_matches_singles(model, prompts):
    """Greedy generation for a left-padded batch of image prompts (1-D id tensors) gives each prompt's own
    continuation."""
    ids, mask = pad_batch(prompts, "left")
    length = ids.shape[1]
    pixels = tiny_llava.random_pixels(len(prompts))
    kwargs = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    model.config.tokenizer_padding_side = "left"
    try:
        batch = model.generate(ids, attention_mask=mask, images=pixels, **kwargs)
        singles = [model.generate(p[None], images=pixels[i:i + 1], **kwargs) for i, p in enumerate(prompts)]
    finally:
        model.config.tokenizer_padding_side = None
    for i, single in enumerate(singles):
        assert batch[i, length:].tolist() == single[0, len(prompts[i]):].tolist()


@torch.no_grad()
def assert_dense_and_stage3_checkpoints_round_trip(dense, moe_class, model_type, folder, prompt, train_modules,
                                                   moe_layers_idx):
    """A stage-2 (dense) checkpoint of type `model_type` reloads through AutoModelForCausalLM with the same
    logits; a dense-mode MoE built on it, with perturbed experts, saves as a "moe_" + `model_type` stage-3
    checkpoint that reloads exactly too."""
    pixels = tiny_llava.random_pixels(1)
    stage2 = folder / "stage2"
    dense.save_pretrained(stage2)
    assert json.loads((stage2 / "config.json").read_text())["model_type"] == model_type
    reloaded, info = AutoModelForCausalLM.from_pretrained(stage2, output_loading_info=True)
    assert type(reloaded) is type(dense) and info["missing_keys"] == []
    torch.testing.assert_close(reloaded.eval()(prompt, images=pixels).logits, dense(prompt, images=pixels).logits,
                               rtol=0, atol=0)

    model = moe_class.from_pretrained(stage2).eval()
    model.initialize_moe_modules(build_moe_settings(model.config.num_hidden_layers, num_experts=4,
                                                    moe_mode="dense", top_k_experts=2, train_modules=train_modules))
    tiny_llava.perturb_experts(model)  # experts and routers that differ, so the round trip is meaningful
    before = model(prompt, images=pixels).logits
    stage3 = folder / "stage3"
    model.save_pretrained(stage3)
    config = json.loads((stage3 / "config.json").read_text())
    assert config["model_type"] == "moe_" + model_type and config["moe"]["moe_layers_idx"] == moe_layers_idx
    loaded, info = AutoModelForCausalLM.from_pretrained(stage3, output_loading_info=True)
    assert type(loaded) is moe_class
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert all(isinstance(layer.mlp, MoEBlock) for layer in loaded.get_decoder_layers())
    torch.testing.assert_close(loaded.eval()(prompt, images=pixels).logits, before, rtol=0, atol=0)
