"""The pre-LayerNorm ViT encoder that CLIP and SigLIP share, on `scaled_dot_product_attention` (no attention
matrix is materialised; a GPU takes the fused kernels), with their common weight names:
``layers.N.{layer_norm1, self_attn.{q_proj, k_proj, v_proj, out_proj}, layer_norm2, mlp.{fc1, fc2}}``.

The config fields read are those of transformers' `CLIPVisionConfig` and our `SiglipVisionConfig`:
``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, ``hidden_act``,
``layer_norm_eps``, ``attention_dropout``.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class VisionAttention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), scaled by 1/sqrt(head_dim)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        if self.head_dim * self.num_heads != config.hidden_size:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {self.num_heads}."
            )
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query = heads(self.q_proj(hidden_states))
        key = heads(self.k_proj(hidden_states))
        value = heads(self.v_proj(hidden_states))
        attn = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(attn.transpose(1, 2).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: ``h = x + attn(ln1(x))``, ``out = h + mlp(ln2(h))``."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class VisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, inputs_embeds: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """Returns the last layer's output and every hidden state (the input first, then each layer's)."""
        hidden_states = inputs_embeds
        all_states = [hidden_states]
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            all_states.append(hidden_states)
        return hidden_states, tuple(all_states)
