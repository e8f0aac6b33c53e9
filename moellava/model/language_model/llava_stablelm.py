"""LLaVA on StableLM-2 (`model_type` "llava_stablelm"): our StableLM backbone (moellava.model.language_model.
stablelm) with image features spliced into its input embeddings. The backbone's config may use either official
format (stablelm or stablelm_epoch field names)."""

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.stablelm import StableLmConfig, StableLmForCausalLM, StableLmModel
from moellava.model.llava_arch import LlavaConfigMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaStablelmConfig(LlavaConfigMixin, StableLmConfig):
    model_type = "llava_stablelm"


class LlavaStablelmModel(LlavaMetaModel, StableLmModel):
    config_class = LlavaStablelmConfig


class LlavaStablelmForCausalLM(LlavaMetaForCausalLM, StableLmForCausalLM):
    config_class = LlavaStablelmConfig

    def __init__(self, config: LlavaStablelmConfig):
        # StableLmForCausalLM.__init__ would build a plain StableLmModel; build the LLaVA one instead.
        super(StableLmForCausalLM, self).__init__(config)
        self.model = LlavaStablelmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaStablelmModel:
        return self.model

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers


AutoConfig.register("llava_stablelm", LlavaStablelmConfig)
AutoModelForCausalLM.register(LlavaStablelmConfig, LlavaStablelmForCausalLM)
