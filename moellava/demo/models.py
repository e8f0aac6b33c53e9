"""The demo's starting points, built locally and randomly initialised (nothing can be downloaded):
a SentencePiece tokenizer trained on the fly, a tiny CLIP vision tower and a tiny Llama LLM, each saved as
a folder in the layout of the real thing, so the training scripts take them like hub checkpoints."""

from dataclasses import dataclass

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from moellava.tokenization import load_tokenizer
from moellava.tokenization.toy import build_toy_tokenizer


@dataclass(frozen=True)
class TowerSize:
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4


@dataclass(frozen=True)
class LlamaSize:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 512


def build_tokenizer(out_dir: str) -> str:
    """The toy Llama tokenizer: SentencePiece BPE trained here (<unk>=0, <s>=1, </s>=2)."""
    return build_toy_tokenizer("llama", out_dir)


def build_tower(out_dir: str, size: TowerSize = TowerSize(), seed: int = 0) -> str:
    """A random CLIP ViT with its image processor (no pretrained weights exist offline).

    Random features still carry colour and coarse shape: the patch embedding is a random linear map of each
    8x8 patch, and the layer the projector reads (`mm_vision_select_layer -2`, here the first of two) only
    adds to it through the residual. A 4x4 grid keeps the image to 16 tokens, which the tiny LLM learns to
    read within the demo's budget.
    """
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        image_size=size.image_size,
        patch_size=size.patch_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
    )
    CLIPVisionModel(config).save_pretrained(out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": size.image_size}, crop_size={"height": size.image_size, "width": size.image_size}
    ).save_pretrained(out_dir)
    return out_dir


def build_llm(out_dir: str, tokenizer_dir: str, size: LlamaSize = LlamaSize(), seed: int = 0) -> str:
    """A random Llama (model_type "llama") with the tokenizer saved next to it, as a base LLM ships."""
    tokenizer = load_tokenizer(tokenizer_dir, family="llama")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        max_position_embeddings=size.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
