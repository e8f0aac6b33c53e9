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
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from ..common import (
    DecoderGenerationHooks,
    RotaryEmbedding,
    SwiGLUMLP,
    apply_rotary_pos_emb,
    attention_core,
    build_attention_mask,
    causal_lm_loss,
    repeat_kv,
)
from .configuration_stablelm import StableLMEpochConfig, StableLmConfig

logger = logging.get_logger(__name__)


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


class StableLmAttention(nn.Module):
    def __init__(self, config: StableLmConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        bias = config.use_qkv_bias
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_layernorm = StableLmLayerNormPerHead(self.head_dim, self.num_heads, config.layer_norm_eps)
            self.k_layernorm = StableLmLayerNormPerHead(self.head_dim, self.num_key_value_heads, config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        rotary_pos_emb: Tuple[torch.Tensor, torch.Tensor],
        past_key_value: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        if self.qk_layernorm:
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)

        query, key = apply_rotary_pos_emb(query, key, *rotary_pos_emb)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value) if use_cache else None

        context, weights = attention_core(
            query,
            repeat_kv(key, self.num_key_value_groups),
            repeat_kv(value, self.num_key_value_groups),
            attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return self.o_proj(context), weights, present


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

        outputs = (hidden_states,)
        if output_attentions:
            outputs += (weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class StableLmPreTrainedModel(PreTrainedModel):
    config_class = StableLmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["StableLmDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    # Some exports store the rotary inverse frequencies; they follow from the config and are computed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

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
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("StableLmModel: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq_length = inputs_embeds.shape[:2]
        past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)

        attention_mask = build_attention_mask(
            attention_mask, batch, seq_length, past_length, inputs_embeds.dtype, inputs_embeds.device
        )
        rotary_pos_emb = self.rotary_emb(position_ids)
        hidden_states = inputs_embeds

        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        next_cache = () if use_cache else None
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            past_key_value = past_key_values[idx] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training:
                # Non-reentrant: gradients reach every input, including a MoE block's auxiliary loss.
                layer_outputs = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, attention_mask, rotary_pos_emb, None, output_attentions, False,
                    use_reentrant=False,
                )
            else:
                layer_outputs = layer(
                    hidden_states, attention_mask, rotary_pos_emb, past_key_value, output_attentions, use_cache
                )
            hidden_states = layer_outputs[0]
            if use_cache:
                next_cache += (layer_outputs[2 if output_attentions else 1],)
            if output_attentions:
                all_attentions += (layer_outputs[1],)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, next_cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=next_cache,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


class StableLmForCausalLM(DecoderGenerationHooks, StableLmPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: StableLmConfig):
        super().__init__(config)
        self.model = StableLmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def set_decoder(self, decoder):
        self.model = decoder

    def get_decoder(self):
        return self.model

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        logits = self.lm_head(outputs[0]).float()
        loss = causal_lm_loss(logits, labels) if labels is not None else None

        if not return_dict:
            output = (logits,) + tuple(outputs[1:])
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class StableLMEpochForCausalLM(StableLmForCausalLM):
    """The same model for configs of the older ``model_type: stablelm_epoch`` (its official class name)."""

    config_class = StableLMEpochConfig
