"""LoRA on the five families' LLaVA and MoE-LLaVA models, in process: the default targets are exactly the
decoder layers' attention and FFN Linears (never the tower, the projector, lm_head or a router), every expert
gets its own adapter, the trainable parameters are exactly the adapters + routers + projector, merged and
unmerged logits agree, saving and loading round-trips (biases included), and the LoRA flags refuse what
they cannot do. The stage-script runs are in test_lora_stages.py."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn

import tiny_llava
from moellava.constants import IMAGE_TOKEN_INDEX as IMG
from moellava.model import (LlavaLlamaConfig, LlavaLlamaForCausalLM, LlavaMistralConfig, LlavaMistralForCausalLM,
                            LlavaPhiConfig, LlavaPhiForCausalLM, LlavaQWenConfig, LlavaQWenForCausalLM,
                            LlavaStablelmConfig, LlavaStablelmForCausalLM, MoELLaVALlamaForCausalLM,
                            MoELLaVAMistralForCausalLM, MoELLaVAPhiForCausalLM, MoELLaVAQWenForCausalLM,
                            MoELLaVAStablelmForCausalLM)
from moellava.model import lora
from moellava.model.moe import moe_blocks, router_parameter_names
from moellava.tokenization import FAMILIES
from moellava.train import train as train_module
from moellava.train.train import add_lora_adapters, parse_arguments, set_trainable

import family_checks
from test_backbone_mistral import TINY as MISTRAL
from test_backbone_phi import TINY as PHI
from test_backbone_qwen import TINY as QWEN
from test_backbone_stablelm import TINY as STABLELM

LLAMA = dict(tiny_llava.TINY_LLAMA, vocab_size=128, num_hidden_layers=2)
# family -> (dense class, config class, MoE class, backbone fields, the Linears of one decoder layer)
FAMILY_MODELS = {
    "llama": (LlavaLlamaForCausalLM, LlavaLlamaConfig, MoELLaVALlamaForCausalLM, LLAMA,
              {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}),
    "mistral": (LlavaMistralForCausalLM, LlavaMistralConfig, MoELLaVAMistralForCausalLM, MISTRAL,
                {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"}),
    "stablelm": (LlavaStablelmForCausalLM, LlavaStablelmConfig, MoELLaVAStablelmForCausalLM, STABLELM,
                 {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"}),
    "qwen": (LlavaQWenForCausalLM, LlavaQWenConfig, MoELLaVAQWenForCausalLM, dict(QWEN, seq_length=64),
             {"attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"}),
    "phi": (LlavaPhiForCausalLM, LlavaPhiConfig, MoELLaVAPhiForCausalLM, PHI,
            {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"}),
}
PROMPT = torch.tensor([[1, 5, 6, IMG, 7, 8, 9, 10]])
EXPERT = re.compile(r"deepspeed_moe\.experts\.deepspeed_experts\.\d+\.")


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return tiny_llava.build_tiny_clip_tower(tmp_path_factory.mktemp("clip"))


def build(family, tower, moe=True, seed=0):
    """A tiny LLaVA model of `family` with the tiny tower (eval mode), upcycled to 4 experts on every other
    layer when `moe`."""
    dense_class, config_class, moe_class, fields, _ = FAMILY_MODELS[family]
    fields = {k: v for k, v in fields.items() if k not in ("model_type", "auto_map", "architectures", "_name_or_path")}
    torch.manual_seed(seed)
    model = dense_class(config_class(**fields))
    model.get_model().initialize_vision_modules(tiny_llava.tiny_model_args(tower))
    if moe:
        model = family_checks.upcycle(moe_class, model, num_experts=4, moe_mode="sparse", top_k_experts=2)
    return model.eval()


def lora_args(**overrides):
    fields = dict(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none", lora_target=None,
                  lora_weight_path="", freeze_mm_mlp_adapter=False)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def model_args(moe=True, path="base"):
    return SimpleNamespace(model_name_or_path=path, moe_enable=moe, tune_mm_mlp_adapter=False, freeze_backbone=False,
                           mm_use_im_start_end=False)


def with_lora(family, tower, moe=True, **overrides):
    model = build(family, tower, moe)
    training = lora_args(**overrides)
    add_lora_adapters(model, model_args(moe), training, family)
    set_trainable(model, model_args(moe), training, None)
    return model


def randomize_adapters(model, seed=1):
    """LoRA B starts at zero (the adapted model is the base model): give every adapter an effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_default_targets_are_every_llm_linear_and_nothing_else(family, tower):
    model = build(family, tower)
    layer_linears = FAMILY_MODELS[family][4]
    selected = lora.lora_target_modules(model, FAMILIES[family].lora_target)
    layers = model.get_decoder_layers()
    blocks = {block.layer_idx for block in moe_blocks(model)}
    assert blocks == set(range(0, len(layers), 2))
    prefix = next(name for name, module in model.named_modules() if module is layers)
    expected = set()
    for i in range(len(layers)):
        for inner in layer_linears:
            if i in blocks and inner.startswith("mlp."):
                ffn = inner[len("mlp."):]
                expected |= {f"{prefix}.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.{ffn}" for j in range(4)}
            else:
                expected.add(f"{prefix}.{i}.{inner}")
    assert set(selected) == expected
    # The Linears left out: the tower's and projector's, lm_head, the routers.
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    rest = linears - expected
    assert all(".image_tower." in name or ".mm_projector." in name or name == "lm_head"
               or name.endswith("deepspeed_moe.gate.wg") for name in rest), sorted(rest)
    assert any(".image_tower." in name for name in rest) and any(name.endswith(".wg") for name in rest)

    lora.add_lora(model, lora.make_lora_config(model, r=4, alpha=8, dropout=0.0, bias="none",
                                               targets=FAMILIES[family].lora_target, base_model_name_or_path=None))
    adapted = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert adapted == expected  # peft applied the pattern to exactly these modules


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_merged_logits_equal_unmerged_logits(family, tower):
    model = with_lora(family, tower)
    randomize_adapters(model)
    pixels = tiny_llava.random_pixels(1)
    base = build(family, tower)
    with torch.no_grad():
        base_logits = base(PROMPT, images=pixels).logits
        unmerged = model(PROMPT, images=pixels).logits
        assert (unmerged - base_logits).abs().max() > 1e-2  # the adapters matter
        merged_model = lora.merge_lora(model)
        assert not lora.has_lora(merged_model) and not hasattr(merged_model, "peft_config")
        assert set(merged_model.state_dict()) == set(base.state_dict())  # the plain model's layout
        torch.testing.assert_close(merged_model(PROMPT, images=pixels).logits, unmerged, rtol=0, atol=1e-5)


def lora_parameter_count(model, r):
    return sum(r * (module.in_features + module.out_features) for module in model.modules()
               if isinstance(module, LoraLayer))


def test_stage3_trains_exactly_the_expert_adapters_the_routers_and_the_projector(tower):
    model = with_lora("llama", tower, lora_r=4)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    routers = set(router_parameter_names(model))
    projector = {name for name in trainable if ".mm_projector." in name}
    adapters = {name for name in trainable if ".lora_" in name}
    assert trainable == adapters | routers | projector and routers <= trainable and projector
    count = sum(param.numel() for name, param in model.named_parameters() if name in trainable)
    projector_count = sum(p.numel() for p in model.get_model().mm_projector.parameters())
    router_count = 1 * 4 * 64  # 1 MoE layer (layer 0 of 2), 4 experts, hidden 64
    assert count == lora_parameter_count(model, 4) + router_count + projector_count
    # 2 layers x (4 attention + 3 FFN) Linears, of which layer 0's 3 FFN are 4 experts x 3: 32 adapters.
    assert sum(isinstance(module, LoraLayer) for module in model.modules()) == 4 * 2 + 3 + 4 * 3
    # Every expert has its own adapter (peft made them after upcycling, each initialised apart).
    a = [dict(expert.named_parameters())["up_proj.lora_A.default.weight"]
         for expert in moe_blocks(model)[0].deepspeed_moe.experts.deepspeed_experts]
    assert len({id(x) for x in a}) == 4 and not any(torch.equal(a[0], x) for x in a[1:])
    # The adapters inside experts are expert parameters for DeepSpeed (reduced over the expert group).
    for name, param in model.named_parameters():
        if EXPERT.search(name):
            assert param.allreduce is False and param.group_name == "ep_size_1", name
    # Nothing else trains: base Linears, embeddings, norms, lm_head, the tower.
    assert not any(param.requires_grad for name, param in model.named_parameters()
                   if ".base_layer." in name or "image_tower" in name or "embed_tokens" in name or "lm_head" in name)


def test_dense_stage2_trains_the_adapters_and_the_projector(tower):
    model = with_lora("phi", tower, moe=False)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {name for name in trainable if ".lora_" in name or ".mm_projector." in name}
    count = sum(p.numel() for name, p in model.named_parameters() if name in trainable)
    assert count == lora_parameter_count(model, 4) + sum(p.numel() for p in model.get_model().mm_projector.parameters())


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_save_and_load_round_trip(tower, tmp_path, bias):
    model = with_lora("phi", tower, lora_bias=bias)
    randomize_adapters(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ".lora_" not in name:
                param.add_(0.1)  # projector, routers and (lora_only) the adapted Linears' biases "trained"
    lora.save_lora_checkpoint(model, str(tmp_path))
    config = json.loads((tmp_path / lora.ADAPTER_CONFIG_FILE).read_text())
    assert config["bias"] == bias and config["r"] == 4 and config["base_model_name_or_path"] == "base"

    fresh = with_lora("phi", tower, lora_bias=bias)
    loaded = lora.load_lora_weights(fresh, str(tmp_path))
    # Every trained tensor is saved: the adapters and, with "all", every bias in the adapter file (peft's
    # layout); the rest in the non-LoRA file (peft 0.13.2 does not save the adapted Linears' biases under
    # "lora_only", so they land there). "none" trains no bias.
    in_adapter = {key[len(lora.PEFT_PREFIX):] for key in load_file(str(tmp_path / lora.ADAPTER_WEIGHTS_FILE))}
    trained = {name for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name}
    assert loaded | (in_adapter & trained) == trained and not loaded & in_adapter
    assert any(name.endswith(".base_layer.bias") for name in trained) == (bias != "none")
    state, fresh_state = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(state[key], fresh_state[key]) for key in state)
    pixels = tiny_llava.random_pixels(1)
    with torch.no_grad():
        torch.testing.assert_close(fresh(PROMPT, images=pixels).logits, model(PROMPT, images=pixels).logits,
                                   rtol=0, atol=0)


def test_lora_weight_path_starts_the_adapters_from_a_checkpoint(tower, tmp_path):
    model = with_lora("llama", tower)
    randomize_adapters(model)
    lora.save_lora_checkpoint(model, str(tmp_path))
    started = with_lora("llama", tower, lora_weight_path=str(tmp_path))
    assert all(torch.equal(value, started.state_dict()[key]) for key, value in model.state_dict().items())
    with pytest.raises(ValueError, match="has r=4, this run 8"):
        with_lora("llama", tower, lora_r=8, lora_alpha=16, lora_weight_path=str(tmp_path))
    # Loading into a model with other adapters (a resume with other flags) names the mismatch.
    with pytest.raises(ValueError, match="does not fit this model.*size mismatch"):
        lora.load_lora_weights(with_lora("llama", tower, lora_r=8, lora_alpha=16), str(tmp_path))
    fewer = with_lora("llama", tower, lora_target=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    with pytest.raises(ValueError, match=r"does not fit this model: .* missing \[\], unexpected \['model.layers.0.self_attn.k_proj"):
        lora.load_lora_weights(fewer, str(tmp_path))
    with pytest.raises(ValueError, match="pass the same --lora_target"):
        with_lora("llama", tower, lora_target=["q_proj", "up_proj", "gate_proj", "down_proj"],
                  lora_weight_path=str(tmp_path))


def test_bad_targets_are_refused_with_the_names_to_use(tower):
    model = build("qwen", tower)
    with pytest.raises(ValueError, match=r"--lora_target q_proj matches no Linear .* \['attn.c_attn', 'attn.c_proj'"):
        lora.lora_target_modules(model, ["c_attn", "q_proj"])
    with pytest.raises(ValueError, match="routers .* always train in full"):
        lora.lora_target_modules(model, ["c_attn", "wg"])
    # Qwen's "mlp.c_proj" selects the FFN's projection only, attention's c_proj stays out.
    selected = lora.lora_target_modules(model, ["mlp.c_proj", "mlp.w1", "mlp.w2"])
    assert selected and all(".mlp." in name and ".attn." not in name for name in selected)
    with pytest.raises(ValueError, match="adapts no FFN Linear of the experts of MoE layers \\[0, 2\\]"):
        with_lora("qwen", tower, lora_target=["c_attn"])


@pytest.mark.parametrize("flags,message", [
    (["--lora_enable", "True", "--train_modules", "fc1", "wg"], "cannot be combined with --train_modules"),
    (["--lora_enable", "True", "--tune_mm_mlp_adapter", "True"], "cannot be combined with --tune_mm_mlp_adapter"),
    (["--lora_enable", "True", "--mm_use_im_start_end", "True"], "cannot be combined with --mm_use_im_start_end"),
    (["--lora_enable", "True", "--freeze_backbone", "True"], "cannot be combined with --freeze_backbone"),
    (["--lora_enable", "True", "--lora_r", "0"], "--lora_r must be at least 1"),
    (["--lora_enable", "True", "--lora_weight_path", "/nonexistent"], "no adapter_config.json there"),
    (["--lora_target", "q_proj"], "--lora_target only apply to LoRA training: add --lora_enable True"),
    (["--lora_enable", "True", "--lora_bias", "some"], "invalid choice"),
])
def test_lora_flags_refuse_what_they_cannot_do(tmp_path, flags, message, capsys):
    argv = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", str(tmp_path)] + flags
    with pytest.raises((ValueError, SystemExit)):
        parse_arguments(argv)
    if message == "invalid choice":
        assert message in capsys.readouterr().err
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_arguments(argv)


def test_a_lora_checkpoint_as_the_model_to_train_names_the_merge_command(tower, tmp_path):
    model = with_lora("llama", tower)
    lora.save_lora_checkpoint(model, str(tmp_path))
    args, training = SimpleNamespace(model_name_or_path=str(tmp_path)), SimpleNamespace(cache_dir=None)
    with pytest.raises(ValueError, match=r"is a LoRA checkpoint .* scripts/merge_lora_weights.py --model-path"):
        train_module.load_model(args, training)
    assert os.path.isfile(tmp_path / lora.NON_LORA_FILE)


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(tower):
    """The recipes train with --gradient_checkpointing: with frozen embeddings and frozen base Linears the
    adapters, routers and projector still get their gradients (train.py enables input grads), unchanged."""
    model = with_lora("llama", tower)
    randomize_adapters(model)
    model.train()
    pixels = tiny_llava.random_pixels(1)
    labels = PROMPT.clone()
    labels[:, :4] = -100  # up to the image; the model masks the image tokens it splices in

    def gradients():
        model.zero_grad(set_to_none=True)
        model(PROMPT, labels=labels, images=pixels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)
