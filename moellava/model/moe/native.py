"""The native MoE dispatcher: sorted/indexed dispatch on one device, no process group needed.

It stands where DeepSpeed's `MOELayer` stands (`MoEBlock.deepspeed_moe`) and holds the same `gate` and
`experts` submodules, so the parameter names, and therefore checkpoints, are DeepSpeed's.
"""

from typing import Optional

import torch
from torch import nn

from .routing import Routing, expert_capacity, route_tokens


class NativeMoELayer(nn.Module):
    """Route tokens, run each expert once on the tokens routed to it, scatter-add the weighted results.

    After a forward, `l_aux`, `exp_counts` and `dropped_fraction` hold that forward's aux loss (with
    grad), tokens per expert and fraction of dropped token-choices, mirroring DeepSpeed's `MOELayer`.
    """

    def __init__(
        self,
        gate: nn.Module,
        experts: nn.Module,
        *,
        top_k: int,
        capacity_factor: float,
        eval_capacity_factor: float,
        min_capacity: int,
        drop_tokens: bool,
    ) -> None:
        super().__init__()
        self.gate = gate  # DeepSpeed's TopKGate: only its `wg` router is used
        self.experts = experts  # DeepSpeed's Experts: `deepspeed_experts` is a ModuleList
        self.num_experts = len(experts.deepspeed_experts)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.ep_group = None
        self.l_aux: Optional[torch.Tensor] = None
        self.exp_counts: Optional[torch.Tensor] = None
        self.dropped_fraction: Optional[torch.Tensor] = None

    def _set_ep_group(self, ep_group) -> None:
        # Called by DeepSpeed's engine through MoE.set_deepspeed_parallelism; every expert is local here.
        self.ep_group = ep_group

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = nn.functional.linear(tokens.float(), self.gate.wg.weight.float())
        capacity = None
        if self.drop_tokens:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = expert_capacity(tokens.shape[0], self.num_experts, factor, self.top_k, self.min_capacity)
        routing = route_tokens(logits, self.top_k, capacity)
        self.l_aux = routing.aux_loss
        self.exp_counts = routing.tokens_per_expert.detach()
        self.dropped_fraction = (~routing.kept).float().mean().detach()
        combined = dispatch(tokens, routing, self.experts.deepspeed_experts)
        return combined.reshape(hidden_states.shape)


def dispatch(tokens: torch.Tensor, routing: Routing, experts: nn.ModuleList) -> torch.Tensor:
    """Sum over each token's kept choices of gate * expert(token), accumulated in fp32 like DeepSpeed."""
    num_tokens, top_k = routing.expert_index.shape
    flat_expert = routing.expert_index.reshape(-1)
    flat_token = torch.arange(num_tokens, device=tokens.device).repeat_interleave(top_k)
    flat_gate = routing.gate.reshape(-1)

    # Kept choices grouped by expert; a stable sort keeps token order inside each group.
    chosen = routing.kept.reshape(-1).nonzero().squeeze(1)
    chosen = chosen[torch.argsort(flat_expert[chosen], stable=True)]
    counts = torch.bincount(flat_expert[chosen], minlength=len(experts)).tolist()
    token_ids = flat_token[chosen]
    inputs = tokens.index_select(0, token_ids)

    # Every expert runs, even on zero tokens, so each expert parameter is in the graph on every step
    # (gradient reduction across data-parallel ranks expects the same parameters to get gradients).
    outputs = []
    for expert, chunk in zip(experts, inputs.split(counts)):
        out = expert(chunk)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    weighted = torch.cat(outputs).float() * flat_gate[chosen].unsqueeze(1)
    combined = torch.zeros(num_tokens, weighted.shape[1], dtype=torch.float32, device=tokens.device)
    combined.index_add_(0, token_ids, weighted)
    return combined.to(tokens.dtype)
