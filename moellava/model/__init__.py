"""LLaVA models. Importing this package registers every `llava_*` / `moe_llava_*` config and causal LM
with AutoConfig and AutoModelForCausalLM."""

from moellava.model.language_model.llava_llama import LlavaLlamaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel
from moellava.model.language_model.llava_llama_moe import MoELLaVALlamaConfig, MoELLaVALlamaForCausalLM

__all__ = [
    "LlavaLlamaConfig",
    "LlavaLlamaForCausalLM",
    "LlavaLlamaModel",
    "MoELLaVALlamaConfig",
    "MoELLaVALlamaForCausalLM",
]
