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
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..common import (
    DecoderForCausalLM,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary_pos_emb,
    attention_core,
    decoder_inputs,
    decoder_layer_outputs,
    init_linear_and_embedding,
    run_decoder_stack,
    update_kv_cache,
)
from .configuration_qwen import QWenConfig


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
        key, value, present = update_kv_cache(key, value, past_key_value, use_cache)
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
        return decoder_layer_outputs(hidden_states, weights, present, output_attentions, use_cache)


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        std = self.config.initializer_range
        init_linear_and_embedding(module, std)
        if isinstance(module, RMSNorm):
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
        inputs_embeds, causal_mask, position_ids, past_length = decoder_inputs(
            self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values
        )
        batch, seq_length = inputs_embeds.shape[:2]
        ntk_alpha = self._ntk_alpha(attention_mask, batch, past_length, past_length + seq_length)
        rotary_pos_emb = self.rotary_emb(position_ids, ntk_alpha)
        logn_scale = None
        if self.config.use_logn_attn and not self.training and position_ids.max().item() + 1 > self.config.seq_length:
            logn_scale = qwen_logn_scale(position_ids, self.config.seq_length)
        hidden_states = self.drop(inputs_embeds)
        return run_decoder_stack(
            self, self.h, self.ln_f, hidden_states, (causal_mask, rotary_pos_emb, logn_scale), past_key_values,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class QWenLMHeadModel(DecoderForCausalLM, QWenPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]
    # Logits stay in the model dtype, as in the official model (the loss upcasts to fp32).
    fp32_logits = False

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h
