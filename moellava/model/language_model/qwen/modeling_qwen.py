"""QWen v1 (Qwen/Qwen-1_8B, Qwen-7B) on transformers 4.31, with the official weight names.

Parameter names: ``transformer.wte``, ``transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1,
mlp.w2, mlp.c_proj}``, ``transformer.ln_f``, ``lm_head``.
Cache: a tuple with one ``(key, value)`` per layer, each ``[batch, heads, seq, kv_channels]`` (the layout of
our other backbones, not the official ``[batch, seq, heads, dim]``; caches are never saved).

Beyond ``config.seq_length`` the official model extends its context in eval mode, and so does this one:
* dynamic NTK (``use_dynamic_ntk``): the rotary base grows by ``alpha ** (dim / (dim - 2))`` with
  ``alpha = 2 ** ceil(log2(length / seq_length) + 1) - 1``, ``length`` being each sample's real length
  when a padding mask is given; the alpha chosen on the prompt is kept while decoding with the cache,
  so cached keys and new queries share one rotation;
* log-n attention (``use_logn_attn``): queries at position ``p >= seq_length`` are scaled by
  ``log(p + 1) / log(seq_length)``.
Rotary phases come from ``position_ids`` (the official model uses the cache index; rotary attention only
depends on position differences, so both agree wherever the official model is defined).
"""

import math
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
    RMSNorm,
    RotaryEmbedding,
    apply_rotary_pos_emb,
    attention_core,
    build_attention_mask,
    causal_lm_loss,
)
from .configuration_qwen import QWenConfig

logger = logging.get_logger(__name__)


def qwen_ntk_alpha(length: int, seq_length: int) -> float:
    """The official dynamic-NTK alpha for a sequence of ``length`` tokens: 1 up to ``seq_length``."""
    context_value = math.log(max(length, 1) / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def qwen_logn_scale(position_ids: torch.LongTensor, seq_length: int) -> torch.Tensor:
    """Official log-n query scale per position, ``[batch, 1, seq, 1]``: 1 below ``seq_length``."""
    positions = position_ids.double() + 1
    scale = torch.where(positions > seq_length, positions.log() / math.log(seq_length), torch.ones_like(positions))
    return scale[:, None, :, None].float()


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        ff_dim = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff_dim, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


class QWenAttention(nn.Module):
    """Multi-head attention with a fused, biased ``c_attn`` projection."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.attn_dropout_prob = config.attn_dropout_prob
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        rotary_pos_emb: Tuple[torch.Tensor, torch.Tensor],
        logn_scale: Optional[torch.Tensor] = None,
        past_key_value: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        batch, q_len, _ = hidden_states.shape
        query, key, value = self.c_attn(hidden_states).split(self.projection_size, dim=2)
        query, key, value = (
            t.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2) for t in (query, key, value)
        )
        query, key = apply_rotary_pos_emb(query, key, *rotary_pos_emb)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value) if use_cache else None
        if logn_scale is not None:
            query = query * logn_scale.to(query.dtype)

        context, weights = attention_core(
            query,
            key,
            value,
            attention_mask,
            dropout_p=self.attn_dropout_prob if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return self.c_proj(context), weights, present


class QWenBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(ln_1(x))``, ``out = h + mlp(ln_2(h))``."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        rotary_pos_emb: Tuple[torch.Tensor, torch.Tensor],
        logn_scale: Optional[torch.Tensor] = None,
        past_key_value: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        attn_output, weights, present = self.attn(
            self.ln_1(hidden_states),
            attention_mask,
            rotary_pos_emb,
            logn_scale,
            past_key_value,
            output_attentions,
            use_cache,
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = "past_key_values"

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
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)
        # Output projections into the residual stream start smaller (GPT-2 scheme, as the official model).
        # apply() visits children first, so this overrides the plain Linear init above.
        if isinstance(module, (QWenAttention, QWenMLP)):
            module.c_proj.weight.data.normal_(mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, QWenModel):
            module.gradient_checkpointing = value


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList([QWenBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = RotaryEmbedding(int(config.kv_channels * config.rotary_pct), base=config.rotary_emb_base)
        # NTK alpha chosen on the last prompt, reused while decoding from its cache (see module docstring).
        self._prompt_ntk_alpha: Union[float, torch.Tensor] = 1.0
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _ntk_alpha(
        self, attention_mask: Optional[torch.Tensor], batch: int, past_length: int, kv_length: int
    ) -> Union[float, torch.Tensor, None]:
        if self.training or not self.config.use_dynamic_ntk:
            return None
        if past_length == 0:
            seq_length = self.config.seq_length
            if attention_mask is not None and kv_length > seq_length:
                lengths = attention_mask.long().sum(-1).tolist()
                alphas = [qwen_ntk_alpha(n, seq_length) for n in lengths]
                alpha = alphas[0] if len(set(alphas)) == 1 else torch.tensor(alphas)
            else:
                alpha = qwen_ntk_alpha(kv_length, seq_length)
            self._prompt_ntk_alpha = alpha
        alpha = self._prompt_ntk_alpha
        if not isinstance(alpha, torch.Tensor):
            return None if alpha == 1.0 else alpha
        if alpha.numel() != batch:
            raise ValueError(
                f"QWenModel: the prompt was encoded with {alpha.numel()} per-sample NTK alphas but this decoding "
                f"step has batch size {batch}; decode the same batch the prompt was encoded with"
            )
        return alpha

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
            raise ValueError("QWenModel: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, seq_length = inputs_embeds.shape[:2]
        past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)

        ntk_alpha = self._ntk_alpha(attention_mask, batch, past_length, past_length + seq_length)
        rotary_pos_emb = self.rotary_emb(position_ids, ntk_alpha)
        logn_scale = None
        if self.config.use_logn_attn and not self.training and position_ids.max().item() + 1 > self.config.seq_length:
            logn_scale = qwen_logn_scale(position_ids, self.config.seq_length)
        attention_mask = build_attention_mask(
            attention_mask, batch, seq_length, past_length, inputs_embeds.dtype, inputs_embeds.device
        )
        hidden_states = self.drop(inputs_embeds)

        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        next_cache = () if use_cache else None
        for idx, block in enumerate(self.h):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            past_key_value = past_key_values[idx] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training:
                layer_outputs = torch.utils.checkpoint.checkpoint(
                    block, hidden_states, attention_mask, rotary_pos_emb, logn_scale, None, output_attentions, False,
                    use_reentrant=False,
                )
            else:
                layer_outputs = block(
                    hidden_states,
                    attention_mask,
                    rotary_pos_emb,
                    logn_scale,
                    past_key_value,
                    output_attentions,
                    use_cache,
                )
            hidden_states = layer_outputs[0]
            if use_cache:
                next_cache += (layer_outputs[2 if output_attentions else 1],)
            if output_attentions:
                all_attentions += (layer_outputs[1],)

        hidden_states = self.ln_f(hidden_states)
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


class QWenLMHeadModel(DecoderGenerationHooks, QWenPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def set_decoder(self, decoder):
        self.transformer = decoder

    def get_decoder(self):
        return self.transformer

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

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
        outputs = self.transformer(
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
        # Logits stay in the model dtype, as in the official model (the loss upcasts to fp32).
        logits = self.lm_head(outputs[0])
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
