"""MoE-LLaVA on Mistral / OpenChat (`model_type` "moe_llava_mistral"): LLaVA-Mistral whose chosen FFNs are sparse
MoE blocks (see moellava.model.moe_model)."""

from typing import Optional

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from moellava.model.moe_model import MoELlavaMixin


class MoELLaVAMistralConfig(LlavaMistralConfig):
    model_type = "moe_llava_mistral"

    def __init__(self, moe: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe  # the `build_moe_settings` dict; None until the dense model is upcycled


class MoELLaVAMistralForCausalLM(MoELlavaMixin, LlavaMistralForCausalLM):
    config_class = MoELLaVAMistralConfig


AutoConfig.register("moe_llava_mistral", MoELLaVAMistralConfig)
AutoModelForCausalLM.register(MoELLaVAMistralConfig, MoELLaVAMistralForCausalLM)
