"""LLaVA on Phi-2 (`model_type` "llava_phi"): our Phi backbone (moellava.model.language_model.phi) with image
features spliced into its input embeddings. Weights keep the official names (`model.layers.N...`), and the
`lm_head` keeps phi-2's bias (the original MoE-LLaVA built it without one and dropped the trained bias)."""

from typing import List, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.model.language_model.phi import PhiConfig, PhiForCausalLM, PhiModel
from moellava.model.llava_arch import Images, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaPhiConfig(PhiConfig):
    model_type = "llava_phi"

    def __init__(self, **kwargs):
        # A backbone's config.json ("phi", or "llava_phi" read by the MoE subclass) would otherwise set
        # an instance model_type that hides this class's until the config is saved and reloaded.
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)


class LlavaPhiModel(LlavaMetaModel, PhiModel):
    config_class = LlavaPhiConfig


class LlavaPhiForCausalLM(PhiForCausalLM, LlavaMetaForCausalLM):
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


AutoConfig.register("llava_phi", LlavaPhiConfig)
AutoModelForCausalLM.register(LlavaPhiConfig, LlavaPhiForCausalLM)
