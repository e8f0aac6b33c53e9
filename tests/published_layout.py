"""Tiny checkpoints in the layout the original MoE-LLaVA publishes, written from its key names and config
fields (spec sections 5, 6 and 9, the published configs excerpted in ../shared/reference/official/moe-llava/),
never by saving this project's classes: the backbone under its official names (test_backbone_<family>), the
MoE layers as DeepSpeed-MoE names them (`mlp.deepspeed_moe.gate.wg.weight`,
`mlp.deepspeed_moe.experts.deepspeed_experts.{j}.*`), the projector as `mm_projector.image_spatial_proj.*`,
the image tower (when stored) as `image_tower.image_tower.vision_model.*` with SigLIP's pooling head, no
`lm_head.bias` for Phi, and config.json with the fields the original writes (it names the tower, not the
tower's own configs). Also the official SigLIP folder layout (a two-tower SiglipModel, as
google/siglip-so400m-patch14-384 ships), shrunk.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import test_backbone_phi
import test_backbone_qwen
import test_backbone_stablelm
import tiny_llava

NUM_EXPERTS = 4
TOWER = tiny_llava.TINY_TOWER  # 32 px, patch 8: 16 patches; hidden 32
TOWER_HIDDEN = TOWER["hidden_size"]


def published_config(family: str, *, tower, vocab_size: int = 128, pad_token_id: int = 100) -> dict:
    """config.json of LanguageBind/MoE-LLaVA-<family> with the sizes shrunk and the tower path changed (None:
    no tower): the backbone's own fields (phi-2 names, QWen's remote-code names, StableLM's stablelm_epoch
    names), the `moe` dict, the mm_* fields, and auto_map naming the hub's remote code."""
    llava = {
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_projector_type": "mlp2x_gelu",
        "mm_hidden_size": TOWER_HIDDEN, "mm_image_tower": str(tower) if tower else None, "mm_projector_lr": None,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_video_tower": None,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "video_global_proj": False,
        "video_projector_type": "linear", "video_spatial_proj": False, "video_temproal_proj": False,
        "pad_token_id": pad_token_id, "vocab_size": vocab_size, "use_cache": True, "tie_word_embeddings": False,
    }
    moe = {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0, "moe_enable": True,
           "moe_mode": "sparse", "router_aux_loss_coef": 0.01, "top_k_experts": 2, "use_residual": False}
    if family == "phi":
        return {
            "_name_or_path": "./checkpoints/llavaphi-3b-other-384", "architectures": ["MoELLaVAPhiForCausalLM"],
            "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "microsoft/phi-2--configuration_phi.PhiConfig",
                         "AutoModelForCausalLM": "microsoft/phi-2--modeling_phi.PhiForCausalLM"},
            "bos_token_id": None, "embd_pdrop": 0.0, "eos_token_id": None, "hidden_act": "gelu_new",
            "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 256, "model_type": "moe_llava_phi",
            "moe": {**moe, "moe_layers_idx": [0, 2], "num_experts": [NUM_EXPERTS] * 2,
                    "train_modules": ["fc1", "fc2", "wg"]},
            "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 4,
            "partial_rotary_factor": 0.4, "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None,
            "rope_theta": 10000.0, "torch_dtype": "float16", "transformers_version": "4.37.0", **llava,
        }
    if family == "qwen":
        return {
            "_name_or_path": "./checkpoints/llavaqwen-2b-other", "architectures": ["MoELLaVAQWenForCausalLM"],
            "attn_dropout_prob": 0.0,
            "auto_map": {"AutoConfig": "Qwen/Qwen-1_8B--configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "Qwen/Qwen-1_8B--modeling_qwen.QWenLMHeadModel"},
            "bf16": True, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "hidden_size": 64,
            "initializer_range": 0.02, "intermediate_size": 256, "kv_channels": 16, "layer_norm_epsilon": 1e-06,
            "max_position_embeddings": 256, "model_type": "moe_llava_qwen",
            "moe": {**moe, "capacity_factor": 1.0, "moe_layers_idx": [0, 2], "num_experts": [NUM_EXPERTS] * 2,
                    "train_modules": ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"]},
            "no_bias": True, "num_attention_heads": 4, "num_hidden_layers": 3, "onnx_safe": None,
            "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 256,
            "softmax_in_fp32": False, "tokenizer_class": "QWenTokenizer", "use_dynamic_ntk": True,
            "use_flash_attn": False, "use_logn_attn": True, **llava,
        }
    if family == "stablelm":
        return {
            "_name_or_path": "./checkpoints/llavastablelm-2b-other", "architectures": ["MoELLaVAStablelmForCausalLM"],
            "auto_map": {
                "AutoConfig": "stabilityai/stablelm-2-1_6b--configuration_stablelm_epoch.StableLMEpochConfig",
                "AutoModelForCausalLM": "stabilityai/stablelm-2-1_6b--modeling_stablelm_epoch.StableLMEpochForCausalLM",
            },
            "bos_token_id": 100257, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 64,
            "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 256,
            "model_type": "moe_llava_stablelm",
            "moe": {**moe, "moe_layers_idx": [0], "num_experts": [NUM_EXPERTS],
                    "train_modules": ["gate_proj", "up_proj", "down_proj", "wg"]},
            "norm_eps": 1e-05, "num_attention_heads": 4, "num_heads": 4, "num_hidden_layers": 2,
            "num_key_value_heads": 4, "rope_pct": 0.25, "rope_theta": 10000, "rotary_scaling_factor": 1.0,
            "use_qkv_bias": True, **llava,
        }
    raise ValueError(f"no published MoE-LLaVA layout for {family!r}")


# Per family: where the decoder layers and the LLaVA modules live, and the FFN tensors an expert copies.
LAYOUT = {
    "phi": ("model.layers.", "model.", ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")),
    "qwen": ("transformer.h.", "transformer.", ("w1.weight", "w2.weight", "c_proj.weight")),
    "stablelm": ("model.layers.", "model.", ("gate_proj.weight", "up_proj.weight", "down_proj.weight")),
}


def _random(shapes: dict, generator: torch.Generator) -> dict:
    """Random tensors for `shapes`; norm weights around 1 so activations stay in range."""
    tensors = {}
    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator) * 0.1
        tensors[name] = tensor + 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight",
                                                       "ln_1.weight", "ln_2.weight", "ln_f.weight")) else tensor
    return tensors


def backbone_tensors(family: str, config: dict, seed: int) -> dict:
    """The dense backbone under its official names (phi-2's, QWen's, StableLM-2's)."""
    if family == "stablelm":
        return test_backbone_stablelm.official_state_dict(config, seed=seed)
    module = test_backbone_phi if family == "phi" else test_backbone_qwen
    return _random(module.official_shapes(config), torch.Generator().manual_seed(seed))


def clip_tower_shapes() -> dict:
    """transformers' CLIPVisionModel weight names (`vision_model.*`), tiny sizes."""
    hidden, inter, patch = TOWER["hidden_size"], TOWER["intermediate_size"], TOWER["patch_size"]
    positions = (TOWER["image_size"] // patch) ** 2 + 1
    shapes = {
        "vision_model.embeddings.class_embedding": (hidden,),
        "vision_model.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
        "vision_model.embeddings.position_embedding.weight": (positions, hidden),
        "vision_model.pre_layrnorm.weight": (hidden,), "vision_model.pre_layrnorm.bias": (hidden,),
        "vision_model.post_layernorm.weight": (hidden,), "vision_model.post_layernorm.bias": (hidden,),
    }
    return {**shapes, **_encoder_shapes(hidden, inter)}


def siglip_tower_shapes() -> dict:
    """transformers' SiglipVisionModel weight names (`vision_model.*`), tiny sizes, with the attention-pooling
    head (`vision_model.head.*`) that SiglipVisionModel stores and LLaVA does not use."""
    hidden, inter, patch = TOWER["hidden_size"], TOWER["intermediate_size"], TOWER["patch_size"]
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
        "vision_model.embeddings.patch_embedding.bias": (hidden,),
        "vision_model.embeddings.position_embedding.weight": ((TOWER["image_size"] // patch) ** 2, hidden),
        "vision_model.post_layernorm.weight": (hidden,), "vision_model.post_layernorm.bias": (hidden,),
        "vision_model.head.probe": (1, 1, hidden),
        "vision_model.head.attention.in_proj_weight": (3 * hidden, hidden),
        "vision_model.head.attention.in_proj_bias": (3 * hidden,),
        "vision_model.head.attention.out_proj.weight": (hidden, hidden),
        "vision_model.head.attention.out_proj.bias": (hidden,),
        "vision_model.head.layernorm.weight": (hidden,), "vision_model.head.layernorm.bias": (hidden,),
        "vision_model.head.mlp.fc1.weight": (inter, hidden), "vision_model.head.mlp.fc1.bias": (inter,),
        "vision_model.head.mlp.fc2.weight": (hidden, inter), "vision_model.head.mlp.fc2.bias": (hidden,),
    }
    return {**shapes, **_encoder_shapes(hidden, inter)}


def _encoder_shapes(hidden: int, inter: int) -> dict:
    shapes = {}
    for i in range(TOWER["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({p + f"self_attn.{proj}.weight": (hidden, hidden), p + f"self_attn.{proj}.bias": (hidden,)})
        shapes.update({
            p + "layer_norm1.weight": (hidden,), p + "layer_norm1.bias": (hidden,),
            p + "layer_norm2.weight": (hidden,), p + "layer_norm2.bias": (hidden,),
            p + "mlp.fc1.weight": (inter, hidden), p + "mlp.fc1.bias": (inter,),
            p + "mlp.fc2.weight": (hidden, inter), p + "mlp.fc2.bias": (hidden,),
        })
    return shapes


def write_official_siglip_folder(folder: Path, seed: int = 0) -> str:
    """A google/siglip-so400m-patch14-384-style folder, shrunk: a two-tower SiglipModel config (model_type
    "siglip"), its preprocessor_config.json, and weights with the text tower, the vision tower and its head."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = {key: TOWER[key] for key in ("hidden_size", "image_size", "intermediate_size", "num_attention_heads",
                                          "num_hidden_layers", "patch_size")}
    config = {"architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip",
              "text_config": {"hidden_size": 32, "intermediate_size": 64, "model_type": "siglip_text_model",
                              "num_attention_heads": 2, "num_hidden_layers": 1},
              "torch_dtype": "float32", "transformers_version": "4.44.2",
              "vision_config": {**vision, "model_type": "siglip_vision_model"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    size = TOWER["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size}}, indent=2))
    generator = torch.Generator().manual_seed(seed)
    shapes = {**siglip_tower_shapes(), "text_model.embeddings.token_embedding.weight": (64, 32),
              "text_model.final_layer_norm.weight": (32,), "text_model.head.weight": (32, 32),
              "logit_scale": (1,), "logit_bias": (1,)}
    save_file(_random(shapes, generator), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def published_tensors(family: str, config: dict, *, tower_kind: str, tower_stored: bool, seed: int = 0) -> dict:
    """Every tensor a published MoE-LLaVA checkpoint of `family` stores, keyed as the original stores it."""
    layers, llava, ffn = LAYOUT[family]
    tensors = backbone_tensors(family, config, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if family == "phi":
        del tensors["lm_head.bias"]  # the original's LLaVA-Phi head has no bias
    for layer in config["moe"]["moe_layers_idx"]:
        prefix = f"{layers}{layer}.mlp."
        dense = {name: tensors.pop(prefix + name) for name in ffn}
        tensors[prefix + "deepspeed_moe.gate.wg.weight"] = torch.randn(NUM_EXPERTS, config["hidden_size"],
                                                                       generator=generator) * 0.1
        for expert in range(NUM_EXPERTS):  # trained experts differ from each other
            for name, value in dense.items():
                noise = torch.randn(value.shape, generator=generator) * 0.02
                tensors[f"{prefix}deepspeed_moe.experts.deepspeed_experts.{expert}.{name}"] = value + noise
    hidden = config["hidden_size"]
    tensors.update(_random({
        llava + "mm_projector.image_spatial_proj.0.weight": (hidden, TOWER_HIDDEN),
        llava + "mm_projector.image_spatial_proj.0.bias": (hidden,),
        llava + "mm_projector.image_spatial_proj.2.weight": (hidden, hidden),
        llava + "mm_projector.image_spatial_proj.2.bias": (hidden,),
    }, generator))
    if tower_stored:
        shapes = clip_tower_shapes() if tower_kind == "clip" else siglip_tower_shapes()
        tensors.update({llava + "image_tower.image_tower." + name: value
                        for name, value in _random(shapes, generator).items()})
    return tensors


def write_published_checkpoint(folder: Path, family: str, *, tower_kind: str, tower_dir: str, tower_stored: bool,
                               weights: str, tokenizer_dir: Path, vocab_size: int, pad_token_id: int,
                               seed: int = 0) -> dict:
    """A published-layout MoE-LLaVA checkpoint folder; returns the stored tensors.

    weights: "sharded-safetensors" (model-0000N-of-00002.safetensors + model.safetensors.index.json, as
    transformers' save_pretrained shards) or "pytorch_model.bin" (the original's MoE save, torch.save of the
    state dict). The tokenizer files of `tokenizer_dir` are copied beside them, as shipped."""
    folder.mkdir(parents=True, exist_ok=True)
    config = published_config(family, tower=tower_dir, vocab_size=vocab_size, pad_token_id=pad_token_id)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = published_tensors(family, config, tower_kind=tower_kind, tower_stored=tower_stored, seed=seed)
    if weights == "pytorch_model.bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    elif weights == "sharded-safetensors":
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        weight_map = {}
        for shard, keys in shards.items():
            save_file({key: tensors[key] for key in keys}, str(folder / shard), metadata={"format": "pt"})
            weight_map.update({key: shard for key in keys})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        raise ValueError(f"unknown weights format {weights!r}")
    shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True)
    return tensors
