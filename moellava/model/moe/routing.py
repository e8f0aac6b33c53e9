"""Top-1 / top-2 token routing with the semantics of DeepSpeed's GShard gate (`deepspeed/moe/sharded_moe.py`).

Differences from DeepSpeed, on purpose: the second top-2 choice is the deterministic runner-up (DeepSpeed
samples it with Gumbel noise unless `top2_2nd_expert_sampling=False`, which our deepspeed backend passes),
and top-1 capacity drops tokens in token order (DeepSpeed's default Random Token Selection picks a random
subset of the same size).
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class Routing(NamedTuple):
    """One forward's routing decisions for S tokens, E experts and k choices per token."""

    expert_index: torch.Tensor  # [S, k] long: first choice, then second choice
    gate: torch.Tensor  # [S, k] fp32 combine weights; 0 for a dropped choice
    kept: torch.Tensor  # [S, k] bool: False where the expert was full
    aux_loss: torch.Tensor  # scalar fp32 load-balancing loss, computed before dropping
    tokens_per_expert: torch.Tensor  # [E] long: choices routed to each expert, before dropping


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, top_k: int, min_capacity: int) -> int:
    """Slots per expert: ceil(S / E * capacity_factor * k), at least `min_capacity`.

    Computed with a float32 factor exactly as DeepSpeed does, so both backends agree at rounding edges.
    """
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * top_k))
    return max(int(capacity), min_capacity)


def route_tokens(logits: torch.Tensor, top_k: int, capacity: Optional[int] = None) -> Routing:
    """Route tokens from router logits [S, E]; `capacity=None` keeps every choice (dropless).

    Top-1: the argmax expert, gate = its softmax probability, aux = sum(me * ce) * E.
    Top-2: argmax and runner-up, gates renormalised over the surviving pair, aux = mean(me * ce) * E * E.
    `me` is the mean router probability per expert and `ce` the fraction of tokens whose first choice it is.
    With a capacity, choices take buffer positions in token order, every first choice before any second
    choice, and those at positions >= capacity are dropped.
    """
    logits = logits.float()
    gates = F.softmax(logits, dim=1)
    num_experts = gates.shape[1]
    first = torch.argmax(gates, dim=1)
    first_mask = F.one_hot(first, num_experts)
    me = gates.mean(dim=0)
    ce = first_mask.float().mean(dim=0)
    if top_k == 1:
        aux_loss = (me * ce).sum() * num_experts
        masks = [first_mask]
        expert_index = first.unsqueeze(1)
    elif top_k == 2:
        aux_loss = (me * ce).mean() * num_experts * num_experts
        second = torch.argmax(logits.masked_fill(first_mask.bool(), float("-inf")), dim=1)
        masks = [first_mask, F.one_hot(second, num_experts)]
        expert_index = torch.stack([first, second], dim=1)
    else:
        raise ValueError(f"top_k={top_k} is not supported: use 1 or 2.")
    tokens_per_expert = sum(mask.sum(dim=0) for mask in masks)

    if capacity is None:
        kept = torch.ones_like(expert_index, dtype=torch.bool)
    else:
        positions = []
        offset = torch.zeros_like(tokens_per_expert)
        for choice, mask in enumerate(masks):
            slot = torch.cumsum(mask, dim=0) - 1 + offset
            positions.append(slot.gather(1, expert_index[:, choice:choice + 1]))
            offset = offset + mask.sum(dim=0)
        kept = torch.cat(positions, dim=1) < capacity

    gate = gates.gather(1, expert_index) * kept
    if top_k == 2:
        gate = gate / gate.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gate.dtype).eps)
    return Routing(expert_index, gate, kept, aux_loss, tokens_per_expert)
