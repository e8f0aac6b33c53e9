"""MoE-LLaVA on Mistral / OpenChat (`model_type` "moe_llava_mistral"): LLaVA-Mistral whose chosen FFNs are sparse
MoE blocks (see moellava.model.moe_model)."""

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from moellava.model.moe_model import MoELlavaConfigMixin, MoELlavaMixin


class MoELLaVAMistralConfig(MoELlavaConfigMixin, LlavaMistralConfig):
    model_type = "moe_llava_mistral"


class MoELLaVAMistralForCausalLM(MoELlavaMixin, LlavaMistralForCausalLM):
    config_class = MoELLaVAMistralConfig


AutoConfig.register("moe_llava_mistral", MoELLaVAMistralConfig)
AutoModelForCausalLM.register(MoELLaVAMistralConfig, MoELLaVAMistralForCausalLM)
