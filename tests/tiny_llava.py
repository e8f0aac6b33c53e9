"""Tiny LLaVA building blocks for tests: towers, tokenizer, Llama LLaVA models (dense and MoE) and saved
checkpoints in a tmp folder. Everything is random, seeded and built locally in well under a second.

Reusable by any test: `import tiny_llava` (pytest puts tests/ on sys.path); subprocesses need
PYTHONPATH to include tests/.
"""

import os
from types import SimpleNamespace
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from moellava.model import LlavaLlamaConfig, LlavaLlamaForCausalLM, MoELLaVALlamaConfig, MoELLaVALlamaForCausalLM
from moellava.model.moe import build_moe_settings, moe_blocks
from moellava.model.multimodal_encoder import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
from moellava.tokenization import load_tokenizer
from moellava.tokenization.toy import build_toy_tokenizer

# A 4-layer Llama small enough for CPU tests; logits spread enough for stable greedy decoding.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    initializer_range=0.05,
)
TINY_TOWER = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)


def build_tiny_clip_tower(out_dir: str, *, seed: int = 0, **overrides) -> str:
    """A random CLIP vision model + CLIP image processor (32 px, patch 8: 16 patches + CLS)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**{**TINY_TOWER, **overrides})
    CLIPVisionModel(config).save_pretrained(out_dir, safe_serialization=True)
    size = config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        out_dir
    )
    return str(out_dir)


def build_tiny_siglip_tower(out_dir: str, *, seed: int = 0, **overrides) -> str:
    """A random SigLIP vision model + SigLIP image processor (32 px, patch 8: 16 patches, no CLS)."""
    torch.manual_seed(seed)
    config = SiglipVisionConfig(**{**TINY_TOWER, **overrides})
    SiglipVisionModel(config).save_pretrained(out_dir, safe_serialization=True)
    size = config.image_size
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(out_dir)
    return str(out_dir)


def build_tiny_llama_tokenizer(out_dir: str) -> str:
    """The toy Llama SentencePiece tokenizer folder (512 pieces, <unk>=0 <s>=1 </s>=2)."""
    return build_toy_tokenizer("llama", str(out_dir))


def tiny_model_args(tower_dir: str, **overrides) -> SimpleNamespace:
    """The vision fields of train.ModelArguments that `initialize_vision_modules` reads."""
    fields = dict(
        image_tower=str(tower_dir),
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_projector_type="mlp2x_gelu",
        pretrain_mm_mlp_adapter=None,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def tiny_llama_config(tokenizer, config_class=LlamaConfig, **overrides) -> LlamaConfig:
    fields = dict(TINY_LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    fields.update(overrides)
    return config_class(**fields)


def tiny_llava_llama(tokenizer_dir: str, tower_dir: str, *, seed: int = 0, model_args=None,
                     **config_overrides) -> LlavaLlamaForCausalLM:
    """An in-memory dense LLaVA-Llama with the tower from `tower_dir` attached (eval mode)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(tiny_llama_config(tokenizer, LlavaLlamaConfig, **config_overrides))
    model.get_model().initialize_vision_modules(model_args or tiny_model_args(tower_dir))
    return model.eval()


def upcycle_llava_llama(dense: LlavaLlamaForCausalLM, **moe_kwargs) -> MoELLaVALlamaForCausalLM:
    """A MoE copy of `dense` (stage 3): experts upcycled from its FFNs; `moe_kwargs` go to
    `build_moe_settings` (num_experts=4, moe_mode="sparse", top_k_experts=2, backend="native", ...)."""
    model = MoELLaVALlamaForCausalLM(MoELLaVALlamaConfig.from_dict(dense.config.to_dict()))
    model.load_state_dict(dense.state_dict())
    model.initialize_moe_modules(build_moe_settings(model.config.num_hidden_layers, **moe_kwargs))
    return model.eval()


def perturb_experts(model, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to every MoE block's experts and router, so experts differ and routing matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model):
            for param in block.parameters():
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


def build_tiny_llava_llama(out_dir: str, tokenizer_dir: str, tower_dir: str, *, seed: int = 0,
                           moe: Optional[dict] = None, perturb_experts_seed: Optional[int] = None,
                           **config_overrides) -> str:
    """A saved LLaVA-Llama checkpoint (weights, config, tokenizer) in `out_dir`: dense, or MoE upcycled
    with `moe` as `build_moe_settings` keyword arguments (e.g. `moe={"num_experts": 4}`), its experts
    made to differ by `perturb_experts(model, seed=perturb_experts_seed)` when that is given."""
    model = tiny_llava_llama(tokenizer_dir, tower_dir, seed=seed, **config_overrides)
    if moe is not None:
        model = upcycle_llava_llama(model, **moe)
        if perturb_experts_seed is not None:
            perturb_experts(model, seed=perturb_experts_seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(tokenizer_dir).save_pretrained(out_dir)
    return str(out_dir)


def build_tiny_stage1(out_dir: str, base_dir: str, tokenizer_dir: str, tower_dir: str, *,
                      seed: int = 0) -> Tuple[str, str]:
    """A base Llama LLM folder and a Stage-1 output over it (config.json + mm_projector.bin only).

    Returns `(stage1_dir, base_dir)`. The projector weights are random but not the init ones, so a test
    can tell they were loaded.
    """
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(base_dir, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    model = LlavaLlamaForCausalLM.from_pretrained(base_dir)
    model.get_model().initialize_vision_modules(tiny_model_args(tower_dir))
    with torch.no_grad():
        for param in model.get_model().mm_projector.parameters():
            param.normal_(0.0, 0.5)
    model.config.save_pretrained(out_dir)
    projector = {f"model.mm_projector.{k}": v for k, v in model.get_model().mm_projector.state_dict().items()}
    torch.save(projector, os.path.join(out_dir, "mm_projector.bin"))
    return str(out_dir), str(base_dir)


def write_test_image(path: str, size: Tuple[int, int] = (40, 30), seed: int = 0) -> str:
    """A random RGB PNG (not square, so aspect-ratio handling matters)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def random_pixels(num_images: int, image_size: int = TINY_TOWER["image_size"], seed: int = 0) -> torch.Tensor:
    """Preprocessed-looking pixel values [N, 3, S, S]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, image_size, image_size, generator=generator)


def fit_to_conversation(model, tokenizer, image_processor, image_path: str, turns, *, steps: int = 60,
                        lr: float = 3e-3, seed: int = 0):
    """Train `model` in place on one image conversation in the `v1` template (`turns`: (question, answer)
    pairs, the image in the first question) until it has learned it: a tiny model whose greedy replies
    are words that end with the template's end token, like a trained one's. Returns the model in eval mode."""
    from moellava import conversation
    from moellava.mm_utils import process_images
    from moellava.train.preprocess import preprocess

    source = []
    for index, (question, answer) in enumerate(turns):
        source += [{"from": "human", "value": ("<image>\n" if index == 0 else "") + question},
                   {"from": "gpt", "value": answer}]
    previous = conversation.default_conversation
    conversation.set_default_conversation("v1")
    try:
        sample = preprocess([source], tokenizer, has_image=True)
    finally:
        conversation.default_conversation = previous
    input_ids, labels = sample["input_ids"][0][None], sample["labels"][0][None]
    pixels = process_images([Image.open(image_path).convert("RGB")], image_processor, model.config)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids, labels=labels, images=pixels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
