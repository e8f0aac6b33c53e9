"""Family-independent pieces of the decoder-only backbones (qwen, phi, stablelm, mistral).

Every family module builds its decoder from these, so rotary positions, masks and the attention
core behave identically everywhere:

* ``RMSNorm``: root-mean-square norm computed in fp32 (Llama/Qwen/Mistral).
* ``RotaryEmbedding`` + ``apply_rotary_pos_emb``: rotary position embedding over the first ``dim``
  channels of each head (partial rotary: the remaining channels pass through), with linear position
  scaling and NTK-aware base scaling (a scalar or one alpha per sample).
* ``dynamic_ntk_alpha``: the HF "dynamic" rope-scaling alpha for a sequence length.
* ``validate_rope_scaling``: checks a config's ``rope_scaling`` dict.
* ``repeat_kv``: expands key/value heads for grouped-query attention.
* ``build_attention_mask``: the 4-D additive causal + padding mask, with an optional sliding window.
* ``attention_core``: softmax(QK^T/sqrt(d) + mask) V, returning merged heads.
* ``SwiGLUMLP``: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama/Mistral/StableLM names).
* ``causal_lm_loss``: next-token cross entropy.
* ``DecoderGenerationHooks``: ``prepare_inputs_for_generation`` / ``_reorder_cache`` for the
  legacy tuple cache (one ``(key, value)`` per layer, ``[batch, kv_heads, seq, head_dim]``).
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from moellava.constants import IGNORE_INDEX


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16/fp16 activations do not lose the variance.
        input_dtype = hidden_states.dtype
        hidden = hidden_states.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding over ``dim`` channels per head.

    ``scaling_factor`` divides the positions (HF "linear" rope scaling). ``ntk_alpha`` (a float or a
    tensor with one value per sample) raises the base to ``base * alpha ** (dim / (dim - 2))``
    (NTK-aware scaling, used by Qwen's dynamic NTK and HF "dynamic" rope scaling).

    The frequencies are computed in fp32 at every call rather than kept in a buffer: a buffer would be
    cast with the model to bf16/fp16 and lose precision.
    """

    def __init__(self, dim: int, base: float = 10000.0, scaling_factor: float = 1.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(
                f"rotary dimension must be a positive even number, got {dim}; check the head size and "
                "the rotary fraction (rotary_pct / partial_rotary_factor / rope_pct) in config.json"
            )
        if scaling_factor <= 0:
            raise ValueError(f"rotary scaling_factor must be > 0, got {scaling_factor}")
        self.dim = dim
        self.base = float(base)
        self.scaling_factor = float(scaling_factor)

    def inv_freq(self, device, ntk_alpha: Union[float, torch.Tensor, None] = None) -> torch.Tensor:
        """Inverse frequencies ``[n, dim/2]`` in fp32: n = 1, or one row per sample of ``ntk_alpha``."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        if ntk_alpha is None:
            base = torch.tensor([[self.base]], dtype=torch.float32, device=device)
        else:
            alpha = torch.as_tensor(ntk_alpha, dtype=torch.float64, device=device).reshape(-1, 1)
            base = (self.base * alpha ** (self.dim / (self.dim - 2))).float()
        return 1.0 / (base**exponent)

    def forward(
        self, position_ids: torch.LongTensor, ntk_alpha: Union[float, torch.Tensor, None] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [batch, seq]`` -> ``(cos, sin)``, each ``[batch, 1, seq, dim]`` in fp32."""
        inv_freq = self.inv_freq(position_ids.device, ntk_alpha)
        positions = position_ids.float() / self.scaling_factor
        freqs = positions[:, :, None] * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :, :]
        return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, scaling_factor={self.scaling_factor}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first ``cos.shape[-1]`` channels of ``query``/``key`` (``[batch, heads, seq, head_dim]``)
    in fp32; the remaining channels pass through unchanged (partial rotary)."""
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def dynamic_ntk_alpha(seq_len: int, max_position_embeddings: int, factor: float) -> float:
    """NTK alpha of HF "dynamic" rope scaling: 1 within ``max_position_embeddings``, growing beyond."""
    if seq_len <= max_position_embeddings:
        return 1.0
    return factor * seq_len / max_position_embeddings - (factor - 1)


def validate_rope_scaling(rope_scaling: Optional[dict]) -> None:
    """``rope_scaling`` must be None or ``{"type": "linear" | "dynamic", "factor": float > 1}``."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict) or set(rope_scaling) != {"type", "factor"}:
        raise ValueError(
            f"rope_scaling must be a dict with exactly the fields 'type' and 'factor', got {rope_scaling!r}; "
            'fix config.json, e.g. "rope_scaling": {"type": "linear", "factor": 2.0}, or set it to null'
        )
    if rope_scaling["type"] not in ("linear", "dynamic"):
        raise ValueError(f"rope_scaling type must be 'linear' or 'dynamic', got {rope_scaling['type']!r}")
    factor = rope_scaling["factor"]
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1.0:
        raise ValueError(f"rope_scaling factor must be a number > 1, got {factor!r}")


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[batch, kv_heads, seq, head_dim]`` -> ``[batch, kv_heads * n_rep, seq, head_dim]``."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def build_attention_mask(
    attention_mask: Optional[torch.Tensor],
    batch_size: int,
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: Optional[int] = None,
) -> torch.Tensor:
    """4-D additive mask ``[batch, 1, query_length, past_length + query_length]``: 0 where a query may
    attend, ``finfo(dtype).min`` elsewhere.

    The query at key index ``i`` (``past_length`` + its index in the chunk) sees keys ``j <= i``; with a
    ``sliding_window`` W only ``i - W < j <= i`` (W keys, itself included). ``attention_mask`` is the
    usual 2-D ``[batch, past_length + query_length]`` mask (1 = token, 0 = padding) or None.
    A query with no visible key (left padding) gets a uniform, finite softmax instead of NaN.
    """
    kv_length = past_length + query_length
    query_index = torch.arange(past_length, kv_length, device=device)[:, None]
    key_index = torch.arange(kv_length, device=device)[None, :]
    allowed = key_index <= query_index
    if sliding_window is not None:
        if sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive number of tokens, got {sliding_window}")
        allowed = allowed & (key_index > query_index - sliding_window)
    allowed = allowed[None, None, :, :].expand(batch_size, 1, query_length, kv_length)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, kv_length):
            raise ValueError(
                f"attention_mask must be 2-D [batch, past + new tokens] = [{batch_size}, {kv_length}], got "
                f"{tuple(attention_mask.shape)}; when decoding with past_key_values pass the mask of the "
                "whole sequence so far"
            )
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def attention_core(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout_p: float = 0.0,
    output_attentions: bool = False,
    upcast: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``softmax(q k^T / sqrt(head_dim) + mask) v`` for ``[batch, heads, seq, head_dim]`` inputs (keys and
    values already repeated to the query heads).

    Returns the context with heads merged, ``[batch, q_len, heads * head_dim]`` in the query dtype, and
    the attention probabilities when ``output_attentions`` (otherwise None: the fused SDPA kernel runs).
    ``upcast`` computes in fp32 (Phi-2's scores overflow fp16). The caller passes ``dropout_p=0`` in eval.
    """
    out_dtype = query.dtype
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    if attention_mask is not None:
        attention_mask = attention_mask.to(query.dtype)
    weights = None
    if output_attentions:
        scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        context = torch.matmul(F.dropout(weights, p=dropout_p, training=dropout_p > 0), value)
    else:
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout_p)
    batch, heads, q_len, head_dim = context.shape
    context = context.transpose(1, 2).reshape(batch, q_len, heads * head_dim).to(out_dtype)
    return context, weights


class SwiGLUMLP(nn.Module):
    """Gated FFN ``down_proj(act(gate_proj(x)) * up_proj(x))`` with the Llama parameter names."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        if hidden_act not in ACT2FN:
            raise ValueError(f"unknown hidden_act {hidden_act!r}; choose one of {sorted(ACT2FN)}")
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def causal_lm_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Mean next-token cross entropy: position t predicts ``labels[t + 1]``; IGNORE_INDEX is skipped."""
    vocab_size = logits.shape[-1]
    shift_logits = logits[..., :-1, :].contiguous().view(-1, vocab_size).float()
    shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


class DecoderGenerationHooks:
    """Generation hooks for a decoder with the legacy tuple cache, as in transformers 4.31's Llama.

    (Not named "...GenerationMixin": transformers 4.31's ``can_generate()`` refuses any class whose
    ``prepare_inputs_for_generation`` comes from a class with that name.)
    """

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, **kwargs
    ):
        if past_key_values:
            input_ids = input_ids[:, -1:]
        position_ids = kwargs.get("position_ids", None)
        if attention_mask is not None and position_ids is None:
            # Left padding: each sample's positions count its real tokens only.
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -1].unsqueeze(-1)
        # inputs_embeds only on the first step; later steps feed the generated token ids.
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update(
            {
                "position_ids": position_ids,
                "past_key_values": past_key_values,
                "use_cache": kwargs.get("use_cache"),
                "attention_mask": attention_mask,
            }
        )
        return model_inputs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(
            tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer_past)
            for layer_past in past_key_values
        )
