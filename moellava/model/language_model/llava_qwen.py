"""LLaVA on QWen v1 (`model_type` "llava_qwen"): our QWen backbone (moellava.model.language_model.qwen) with
image features spliced into its input embeddings. The inner model stays `transformer`, so weights keep the
official names (`transformer.h.N...`) and the tower/projector sit at `transformer.image_tower...` /
`transformer.mm_projector...`, as in the published MoE-LLaVA-Qwen checkpoints."""

from typing import List, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.qwen import QWenConfig, QWenLMHeadModel, QWenModel
from moellava.model.llava_arch import Images, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaQWenConfig(QWenConfig):
    model_type = "llava_qwen"

    def __init__(self, **kwargs):
        # A backbone's config.json ("qwen", or "llava_qwen" read by the MoE subclass) would otherwise set
        # an instance model_type that hides this class's until the config is saved and reloaded.
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)


class LlavaQWenModel(LlavaMetaModel, QWenModel):
    config_class = LlavaQWenConfig


class LlavaQWenForCausalLM(QWenLMHeadModel, LlavaMetaForCausalLM):
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

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        images: Optional[Images] = None,
        return_dict: Optional[bool] = None,
    ):
        if inputs_embeds is None:
            input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images
                )
            )
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return self.llava_output(outputs, attention_mask if images is not None else None, return_dict)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, images=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, **kwargs
        )
        model_inputs["images"] = images
        return model_inputs


AutoConfig.register("llava_qwen", LlavaQWenConfig)
AutoModelForCausalLM.register(LlavaQWenConfig, LlavaQWenForCausalLM)
