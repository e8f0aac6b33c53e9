"""The native MoE dispatcher: sorted/indexed dispatch on one device, no process group needed.

It stands where DeepSpeed's `MOELayer` stands (`MoEBlock.deepspeed_moe`) and holds the same `gate` and
`experts` submodules, so the parameter names, and therefore checkpoints, are DeepSpeed's.
"""

from typing import Optional

import torch
from torch import nn

from .routing import Routing, expert_capacity, route_tokens


class NativeMoELayer(nn.Module):
    """Route tokens, run each expert once on the tokens routed to it, combine the gate-weighted results.

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
    """Sum over each token's kept choices of gate * expert(token), accumulated in fp32 like DeepSpeed.

    The S * k (token, choice) routes are permuted so each expert's kept routes are contiguous (stable:
    token order inside an expert), dropped routes last; each expert runs once on its block; the results
    are permuted back and combined per token. Both permutations backpropagate as gathers.
    """
    num_tokens, top_k = routing.expert_index.shape
    num_experts = len(experts)
    # Sort key: the expert for a kept route, num_experts (after every expert) for a dropped one.
    key = torch.where(routing.kept, routing.expert_index, num_experts).reshape(-1)
    order = torch.argsort(key, stable=True)
    inverse = torch.argsort(order)
    counts = torch.bincount(key, minlength=num_experts + 1).tolist()
    routed = _GatherRows.apply(tokens, order, inverse, top_k)

    # Every expert runs, even on zero tokens, so each expert parameter is in the graph on every step
    # (gradient reduction across data-parallel ranks expects the same parameters to get gradients).
    outputs = []
    for expert, chunk in zip(experts, routed.split(counts)):
        out = expert(chunk)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    hidden = outputs[0].shape[-1]
    outputs.append(outputs[0].new_zeros(counts[num_experts], hidden))  # dropped routes contribute 0
    per_route = _GatherRows.apply(torch.cat(outputs), inverse, order, 1)
    return _GateCombine.apply(per_route.view(num_tokens, top_k, hidden), routing.gate)


class _GateCombine(torch.autograd.Function):
    """`sum_j gate[:, j] * routes[:, j]`, accumulated in fp32, returned in the routes' dtype.

    Only the inputs are saved for backward (the routes in the model dtype, the fp32 gate): in bf16, writing
    it as `(routes.float() * gate).sum(1)` would keep an fp32 copy of every routed expert output alive until
    backward. The fp32 temporaries here, forward and backward, are one token-choice column at a time.
    """

    @staticmethod
    def forward(ctx, routes: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(routes, gate)
        combined = routes[:, 0].float() * gate[:, :1]
        for j in range(1, routes.shape[1]):
            combined += routes[:, j].float() * gate[:, j : j + 1]
        return combined.to(routes.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        routes, gate = ctx.saved_tensors
        grad = grad.float()
        grad_routes = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_routes = torch.empty_like(routes)
            for j in range(routes.shape[1]):
                grad_routes[:, j] = grad * gate[:, j : j + 1]
        if ctx.needs_input_grad[1]:
            grad_gate = torch.stack([(routes[:, j].float() * grad).sum(-1) for j in range(routes.shape[1])], dim=1)
        return grad_routes, grad_gate


class _GatherRows(torch.autograd.Function):
    """`rows[index // group]` for a permutation `index` of n * group entries, `inverse` its inverse.

    The backward gathers through `inverse` and sums each source row's `group` copies, instead of the
    scatter-add autograd would use for an index_select (several times slower on CPU).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, group: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.group = group
        return rows.index_select(0, torch.div(index, group, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)
        return grad.view(-1, ctx.group, grad.shape[-1]).sum(dim=1), None, None, None
