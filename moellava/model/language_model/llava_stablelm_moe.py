"""MoE-LLaVA on StableLM-2 (`model_type` "moe_llava_stablelm"): LLaVA-Stablelm whose chosen FFNs are sparse
MoE blocks (see moellava.model.moe_model)."""

from typing import Optional

from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llava_stablelm import LlavaStablelmConfig, LlavaStablelmForCausalLM
from moellava.model.moe_model import MoELlavaMixin


class MoELLaVAStablelmConfig(LlavaStablelmConfig):
    model_type = "moe_llava_stablelm"

    def __init__(self, moe: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe  # the `build_moe_settings` dict; None until the dense model is upcycled


class MoELLaVAStablelmForCausalLM(MoELlavaMixin, LlavaStablelmForCausalLM):
    config_class = MoELLaVAStablelmConfig


AutoConfig.register("moe_llava_stablelm", MoELLaVAStablelmConfig)
AutoModelForCausalLM.register(MoELLaVAStablelmConfig, MoELLaVAStablelmForCausalLM)
