"""Llama backbone (model_type ``llama``: Llama-2, Vicuna) on the shared attention core. The config is
transformers' own `LlamaConfig`, so the type stays registered to transformers' classes; the LLaVA classes
(`llava_llama`, `moe_llava_llama`) are built on this implementation."""

from transformers import LlamaConfig

from .modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

__all__ = ["LlamaConfig", "LlamaForCausalLM", "LlamaModel", "LlamaPreTrainedModel"]
