"""MoE-LLaVA on Llama / Vicuna (`model_type` "moe_llava_llama"): LLaVA-Llama whose chosen FFNs are sparse
MoE blocks (see moellava.model.moe_model)."""

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_llama import LlavaLlamaConfig, LlavaLlamaForCausalLM
from moellava.model.moe_model import MoELlavaConfigMixin, MoELlavaMixin


class MoELLaVALlamaConfig(MoELlavaConfigMixin, LlavaLlamaConfig):
    model_type = "moe_llava_llama"


class MoELLaVALlamaForCausalLM(MoELlavaMixin, LlavaLlamaForCausalLM):
    config_class = MoELLaVALlamaConfig


AutoConfig.register("moe_llava_llama", MoELLaVALlamaConfig)
AutoModelForCausalLM.register(MoELLaVALlamaConfig, MoELLaVALlamaForCausalLM)
