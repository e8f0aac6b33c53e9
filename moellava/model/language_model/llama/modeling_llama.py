"""Llama (meta-llama/Llama-2-*, lmsys/vicuna-*) on the shared attention core, with the official weight names.

Same model as transformers 4.31's `LlamaForCausalLM`, which runs eager attention (the full softmax matrix);
this one runs `scaled_dot_product_attention`, with no mask at all for unpadded or right-padded batches, so a
GPU takes the flash kernel. The config is transformers' `LlamaConfig` (model_type ``llama``): the official
config.json loads unchanged.
* ``rope_scaling``: ``linear`` divides the positions by ``factor``; ``dynamic`` raises the rotary base by the
  NTK alpha of the current length (past + new tokens) once it exceeds ``max_position_embeddings``, as
  transformers 4.31 does for each forward of a fresh model (4.31 also keeps the largest table it ever built
  for later, shorter inputs; here the base follows each input's own length).
* ``rope_theta`` (written by newer transformers, e.g. CodeLlama's 1e6) sets the base; 4.31 ignores it.
* ``pretraining_tp`` > 1 makes transformers split each projection into that many slices and sum them: the
  same products summed in another order, so here each projection is one matmul.
* ``attention_bias`` (newer configs) adds biases to the four projections.

Parameter names: ``model.embed_tokens``, ``model.layers.N.{input_layernorm, post_attention_layernorm,
self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head``. Checkpoints written by
transformers 4.31 also hold ``self_attn.rotary_emb.inv_freq``; it follows from the config and is ignored.
Cache: a tuple with one ``(key, value)`` per layer, each ``[batch, kv_heads, seq, head_dim]``.
"""

from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..common import (
    DecoderForCausalLM,
    RMSNorm,
    RMSNormDecoderLayer,
    decoder_inputs,
    init_linear_and_embedding,
    rope_scaling_ntk_alpha,
    rotary_for_rope_scaling,
    run_decoder_stack,
)


def head_dim_of(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaDecoderLayer(RMSNormDecoderLayer):
    def __init__(self, config: LlamaConfig):
        super().__init__(config, head_dim_of(config))


class LlamaPreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        init_linear_and_embedding(module, self.config.initializer_range)

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, LlamaModel):
            module.gradient_checkpointing = value


class LlamaModel(LlamaPreTrainedModel):
    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_for_rope_scaling(
            head_dim_of(config), getattr(config, "rope_theta", 10000.0), config.rope_scaling
        )
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
        inputs_embeds, causal_mask, position_ids, past_length = decoder_inputs(
            self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values
        )
        ntk_alpha = rope_scaling_ntk_alpha(
            self.config.rope_scaling, self.config.max_position_embeddings, past_length + inputs_embeds.shape[1]
        )
        rotary_pos_emb = self.rotary_emb(position_ids, ntk_alpha)
        return run_decoder_stack(
            self, self.layers, self.norm, inputs_embeds, (causal_mask, rotary_pos_emb), past_key_values,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class LlamaForCausalLM(DecoderForCausalLM, LlamaPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers
