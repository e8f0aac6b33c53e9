"""Family-independent pieces of the decoder-only backbones (llama, qwen, phi, stablelm, mistral).

Every family module builds its decoder from these, so rotary positions, masks and the attention
core behave identically everywhere:

* ``RMSNorm``: root-mean-square norm computed in fp32 (Llama/Qwen/Mistral).
* ``RotaryEmbedding`` + ``apply_rotary_pos_emb``: rotary position embedding over the first ``dim``
  channels of each head (partial rotary: the remaining channels pass through), with linear position
  scaling and NTK-aware base scaling (a scalar or one alpha per sample).
* ``dynamic_ntk_alpha``: the HF "dynamic" rope-scaling alpha for a sequence length.
* ``rotary_for_rope_scaling`` + ``rope_scaling_ntk_alpha``: the rotary embedding and per-forward alpha of a
  config's HF ``rope_scaling`` (``linear`` scales the positions, ``dynamic`` the base).
* ``validate_rope_scaling``: checks a config's ``rope_scaling`` dict.
* ``repeat_kv``: expands key/value heads for grouped-query attention.
* ``build_attention_mask``: the 4-D additive causal + padding mask, with an optional sliding window.
* ``attention_mask_if_needed``: that mask only where plain causal attention would differ (left padding,
  padding in the cache, an active sliding window, a chunk after cached tokens), else None, so that
  ``scaled_dot_product_attention`` runs with ``is_causal`` and no mask: the flash kernel's condition.
* ``update_kv_cache``: prepends a layer's cached keys/values and returns what to cache next.
* ``attention_core``: softmax(QK^T/sqrt(d) + mask) V over grouped key/value heads (causal when the mask is
  None), returning merged heads.
* ``SwiGLUMLP``: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama/Mistral/StableLM names).
* ``GroupedQueryAttention`` + ``RMSNormDecoderLayer``: the Llama/Mistral/StableLM attention (``q_proj`` ..
  ``o_proj``, rotary, grouped key/value heads, cache) and the Llama/Mistral pre-norm block
  (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``).
* ``decoder_layer_outputs``: the ``(hidden_states, [attentions], [present])`` tuple a decoder layer returns.
* ``init_linear_and_embedding``: the normal(0, initializer_range) init every family starts from.
* ``decoder_inputs`` + ``run_decoder_stack``: the inner model's forward around what each family adds
  (its rotary inputs, embedding dropout, extra per-layer inputs): embeddings, positions, mask, then the
  loop over layers (gradient checkpointing, cache, hidden states, attentions) and the final norm.
* ``causal_lm_loss``: next-token cross entropy.
* ``DecoderGenerationHooks``: ``prepare_inputs_for_generation`` / ``_reorder_cache`` for the
  legacy tuple cache (one ``(key, value)`` per layer, ``[batch, kv_heads, seq, head_dim]``).
* ``DecoderForCausalLM``: the causal-LM head over an inner model: accessors, forward with the loss.
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from moellava.constants import IGNORE_INDEX

logger = logging.get_logger(__name__)

KVCache = Tuple[torch.Tensor, torch.Tensor]


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


def rotary_for_rope_scaling(dim: int, base: float, rope_scaling: Optional[dict]) -> RotaryEmbedding:
    """The rotary embedding of an HF ``rope_scaling`` config field: ``linear`` divides the positions by its
    factor; ``dynamic`` changes the base per forward (``rope_scaling_ntk_alpha``); None: plain."""
    rope_scaling = rope_scaling or {}
    factor = rope_scaling["factor"] if rope_scaling.get("type") == "linear" else 1.0
    return RotaryEmbedding(dim, base=base, scaling_factor=factor)


def rope_scaling_ntk_alpha(
    rope_scaling: Optional[dict], max_position_embeddings: int, kv_length: int
) -> Optional[float]:
    """The NTK alpha of a forward over ``kv_length`` tokens (past + new) under ``dynamic`` rope scaling, else
    None."""
    if rope_scaling is None or rope_scaling["type"] != "dynamic":
        return None
    return dynamic_ntk_alpha(kv_length, max_position_embeddings, rope_scaling["factor"])


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


def _check_mask_shape(attention_mask: torch.Tensor, batch_size: int, kv_length: int) -> None:
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, kv_length):
        raise ValueError(
            f"attention_mask must be 2-D [batch, past + new tokens] = [{batch_size}, {kv_length}], got "
            f"{tuple(attention_mask.shape)}; when decoding with past_key_values pass the mask of the "
            "whole sequence so far"
        )


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
        _check_mask_shape(attention_mask, batch_size, kv_length)
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def attention_mask_if_needed(
    attention_mask: Optional[torch.Tensor],
    batch_size: int,
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """``build_attention_mask(...)`` where it changes what a real token attends to, else None (plain causal
    attention: ``attention_core`` then runs SDPA with ``is_causal``, which PyTorch's flash kernel accepts).

    No mask is needed when the 2-D ``attention_mask`` is absent or all ones, or right padding only with no
    cache (training batches: a real token never sees the padding after it; the padding positions' own
    outputs differ, and nothing reads them: their labels are ignored), provided the sliding window covers
    every key and the queries either start the sequence or are a single decoding step.
    """
    kv_length = past_length + query_length
    if attention_mask is not None:
        _check_mask_shape(attention_mask, batch_size, kv_length)
    window_acts = sliding_window is not None and kv_length > sliding_window
    # SDPA's is_causal aligns the first query with the first key: right for a whole sequence, and a single
    # query sees every key anyway; a chunk of several queries after cached keys needs the explicit mask.
    causal_aligns = past_length == 0 or query_length == 1
    padding_matters = False
    if attention_mask is not None:
        real = attention_mask.bool()
        right_padded_only = bool((real[:, 1:] <= real[:, :-1]).all())
        padding_matters = not (bool(real.all()) or (past_length == 0 and right_padded_only))
    if window_acts or not causal_aligns or padding_matters:
        return build_attention_mask(attention_mask, batch_size, query_length, past_length, dtype, device,
                                    sliding_window=sliding_window)
    return None


def update_kv_cache(
    key: torch.Tensor, value: torch.Tensor, past_key_value: Optional[KVCache], use_cache: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[KVCache]]:
    """Keys/values of this step (``[batch, kv_heads, seq, head_dim]``) after the layer's cached ones; returns
    ``(key, value, present)`` with ``present`` the pair to cache (None unless ``use_cache``)."""
    if past_key_value is not None:
        key = torch.cat([past_key_value[0], key], dim=2)
        value = torch.cat([past_key_value[1], value], dim=2)
    return key, value, (key, value) if use_cache else None


def attention_core(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout_p: float = 0.0,
    output_attentions: bool = False,
    upcast: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``softmax(q k^T / sqrt(head_dim) + mask) v`` for ``[batch, heads, seq, head_dim]`` inputs. Keys and
    values may have fewer heads (grouped-query attention): each is shared by ``heads / kv_heads`` queries.
    ``attention_mask`` None means causal (query i sees keys 0..i; a single query sees every key), computed
    by SDPA's ``is_causal`` without materialising a mask (see ``attention_mask_if_needed``).

    Returns the context with heads merged, ``[batch, q_len, heads * head_dim]`` in the query dtype, and
    the attention probabilities when ``output_attentions`` (otherwise None: the fused SDPA kernel runs).
    ``upcast`` computes in fp32. The caller passes ``dropout_p=0`` in eval.
    """
    groups, rest = divmod(query.shape[1], key.shape[1])
    if rest:
        raise ValueError(
            f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads; num_attention_heads must "
            "be a multiple of num_key_value_heads in config.json"
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = attention_mask is None and q_len > 1
    if is_causal and q_len != kv_len:
        raise ValueError(
            f"causal attention without a mask needs as many queries as keys, got {q_len} and {kv_len}; build the "
            "mask with attention_mask_if_needed (it does so for a chunk after cached tokens)"
        )
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out_dtype = query.dtype
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    if attention_mask is not None:
        attention_mask = attention_mask.to(query.dtype)
    weights = None
    if output_attentions:
        if is_causal:
            attention_mask = build_attention_mask(None, 1, q_len, 0, query.dtype, query.device)
        scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        context = torch.matmul(F.dropout(weights, p=dropout_p, training=dropout_p > 0), value)
    else:
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout_p, is_causal=is_causal
        )
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


class GroupedQueryAttention(nn.Module):
    """Llama-style attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; rotary queries and keys;
    ``num_key_value_heads`` key/value heads, each shared by ``num_heads / num_key_value_heads`` query heads.
    ``bias`` is that of the q/k/v projections, ``output_bias`` that of ``o_proj`` (default: ``bias``); a
    family that normalises queries and keys per head overrides ``normalize_query_key``."""

    def __init__(self, hidden_size: int, num_heads: int, num_key_value_heads: int, head_dim: int,
                 attention_dropout: float = 0.0, bias: bool = False, output_bias: Optional[bool] = None):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_key_value_heads, head_dim
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias if output_bias is None else output_bias)

    def normalize_query_key(self, query: torch.Tensor, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``[batch, heads, seq, head_dim]`` before the rotary embedding: unchanged here."""
        return query, key

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        rotary_pos_emb: Tuple[torch.Tensor, torch.Tensor],
        past_key_value: Optional[KVCache] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        query, key = self.normalize_query_key(query, key)

        query, key = apply_rotary_pos_emb(query, key, *rotary_pos_emb)
        key, value, present = update_kv_cache(key, value, past_key_value, use_cache)
        context, weights = attention_core(
            query,
            key,
            value,
            attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return self.o_proj(context), weights, present


class RMSNormDecoderLayer(nn.Module):
    """Llama / Mistral pre-norm block: ``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))`` with RMSNorm and a
    SwiGLU ``mlp``. Reads ``hidden_size``, ``intermediate_size``, ``hidden_act``, ``rms_norm_eps``,
    ``num_attention_heads``, ``num_key_value_heads`` and, when present, ``attention_dropout`` and
    ``attention_bias`` from ``config``."""

    def __init__(self, config, head_dim: int):
        super().__init__()
        self.self_attn = GroupedQueryAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            attention_dropout=getattr(config, "attention_dropout", 0.0),
            bias=getattr(config, "attention_bias", False),
        )
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        rotary_pos_emb: Tuple[torch.Tensor, torch.Tensor],
        past_key_value: Optional[KVCache] = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        attn_output, weights, present = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, rotary_pos_emb, past_key_value, output_attentions,
            use_cache,
        )
        residual = hidden_states + attn_output
        hidden_states = residual + self.mlp(self.post_attention_layernorm(residual))
        return decoder_layer_outputs(hidden_states, weights, present, output_attentions, use_cache)


def decoder_layer_outputs(
    hidden_states: torch.Tensor,
    weights: Optional[torch.Tensor],
    present: Optional[KVCache],
    output_attentions: bool,
    use_cache: bool,
) -> tuple:
    """A decoder layer's return value, as transformers' layers give it: ``(hidden_states, [attentions], [present])``."""
    outputs = (hidden_states,)
    if output_attentions:
        outputs += (weights,)
    if use_cache:
        outputs += (present,)
    return outputs


def init_linear_and_embedding(module: nn.Module, std: float) -> None:
    """``_init_weights`` of every family: linear and embedding weights ~ N(0, std), biases and the padding row 0."""
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=std)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=std)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()


def decoder_inputs(
    model: nn.Module,
    input_ids: Optional[torch.LongTensor],
    inputs_embeds: Optional[torch.FloatTensor],
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.LongTensor],
    past_key_values: Optional[Sequence[KVCache]],
    sliding_window: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.LongTensor, int]:
    """What an inner model's layers start from: ``(inputs_embeds, causal_mask, position_ids, past_length)``.

    Embeds ``input_ids`` with ``model.get_input_embeddings()`` unless ``inputs_embeds`` are given; positions
    default to ``past_length ..``; ``causal_mask`` is the 4-D mask of ``build_attention_mask`` where one is
    needed, else None (plain causal attention, see ``attention_mask_if_needed``).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{type(model).__name__}: pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    batch, seq_length = inputs_embeds.shape[:2]
    past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
    if position_ids is None:
        position_ids = torch.arange(past_length, past_length + seq_length, device=inputs_embeds.device)
        position_ids = position_ids.unsqueeze(0).expand(batch, -1)
    causal_mask = attention_mask_if_needed(
        attention_mask,
        batch,
        seq_length,
        past_length,
        inputs_embeds.dtype,
        inputs_embeds.device,
        sliding_window=sliding_window,
    )
    return inputs_embeds, causal_mask, position_ids, past_length


def run_decoder_stack(
    model: nn.Module,
    layers: nn.ModuleList,
    final_norm: nn.Module,
    hidden_states: torch.Tensor,
    layer_inputs: tuple,
    past_key_values: Optional[Sequence[KVCache]],
    *,
    use_cache: Optional[bool],
    output_attentions: Optional[bool],
    output_hidden_states: Optional[bool],
    return_dict: Optional[bool],
) -> Union[Tuple, BaseModelOutputWithPast]:
    """Runs ``hidden_states`` through ``layers`` and ``final_norm``, as transformers' decoder models do.

    Each layer is called as ``layer(hidden_states, *layer_inputs, past_key_value, output_attentions,
    use_cache)`` and returns ``(hidden_states, [attentions], [present])``. The flags default to
    ``model.config``; under gradient checkpointing (``model.gradient_checkpointing`` in training) no cache
    is built.
    """
    config = model.config
    output_attentions = output_attentions if output_attentions is not None else config.output_attentions
    output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    use_cache = use_cache if use_cache is not None else config.use_cache
    return_dict = return_dict if return_dict is not None else config.use_return_dict
    checkpointing = model.gradient_checkpointing and model.training
    if checkpointing and use_cache:
        logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
        use_cache = False

    all_hidden_states = () if output_hidden_states else None
    all_attentions = () if output_attentions else None
    next_cache = () if use_cache else None
    for idx, layer in enumerate(layers):
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        past_key_value = past_key_values[idx] if past_key_values is not None else None
        if checkpointing:
            # Non-reentrant: gradients reach every input, including a MoE block's auxiliary loss.
            layer_outputs = torch.utils.checkpoint.checkpoint(
                layer, hidden_states, *layer_inputs, None, output_attentions, False, use_reentrant=False
            )
        else:
            layer_outputs = layer(hidden_states, *layer_inputs, past_key_value, output_attentions, use_cache)
        hidden_states = layer_outputs[0]
        if use_cache:
            next_cache += (layer_outputs[2 if output_attentions else 1],)
        if output_attentions:
            all_attentions += (layer_outputs[1],)

    hidden_states = final_norm(hidden_states)
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


class DecoderForCausalLM(DecoderGenerationHooks):
    """Placed before the family's PreTrainedModel: ``MistralForCausalLM(DecoderForCausalLM, MistralPreTrainedModel)``.

    The family's ``__init__`` builds the inner model at ``base_model_prefix`` ("model", or QWen's
    "transformer") and ``lm_head``. Logits are fp32 unless ``fp32_logits`` is False (the loss is fp32 anyway).
    """

    fp32_logits = True

    def get_input_embeddings(self):
        return self.get_decoder().get_input_embeddings()

    def set_input_embeddings(self, value):
        self.get_decoder().set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def set_decoder(self, decoder):
        setattr(self, self.base_model_prefix, decoder)

    def get_decoder(self):
        return getattr(self, self.base_model_prefix)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[KVCache]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.get_decoder()(
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
        logits = self.lm_head(outputs[0])
        if self.fp32_logits:
            logits = logits.float()
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
