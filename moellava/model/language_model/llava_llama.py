"""LLaVA on Llama / Vicuna (`model_type` "llava_llama"): our Llama backbone (moellava.model.language_model.
llama, fused attention) with image features spliced into its input embeddings. The config is transformers'
`LlamaConfig` and the weight names are transformers' Llama names, so checkpoints written on transformers'
Llama load unchanged."""

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from moellava.model.llava_arch import LlavaConfigMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaLlamaConfig(LlavaConfigMixin, LlamaConfig):
    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaLlamaConfig


class LlavaLlamaForCausalLM(LlavaMetaForCausalLM, LlamaForCausalLM):
    config_class = LlavaLlamaConfig

    def __init__(self, config: LlavaLlamaConfig):
        # LlamaForCausalLM.__init__ would build a plain LlamaModel; build the LLaVA one instead.
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaLlamaModel:
        return self.model

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers


AutoConfig.register("llava_llama", LlavaLlamaConfig)
AutoModelForCausalLM.register(LlavaLlamaConfig, LlavaLlamaForCausalLM)
