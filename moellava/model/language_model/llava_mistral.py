"""LLaVA on Mistral / OpenChat (`model_type` "llava_mistral"): our Mistral backbone (moellava.model.
language_model.mistral, sliding-window attention) with image features spliced into its input embeddings."""

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.mistral import MistralConfig, MistralForCausalLM, MistralModel
from moellava.model.llava_arch import LlavaConfigMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaMistralConfig(LlavaConfigMixin, MistralConfig):
    model_type = "llava_mistral"


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    config_class = LlavaMistralConfig


class LlavaMistralForCausalLM(LlavaMetaForCausalLM, MistralForCausalLM):
    config_class = LlavaMistralConfig

    def __init__(self, config: LlavaMistralConfig):
        # MistralForCausalLM.__init__ would build a plain MistralModel; build the LLaVA one instead.
        super(MistralForCausalLM, self).__init__(config)
        self.model = LlavaMistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaMistralModel:
        return self.model

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers


AutoConfig.register("llava_mistral", LlavaMistralConfig)
AutoModelForCausalLM.register(LlavaMistralConfig, LlavaMistralForCausalLM)
