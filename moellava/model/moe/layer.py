"""`MoEBlock`: the sparse Mixture-of-Experts FFN that replaces a decoder layer's `mlp`.

Shape contract: `forward(hidden_states)` returns one tensor shaped like its input, as the dense FFN did,
so any decoder layer (ours or transformers') runs unchanged; nothing patches decoder forwards.

Auxiliary (load-balancing) loss: the block attaches it to its output through `_AuxLossGradient`, an
autograd function that is the identity in forward and, in backward, passes the output gradient through
and gives the aux loss the gradient `router_aux_loss_coef`. Backpropagating the LM loss therefore also
backpropagates `coef * aux_loss` of every MoE layer, exactly as if it had been added to the loss. Because
the function sits inside the block's forward, gradient checkpointing (reentrant or not) re-attaches it when
it recomputes the layer, so the router keeps training (the original returned the aux loss in a list, which
a reentrant checkpoint detaches, spec 12.5). Consequence for model code: do NOT add the aux loss to the
returned loss with grad (that would count it twice); report `coef * aux_loss_total(model)`, detached.
`router_aux_loss_coef = 0` disables it.

After each forward the block exposes, detached: `last_aux_loss` (scalar), `last_tokens_per_expert`
(LongTensor[E], token-choices routed to each expert before dropping) and `last_dropped_fraction`
(fraction of token-choices dropped for capacity).

Backends (same parameters, same names: DeepSpeed's, so checkpoints move between them):
* `deepspeed`: DeepSpeed's own `MOELayer` (GShard capacity, all-to-all expert parallelism). Needs a
  process group initialised through DeepSpeed. `drop_tokens=None` means dropping (DeepSpeed's default).
* `native`: `NativeMoELayer`, sorted/indexed dispatch on one device, no process group. `drop_tokens=None`
  means dropless. It is the inference path without the `deepspeed` launcher and works for single-device
  training, including under DeepSpeed's engine with expert-parallel size 1.
`MoEBlock` subclasses `deepspeed.moe.layer.MoE` because DeepSpeed's engine recognises MoE layers by that
class: it then reduces expert gradients over the expert-data-parallel group and saves experts per rank.
"""

import re
from typing import Optional

import torch
from deepspeed import comm as ds_comm
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn
from torch.nn import functional as F

from .native import NativeMoELayer
from .settings import check_layer_settings

EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts."


class _AuxLossGradient(torch.autograd.Function):
    """Identity on `output`; in backward gives `aux_loss` the gradient `coef` (see the module docstring)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, coef: float) -> torch.Tensor:
        ctx.coef = coef
        ctx.aux_meta = (aux_loss.shape, aux_loss.dtype, aux_loss.device)
        # A copy, not the input itself: autograd would otherwise hand out a view that later in-place
        # ops on the layer output could not modify.
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad_output, torch.full(shape, ctx.coef, dtype=dtype, device=device), None


class MoEBlock(MoE):
    """Top-k routed experts upcycled from `expert`; drop-in replacement for a decoder layer's `mlp`.

    Parameters: `deepspeed_moe.gate.wg.weight` (router, fp32 math), `deepspeed_moe.experts.
    deepspeed_experts.{j}.*` (deep copies of `expert`), and with `use_residual`: `mlp.*` (`expert`
    itself, the dense residual FFN) and `coefficient.*` (Linear(hidden, 2) mixing the two).
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int,
        *,
        top_k: int = 2,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 0,
        use_residual: bool = False,
        ep_size: int = 1,
        backend: str = "native",
        drop_tokens: Optional[bool] = None,
        router_aux_loss_coef: float = 0.01,
    ) -> None:
        check_layer_settings(
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            ep_size=ep_size,
            backend=backend,
            drop_tokens=drop_tokens,
            router_aux_loss_coef=router_aux_loss_coef,
        )
        if backend == "deepspeed":
            _check_deepspeed_process_group(ep_size)
        if drop_tokens is None:
            drop_tokens = backend == "deepspeed"
        super().__init__(
            hidden_size,
            expert,
            num_experts=num_experts,
            ep_size=ep_size,
            k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            use_residual=use_residual,
            drop_tokens=drop_tokens,
            top2_2nd_expert_sampling=False,
        )
        self.backend = backend
        self.top_k = top_k
        self.drop_tokens = drop_tokens
        self.router_aux_loss_coef = float(router_aux_loss_coef)
        self.layer_idx: Optional[int] = None  # set by convert_layers_to_moe, reported by routing_stats
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_tokens_per_expert: Optional[torch.Tensor] = None
        self.last_dropped_fraction: Optional[torch.Tensor] = None
        if backend == "native":
            self.deepspeed_moe = NativeMoELayer(
                self.deepspeed_moe.gate,
                self.deepspeed_moe.experts,
                top_k=top_k,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                min_capacity=min_capacity,
                drop_tokens=drop_tokens,
            )
        else:
            self._deepspeed_dropped_fraction: Optional[torch.Tensor] = None
            self.deepspeed_moe.gate.register_forward_hook(self._record_deepspeed_routes)
            self.set_deepspeed_parallelism()

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Create/attach the expert-parallel group once.

        DeepSpeed's engine calls this on every module that has it; the deepspeed backend has already
        done it at construction (so the block also runs without the engine), and DeepSpeed's gate refuses
        a second group.
        """
        if self.deepspeed_moe.ep_group is None:
            super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    def _record_deepspeed_routes(self, gate: nn.Module, inputs, output) -> None:
        # DeepSpeed's MOELayer calls its gate with sparse_routes=True: output[3] holds the expert index of
        # every (choice, token), -1 where capacity dropped it.
        self._deepspeed_dropped_fraction = (output[3] < 0).float().mean().detach()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.backend == "deepspeed":
            output = self.deepspeed_moe(hidden_states, None)  # DeepSpeed's MOELayer takes (input, used_token)
        else:
            output = self.deepspeed_moe(hidden_states)
        if self.use_residual:
            dense = self.mlp(hidden_states)
            if isinstance(dense, tuple):
                dense = dense[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + dense * coef[..., 1:]

        aux_loss = self.deepspeed_moe.l_aux
        self.last_aux_loss = aux_loss.detach()
        self.last_tokens_per_expert = self.deepspeed_moe.exp_counts.detach()
        if self.backend == "native":
            self.last_dropped_fraction = self.deepspeed_moe.dropped_fraction
        else:
            self.last_dropped_fraction = self._deepspeed_dropped_fraction
        if self.router_aux_loss_coef and torch.is_grad_enabled() and aux_loss.requires_grad:
            output = _AuxLossGradient.apply(output, aux_loss, self.router_aux_loss_coef)
        return output

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[tokens, experts] fp32 router logits of `hidden_states`, computed as both dispatchers compute
        them. Not used by `forward`: it is for reading the routing (e.g. `moellava.vis.capture`)."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        return F.linear(tokens.float(), self.deepspeed_moe.gate.wg.weight.float())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # With expert parallelism each rank holds experts [rank * L, (rank + 1) * L) as local 0..L-1.
        # A single-process (global) checkpoint lists all experts: keep this rank's slice, renumbered.
        if self.ep_size > 1:
            _take_local_experts(state_dict, prefix + EXPERT_KEY, self)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"ep_size={self.ep_size}, drop_tokens={self.drop_tokens}, "
            f"router_aux_loss_coef={self.router_aux_loss_coef}"
        )


def _check_deepspeed_process_group(ep_size: int) -> None:
    if not ds_comm.is_initialized():
        raise RuntimeError(
            "MoE backend='deepspeed' needs a process group initialised through DeepSpeed: call "
            "deepspeed.init_distributed() first (the deepspeed launcher and the HF Trainer with --deepspeed "
            "do this). Use backend='native' for single-process inference."
        )
    world_size = ds_comm.get_world_size()
    if world_size % ep_size:
        raise ValueError(
            f"ep_size={ep_size} does not divide the world size {world_size}: launch a multiple of {ep_size} "
            f"processes or lower ep_size."
        )


def _take_local_experts(state_dict: dict, expert_prefix: str, block: MoEBlock) -> None:
    pattern = re.compile(re.escape(expert_prefix) + r"(\d+)\.(.+)")
    entries = {}
    for key in list(state_dict):
        match = pattern.fullmatch(key)
        if match:
            entries[key] = (int(match.group(1)), match.group(2))
    if {index for index, _ in entries.values()} != set(range(block.num_experts)):
        return  # not a global layout: this rank's own (local) experts
    first = groups._get_expert_parallel_rank(block.expert_group_name) * block.num_local_experts
    local = {}
    for key, (index, rest) in entries.items():
        value = state_dict.pop(key)
        if first <= index < first + block.num_local_experts:
            local[f"{expert_prefix}{index - first}.{rest}"] = value
    state_dict.update(local)
