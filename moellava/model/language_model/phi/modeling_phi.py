"""Phi (microsoft/phi-2) on transformers 4.31, with the official weight names.

Parameter names: ``model.embed_tokens``, ``model.layers.N.{input_layernorm, self_attn.{q,k,v}_proj,
self_attn.dense, mlp.fc1, mlp.fc2}``, ``model.final_layernorm``, ``lm_head`` (with bias).
Cache: a tuple with one ``(key, value)`` per layer, each ``[batch, kv_heads, seq, head_dim]``.
"""

from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..common import (
    DecoderForCausalLM,
    apply_rotary_pos_emb,
    attention_core,
    decoder_inputs,
    decoder_layer_outputs,
    init_linear_and_embedding,
    rope_scaling_ntk_alpha,
    rotary_for_rope_scaling,
    run_decoder_stack,
    update_kv_cache,
)
from .configuration_phi import PhiConfig


class PhiMLP(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class PhiAttention(nn.Module):
    """Multi-head attention with biased q/k/v projections, partial rotary and a ``dense`` output."""

    def __init__(self, config: PhiConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size)
        # The official eager attention always runs in fp32; here only when the config asks for it.
        self.upcast_attention = config.upcast_attention
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            # Normalises each head's query/key vector.
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        rotary_pos_emb: Tuple[torch.Tensor, torch.Tensor],
        past_key_value: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, q_len, self.num_key_value_heads, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, q_len, self.num_key_value_heads, self.head_dim)
        if self.qk_layernorm:
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        query, key = apply_rotary_pos_emb(query, key, *rotary_pos_emb)
        key, value, present = update_kv_cache(key, value, past_key_value, use_cache)
        context, weights = attention_core(
            query,
            key,
            value,
            attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            output_attentions=output_attentions,
            upcast=self.upcast_attention,
        )
        return self.dense(context), weights, present


class PhiDecoderLayer(nn.Module):
    """Parallel block: ``x + dropout(attn(ln(x))) + dropout(mlp(ln(x)))`` with one LayerNorm."""

    def __init__(self, config: PhiConfig):
        super().__init__()
        self.self_attn = PhiAttention(config)
        self.mlp = PhiMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        rotary_pos_emb: Tuple[torch.Tensor, torch.Tensor],
        past_key_value: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        attn_output, weights, present = self.self_attn(
            hidden_states, attention_mask, rotary_pos_emb, past_key_value, output_attentions, use_cache
        )
        mlp_output = self.mlp(hidden_states)
        hidden_states = self.resid_dropout(attn_output) + self.resid_dropout(mlp_output) + residual
        return decoder_layer_outputs(hidden_states, weights, present, output_attentions, use_cache)


class PhiPreTrainedModel(PreTrainedModel):
    config_class = PhiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PhiDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        init_linear_and_embedding(module, self.config.initializer_range)
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, PhiModel):
            module.gradient_checkpointing = value


class PhiModel(PhiPreTrainedModel):
    def __init__(self, config: PhiConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList([PhiDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = rotary_for_rope_scaling(
            int(head_dim * config.partial_rotary_factor), config.rope_theta, config.rope_scaling
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
        hidden_states = self.embed_dropout(inputs_embeds)
        return run_decoder_stack(
            self, self.layers, self.final_layernorm, hidden_states, (causal_mask, rotary_pos_emb), past_key_values,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class PhiForCausalLM(DecoderForCausalLM, PhiPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: PhiConfig):
        super().__init__(config)
        self.model = PhiModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers
