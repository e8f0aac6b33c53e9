"""LLaVA on QWen v1 (`model_type` "llava_qwen"): our QWen backbone (moellava.model.language_model.qwen) with
image features spliced into its input embeddings. The inner model stays `transformer`, so weights keep the
official names (`transformer.h.N...`) and the tower/projector sit at `transformer.image_tower...` /
`transformer.mm_projector...`, as in the published MoE-LLaVA-Qwen checkpoints."""

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.qwen import QWenConfig, QWenLMHeadModel, QWenModel
from moellava.model.llava_arch import LlavaConfigMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaQWenConfig(LlavaConfigMixin, QWenConfig):
    model_type = "llava_qwen"


class LlavaQWenModel(LlavaMetaModel, QWenModel):
    config_class = LlavaQWenConfig


class LlavaQWenForCausalLM(LlavaMetaForCausalLM, QWenLMHeadModel):
    config_class = LlavaQWenConfig

    def __init__(self, config: LlavaQWenConfig):
        # QWenLMHeadModel.__init__ would build a plain QWenModel; build the LLaVA one instead.
        super(QWenLMHeadModel, self).__init__(config)
        self.transformer = LlavaQWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaQWenModel:
        return self.transformer

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h


AutoConfig.register("llava_qwen", LlavaQWenConfig)
AutoModelForCausalLM.register(LlavaQWenConfig, LlavaQWenForCausalLM)
