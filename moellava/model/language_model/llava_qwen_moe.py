"""MoE-LLaVA on QWen v1 (`model_type` "moe_llava_qwen"): LLaVA-QWen whose chosen FFNs are sparse MoE blocks
(see moellava.model.moe_model); experts are named `transformer.h.N.mlp.deepspeed_moe.experts.
deepspeed_experts.J.{w1,w2,c_proj}` as in the published MoE-LLaVA-Qwen checkpoints."""

from typing import Optional

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_qwen import LlavaQWenConfig, LlavaQWenForCausalLM
from moellava.model.moe_model import MoELlavaMixin


class MoELLaVAQWenConfig(LlavaQWenConfig):
    model_type = "moe_llava_qwen"

    def __init__(self, moe: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe  # the `build_moe_settings` dict; None until the dense model is upcycled


class MoELLaVAQWenForCausalLM(MoELlavaMixin, LlavaQWenForCausalLM):
    config_class = MoELLaVAQWenConfig


AutoConfig.register("moe_llava_qwen", MoELLaVAQWenConfig)
AutoModelForCausalLM.register(MoELLaVAQWenConfig, MoELLaVAQWenForCausalLM)
