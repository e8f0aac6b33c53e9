"""Reading MoE blocks out of a model: the blocks, their last aux losses and routing, the balance of a load,
and a global state dict."""

import math
import re
from collections import OrderedDict
from typing import Dict, List

import torch
from deepspeed import comm as ds_comm
from torch import nn

from .layer import EXPERT_KEY, MoEBlock


def moe_blocks(model: nn.Module) -> List[MoEBlock]:
    """The model's MoE blocks in layer order."""
    return [module for module in model.modules() if isinstance(module, MoEBlock)]


def _blocks_after_forward(model: nn.Module) -> List[MoEBlock]:
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("The model has no MoE layers: call convert_layers_to_moe first.")
    if any(block.last_aux_loss is None for block in blocks):
        raise RuntimeError("No forward has run through the MoE layers yet: run the model first.")
    return blocks


def aux_loss_total(model: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' aux losses from the last forward, detached (for logging; it is already in
    the gradient through each block's output, see `moellava.model.moe.layer`)."""
    return torch.stack([block.last_aux_loss for block in _blocks_after_forward(model)]).sum()


def routing_stats(model: nn.Module) -> List[Dict]:
    """Per MoE layer, from the last forward: layer index, token-choices per expert, dropped fraction, aux loss."""
    return [
        {
            "layer": block.layer_idx,
            "tokens_per_expert": block.last_tokens_per_expert.tolist(),
            "dropped_fraction": float(block.last_dropped_fraction),
            "aux_loss": float(block.last_aux_loss),
        }
        for block in _blocks_after_forward(model)
    ]


def load_balance(tokens_per_expert: torch.Tensor) -> float:
    """How evenly tokens spread over the experts: the entropy of their shares divided by its maximum,
    log(experts). 1.0 = every expert equally loaded, 0.0 = one expert takes everything; NaN for no tokens."""
    counts = tokens_per_expert.detach().double().flatten()
    if counts.numel() < 2 or counts.sum() <= 0:
        return float("nan")
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * shares.log()).sum() / math.log(counts.numel()))


def expert_parallel_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """`model.state_dict()` with every expert under its global index.

    With the deepspeed backend and ep_size > 1, rank r of an expert-parallel group holds experts
    [r * L, (r + 1) * L) as local 0..L-1; they are all-gathered over the group so that the result has the
    single-process layout (`MoEBlock` loads it back on any ep_size). A collective: call it on every rank.
    """
    state = model.state_dict()
    for prefix, block in model.named_modules():
        if isinstance(block, MoEBlock) and block.ep_size > 1:
            state = _gather_experts(state, f"{prefix}.{EXPERT_KEY}" if prefix else EXPERT_KEY, block)
    return state


def _gather_experts(state: "OrderedDict[str, torch.Tensor]", expert_prefix: str, block: MoEBlock):
    pattern = re.compile(re.escape(expert_prefix) + r"(\d+)\.(.+)")
    experts = []  # (global index, key, tensor)
    for key, value in state.items():
        match = pattern.fullmatch(key)
        if match:
            local, rest = int(match.group(1)), match.group(2)
            parts = [torch.empty_like(value) for _ in range(block.ep_size)]
            ds_comm.all_gather(parts, value.contiguous(), group=block.deepspeed_moe.ep_group)
            for rank, part in enumerate(parts):
                index = rank * block.num_local_experts + local
                experts.append((index, f"{expert_prefix}{index}.{rest}", part))
    experts.sort(key=lambda item: item[0])  # stable: parameter order within an expert is kept
    gathered = OrderedDict()
    for key, value in state.items():
        if not pattern.fullmatch(key):
            gathered[key] = value
        elif experts:  # the block's first expert key: all experts go here, in global order
            gathered.update((name, tensor) for _, name, tensor in experts)
            experts = []
    return gathered
