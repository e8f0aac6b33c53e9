"""MoE-LLaVA on QWen v1 (`model_type` "moe_llava_qwen"): LLaVA-QWen whose chosen FFNs are sparse MoE blocks
(see moellava.model.moe_model); experts are named `transformer.h.N.mlp.deepspeed_moe.experts.
deepspeed_experts.J.{w1,w2,c_proj}` as in the published MoE-LLaVA-Qwen checkpoints."""

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_qwen import LlavaQWenConfig, LlavaQWenForCausalLM
from moellava.model.moe_model import MoELlavaConfigMixin, MoELlavaMixin


class MoELLaVAQWenConfig(MoELlavaConfigMixin, LlavaQWenConfig):
    model_type = "moe_llava_qwen"


class MoELLaVAQWenForCausalLM(MoELlavaMixin, LlavaQWenForCausalLM):
    config_class = MoELLaVAQWenConfig


AutoConfig.register("moe_llava_qwen", MoELLaVAQWenConfig)
AutoModelForCausalLM.register(MoELLaVAQWenConfig, MoELLaVAQWenForCausalLM)
