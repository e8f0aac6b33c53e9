"""LLaVA on Phi-2 (`model_type` "llava_phi"): our Phi backbone (moellava.model.language_model.phi) with image
features spliced into its input embeddings. Weights keep the official names (`model.layers.N...`), and the
`lm_head` keeps phi-2's bias. The original MoE-LLaVA built it without one (dropping phi-2's trained bias), so
its checkpoints have none: `config.lm_head_bias` says which head a checkpoint has (checkpoint_layouts'
Phi-head rule sets it from the stored tensors when a config does not say)."""

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.phi import PhiConfig, PhiForCausalLM, PhiModel
from moellava.model.llava_arch import LlavaConfigMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaPhiConfig(LlavaConfigMixin, PhiConfig):
    model_type = "llava_phi"

    def __init__(self, lm_head_bias: bool = True, **kwargs):
        self.lm_head_bias = lm_head_bias
        super().__init__(**kwargs)


class LlavaPhiModel(LlavaMetaModel, PhiModel):
    config_class = LlavaPhiConfig


class LlavaPhiForCausalLM(LlavaMetaForCausalLM, PhiForCausalLM):
    config_class = LlavaPhiConfig

    def __init__(self, config: LlavaPhiConfig):
        # PhiForCausalLM.__init__ would build a plain PhiModel; build the LLaVA one instead.
        super(PhiForCausalLM, self).__init__(config)
        self.model = LlavaPhiModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def get_model(self) -> LlavaPhiModel:
        return self.model

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers


AutoConfig.register("llava_phi", LlavaPhiConfig)
AutoModelForCausalLM.register(LlavaPhiConfig, LlavaPhiForCausalLM)
