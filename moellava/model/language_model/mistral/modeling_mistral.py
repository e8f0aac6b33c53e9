"""Mistral (mistralai/Mistral-7B-*) on transformers 4.31, with the official weight names.

Architecture: Llama-style pre-norm decoder (RMSNorm, full rotary, SwiGLU FFN, no biases) with grouped-query
attention (`num_key_value_heads` < `num_attention_heads`) and a sliding attention window: with
`sliding_window` W each token attends to itself and the W - 1 tokens before it (W keys), as in
transformers' MistralForCausalLM (eager attention). The cache keeps every key; the mask applies the window.

Parameter names: ``model.embed_tokens``, ``model.layers.N.{input_layernorm, post_attention_layernorm,
self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head``.
Cache: a tuple with one ``(key, value)`` per layer, each ``[batch, kv_heads, seq, head_dim]``.
"""

from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..common import (
    DecoderForCausalLM,
    RMSNorm,
    RMSNormDecoderLayer,
    RotaryEmbedding,
    decoder_inputs,
    init_linear_and_embedding,
    run_decoder_stack,
)
from .configuration_mistral import MistralConfig


class MistralDecoderLayer(RMSNormDecoderLayer):
    """Llama's block with grouped-query attention; the window is in the mask."""

    def __init__(self, config: MistralConfig):
        super().__init__(config, config.head_dim)


class MistralPreTrainedModel(PreTrainedModel):
    config_class = MistralConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MistralDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    # Some exports store the rotary inverse frequencies; they follow from the config and are computed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        init_linear_and_embedding(module, self.config.initializer_range)

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, MistralModel):
            module.gradient_checkpointing = value


class MistralModel(MistralPreTrainedModel):
    def __init__(self, config: MistralConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MistralDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, base=config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        inputs_embeds, causal_mask, position_ids, _ = decoder_inputs(
            self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
            sliding_window=self.config.sliding_window,
        )
        rotary_pos_emb = self.rotary_emb(position_ids)
        return run_decoder_stack(
            self, self.layers, self.norm, inputs_embeds, (causal_mask, rotary_pos_emb), past_key_values,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class MistralForCausalLM(DecoderForCausalLM, MistralPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: MistralConfig):
        super().__init__(config)
        self.model = MistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers
