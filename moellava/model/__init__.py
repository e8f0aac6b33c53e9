"""LLaVA models. Importing this package registers every `llava_*` / `moe_llava_*` config and causal LM
with AutoConfig and AutoModelForCausalLM."""

from moellava.model.language_model.llava_llama import LlavaLlamaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel
from moellava.model.language_model.llava_llama_moe import MoELLaVALlamaConfig, MoELLaVALlamaForCausalLM
from moellava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from moellava.model.language_model.llava_mistral_moe import MoELLaVAMistralConfig, MoELLaVAMistralForCausalLM
from moellava.model.language_model.llava_phi import LlavaPhiConfig, LlavaPhiForCausalLM
from moellava.model.language_model.llava_phi_moe import MoELLaVAPhiConfig, MoELLaVAPhiForCausalLM
from moellava.model.language_model.llava_qwen import LlavaQWenConfig, LlavaQWenForCausalLM
from moellava.model.language_model.llava_qwen_moe import MoELLaVAQWenConfig, MoELLaVAQWenForCausalLM
from moellava.model.language_model.llava_stablelm import LlavaStablelmConfig, LlavaStablelmForCausalLM
from moellava.model.language_model.llava_stablelm_moe import MoELLaVAStablelmConfig, MoELLaVAStablelmForCausalLM

__all__ = [
    "LlavaLlamaConfig",
    "LlavaLlamaForCausalLM",
    "LlavaLlamaModel",
    "LlavaMistralConfig",
    "LlavaMistralForCausalLM",
    "LlavaPhiConfig",
    "LlavaPhiForCausalLM",
    "LlavaQWenConfig",
    "LlavaQWenForCausalLM",
    "LlavaStablelmConfig",
    "LlavaStablelmForCausalLM",
    "MoELLaVALlamaConfig",
    "MoELLaVALlamaForCausalLM",
    "MoELLaVAMistralConfig",
    "MoELLaVAMistralForCausalLM",
    "MoELLaVAPhiConfig",
    "MoELLaVAPhiForCausalLM",
    "MoELLaVAQWenConfig",
    "MoELLaVAQWenForCausalLM",
    "MoELLaVAStablelmConfig",
    "MoELLaVAStablelmForCausalLM",
]
