"""MoE-LLaVA on StableLM-2 (`model_type` "moe_llava_stablelm"): LLaVA-Stablelm whose chosen FFNs are sparse
MoE blocks (see moellava.model.moe_model)."""

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_stablelm import LlavaStablelmConfig, LlavaStablelmForCausalLM
from moellava.model.moe_model import MoELlavaConfigMixin, MoELlavaMixin


class MoELLaVAStablelmConfig(MoELlavaConfigMixin, LlavaStablelmConfig):
    model_type = "moe_llava_stablelm"


class MoELLaVAStablelmForCausalLM(MoELlavaMixin, LlavaStablelmForCausalLM):
    config_class = MoELLaVAStablelmConfig


AutoConfig.register("moe_llava_stablelm", MoELLaVAStablelmConfig)
AutoModelForCausalLM.register(MoELLaVAStablelmConfig, MoELLaVAStablelmForCausalLM)
