"""MoE-LLaVA on Phi-2 (`model_type` "moe_llava_phi"): LLaVA-Phi whose chosen FFNs are sparse MoE blocks
(see moellava.model.moe_model); experts are named `model.layers.N.mlp.deepspeed_moe.experts.
deepspeed_experts.J.{fc1,fc2}` as in the published MoE-LLaVA-Phi2 checkpoints."""

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_phi import LlavaPhiConfig, LlavaPhiForCausalLM
from moellava.model.moe_model import MoELlavaConfigMixin, MoELlavaMixin


class MoELLaVAPhiConfig(MoELlavaConfigMixin, LlavaPhiConfig):
    model_type = "moe_llava_phi"


class MoELLaVAPhiForCausalLM(MoELlavaMixin, LlavaPhiForCausalLM):
    config_class = MoELLaVAPhiConfig


AutoConfig.register("moe_llava_phi", MoELLaVAPhiConfig)
AutoModelForCausalLM.register(MoELLaVAPhiConfig, MoELLaVAPhiForCausalLM)
