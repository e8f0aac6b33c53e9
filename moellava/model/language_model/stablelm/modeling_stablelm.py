"""StableLM (stabilityai/stablelm-2-*) on transformers 4.31, with the official weight names.

Architecture: pre-norm decoder with LayerNorm (weight and bias), rotary position embedding over the first
`partial_rotary_factor` (25% for StableLM-2) of each head's channels, q/k/v projections with bias
(`use_qkv_bias`), SwiGLU FFN. Optional (StableLM-2-12B): per-head LayerNorm on queries and keys
(`qk_layernorm`) and a parallel residual block (`use_parallel_residual`).

Parameter names: ``model.embed_tokens``, ``model.layers.N.{input_layernorm, post_attention_layernorm,
self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head``.
Cache: a tuple with one ``(key, value)`` per layer, each ``[batch, kv_heads, seq, head_dim]``.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..common import (
    DecoderForCausalLM,
    GroupedQueryAttention,
    RotaryEmbedding,
    SwiGLUMLP,
    decoder_inputs,
    decoder_layer_outputs,
    init_linear_and_embedding,
    run_decoder_stack,
)
from .configuration_stablelm import StableLMEpochConfig, StableLmConfig


class StableLmLayerNormPerHead(nn.Module):
    """One bias-free LayerNorm per head over ``[batch, heads, seq, head_dim]`` (names ``norms.{h}.weight``)."""

    def __init__(self, head_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(head_dim, eps=eps, bias=False) for _ in range(num_heads)])
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Same as applying norms[h] to head h, in one call.
        weight = torch.stack([norm.weight for norm in self.norms])[None, :, None, :]
        return F.layer_norm(hidden_states, hidden_states.shape[-1:], eps=self.eps) * weight


class StableLmAttention(GroupedQueryAttention):
    """Llama-style attention with biased q/k/v (``use_qkv_bias``), an unbiased output projection and, with
    ``qk_layernorm``, a LayerNorm per head on queries and keys."""

    def __init__(self, config: StableLmConfig):
        head_dim = config.hidden_size // config.num_attention_heads
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
                         config.attention_dropout, bias=config.use_qkv_bias, output_bias=False)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_layernorm = StableLmLayerNormPerHead(head_dim, self.num_heads, config.layer_norm_eps)
            self.k_layernorm = StableLmLayerNormPerHead(head_dim, self.num_key_value_heads, config.layer_norm_eps)

    def normalize_query_key(self, query: torch.Tensor, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.qk_layernorm:
            return query, key
        return self.q_layernorm(query), self.k_layernorm(key)


class StableLmDecoderLayer(nn.Module):
    """Sequential pre-norm block, or with ``use_parallel_residual`` ``x + attn(ln(x)) + mlp(ln(x))``."""

    def __init__(self, config: StableLmConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.self_attn = StableLmAttention(config)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not self.use_parallel_residual:
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
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
        if self.use_parallel_residual:
            # Attention and FFN both read the same normalised input.
            hidden_states = residual + attn_output + self.dropout(self.mlp(hidden_states))
        else:
            residual = residual + attn_output
            hidden_states = residual + self.dropout(self.mlp(self.post_attention_layernorm(residual)))
        return decoder_layer_outputs(hidden_states, weights, present, output_attentions, use_cache)


class StableLmPreTrainedModel(PreTrainedModel):
    config_class = StableLmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["StableLmDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    # Some exports store the rotary inverse frequencies; they follow from the config and are computed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        init_linear_and_embedding(module, self.config.initializer_range)

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, StableLmModel):
            module.gradient_checkpointing = value


class StableLmModel(StableLmPreTrainedModel):
    def __init__(self, config: StableLmConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([StableLmDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(int(head_dim * config.partial_rotary_factor), base=config.rope_theta)
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
            self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values
        )
        rotary_pos_emb = self.rotary_emb(position_ids)
        return run_decoder_stack(
            self, self.layers, self.norm, inputs_embeds, (causal_mask, rotary_pos_emb), past_key_values,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class StableLmForCausalLM(DecoderForCausalLM, StableLmPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: StableLmConfig):
        super().__init__(config)
        self.model = StableLmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers


class StableLMEpochForCausalLM(StableLmForCausalLM):
    """The same model for configs of the older ``model_type: stablelm_epoch`` (its official class name)."""

    config_class = StableLMEpochConfig
