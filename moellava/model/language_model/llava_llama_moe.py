"""MoE-LLaVA on Llama / Vicuna (`model_type` "moe_llava_llama"): LLaVA-Llama whose chosen FFNs are sparse
MoE blocks (see moellava.model.moe_model)."""

from typing import Optional

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_llama import LlavaLlamaConfig, LlavaLlamaForCausalLM
from moellava.model.moe_model import MoELlavaMixin


class MoELLaVALlamaConfig(LlavaLlamaConfig):
    model_type = "moe_llava_llama"

    def __init__(self, moe: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe  # the `build_moe_settings` dict; None until the dense model is upcycled


class MoELLaVALlamaForCausalLM(MoELlavaMixin, LlavaLlamaForCausalLM):
    config_class = MoELLaVALlamaConfig


AutoConfig.register("moe_llava_llama", MoELLaVALlamaConfig)
AutoModelForCausalLM.register(MoELLaVALlamaConfig, MoELLaVALlamaForCausalLM)
