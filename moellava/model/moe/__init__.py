"""Sparse Mixture-of-Experts for MoE-LLaVA: settings, the MoE block and its dispatchers, upcycling."""

from .layer import MoEBlock
from .settings import MOE_MODES, build_moe_settings, resolve_moe_layers_idx
from .upcycle import EXPERT_INFIX, convert_layers_to_moe, freeze_for_moe_training, router_parameter_names
from .utils import aux_loss_total, expert_parallel_state_dict, load_balance, moe_blocks, routing_stats

__all__ = [
    "EXPERT_INFIX",
    "MOE_MODES",
    "MoEBlock",
    "aux_loss_total",
    "build_moe_settings",
    "convert_layers_to_moe",
    "expert_parallel_state_dict",
    "freeze_for_moe_training",
    "load_balance",
    "moe_blocks",
    "resolve_moe_layers_idx",
    "router_parameter_names",
    "routing_stats",
]
