"""LLaVA on Phi-2 (`model_type` "llava_phi"): our Phi backbone (moellava.model.language_model.phi) with image
features spliced into its input embeddings. Weights keep the official names (`model.layers.N...`), and the
`lm_head` keeps phi-2's bias (the original MoE-LLaVA built it without one and dropped the trained bias)."""

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.phi import PhiConfig, PhiForCausalLM, PhiModel
from moellava.model.llava_arch import LlavaConfigMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaPhiConfig(LlavaConfigMixin, PhiConfig):
    model_type = "llava_phi"


class LlavaPhiModel(LlavaMetaModel, PhiModel):
    config_class = LlavaPhiConfig


class LlavaPhiForCausalLM(LlavaMetaForCausalLM, PhiForCausalLM):
    config_class = LlavaPhiConfig

    def __init__(self, config: LlavaPhiConfig):
        # PhiForCausalLM.__init__ would build a plain PhiModel; build the LLaVA one instead.
        super(PhiForCausalLM, self).__init__(config)
        self.model = LlavaPhiModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_model(self) -> LlavaPhiModel:
        return self.model

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers


AutoConfig.register("llava_phi", LlavaPhiConfig)
AutoModelForCausalLM.register(LlavaPhiConfig, LlavaPhiForCausalLM)
