"""MoE settings: which layers become MoE and how they route, validated once and stored as `config.moe`.

The dict built here is JSON-serialisable and is saved verbatim in `config.json`, so a checkpoint rebuilds
its MoE layers from it. Its keys are the ones the published MoE-LLaVA checkpoints carry, plus `backend`
and `drop_tokens`, which those checkpoints predate (missing means "native" and None).
"""

from typing import List, Optional, Sequence, Union

MOE_MODES = ("first_half", "second_half", "sparse", "dense")
BACKENDS = ("native", "deepspeed")
TOP_K_CHOICES = (1, 2)


def resolve_moe_layers_idx(
    num_layers: int, moe_mode: str, moe_layers_idx: Optional[Sequence[int]] = None
) -> List[int]:
    """The sorted decoder-layer indices that become MoE layers.

    An explicit `moe_layers_idx` overrides `moe_mode` (the original then calls the mode "custom").
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}.")
    if moe_layers_idx is not None:
        return _check_layers_idx(num_layers, moe_layers_idx)
    if moe_mode == "first_half":
        return list(range(0, num_layers // 2))
    if moe_mode == "second_half":
        return list(range(num_layers // 2, num_layers))
    if moe_mode == "sparse":
        return list(range(0, num_layers, 2))
    if moe_mode == "dense":
        return list(range(num_layers))
    if moe_mode == "custom":
        raise ValueError("moe_mode='custom' needs moe_layers_idx: pass the layer indices explicitly.")
    raise ValueError(f"Unknown moe_mode {moe_mode!r}: use one of {MOE_MODES} or pass moe_layers_idx.")


def _check_layers_idx(num_layers: int, moe_layers_idx: Sequence[int]) -> List[int]:
    idx = list(moe_layers_idx)
    if not idx:
        raise ValueError(
            "moe_layers_idx is empty: pass at least one layer index, or leave it None and choose moe_mode."
        )
    bad = [i for i in idx if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"moe_layers_idx {idx} has indices outside 0..{num_layers - 1} (the model has {num_layers} "
            f"layers): {bad}. Use indices in range(0, {num_layers})."
        )
    duplicated = sorted({i for i in idx if idx.count(i) > 1})
    if duplicated:
        raise ValueError(f"moe_layers_idx {idx} repeats {duplicated}: list each layer once.")
    return sorted(idx)


def check_layer_settings(
    *,
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    eval_capacity_factor: float,
    min_capacity: int,
    ep_size: int,
    backend: str,
    drop_tokens: Optional[bool],
    router_aux_loss_coef: float,
) -> None:
    """Raise ValueError, naming the fix, for settings one MoE layer cannot run with."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}.")
    if top_k not in TOP_K_CHOICES:
        raise ValueError(f"top_k_experts={top_k!r} is not supported: use 1 or 2.")
    if top_k > num_experts:
        raise ValueError(
            f"top_k_experts={top_k} exceeds num_experts={num_experts}: use top_k_experts <= num_experts "
            f"or more experts."
        )
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r} (1.0 to 2.0 is usual).")
    if not isinstance(min_capacity, int) or isinstance(min_capacity, bool) or min_capacity < 0:
        raise ValueError(f"min_capacity must be an int >= 0, got {min_capacity!r}.")
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ValueError(f"ep_size must be an int >= 1, got {ep_size!r}.")
    if num_experts % ep_size:
        raise ValueError(
            f"ep_size={ep_size} does not divide num_experts={num_experts}: every expert-parallel rank must "
            f"hold the same number of experts; use an ep_size that divides {num_experts}."
        )
    if backend not in BACKENDS:
        raise ValueError(f"Unknown MoE backend {backend!r}: use one of {BACKENDS}.")
    if backend == "native" and ep_size > 1:
        raise ValueError(
            f"ep_size={ep_size} needs backend='deepspeed' (expert parallelism uses DeepSpeed's all-to-all); "
            f"backend='native' holds every expert on one device: use ep_size=1 with it."
        )
    if drop_tokens not in (None, True, False):
        raise ValueError(f"drop_tokens must be None, True or False, got {drop_tokens!r}.")
    if not isinstance(router_aux_loss_coef, (int, float)) or isinstance(router_aux_loss_coef, bool) \
            or router_aux_loss_coef < 0:
        raise ValueError(
            f"router_aux_loss_coef must be a number >= 0 (0 disables the load-balancing loss), "
            f"got {router_aux_loss_coef!r}."
        )


def build_moe_settings(
    num_hidden_layers: int,
    *,
    num_experts: Union[int, Sequence[int]] = 4,
    moe_mode: str = "sparse",
    moe_layers_idx: Optional[Sequence[int]] = None,
    top_k_experts: int = 2,
    capacity_factor: float = 1.0,
    eval_capacity_factor: float = 2.0,
    min_capacity: int = 0,
    use_residual: bool = False,
    router_aux_loss_coef: float = 0.01,
    ep_size: int = 1,
    train_modules: Optional[Sequence[str]] = None,
    backend: str = "native",
    drop_tokens: Optional[bool] = None,
) -> dict:
    """The validated `config.moe` dict.

    `num_experts` is one int for every MoE layer or a list with one entry per MoE layer, in the order of
    `moe_layers_idx` when that is given (the original never stored a list, spec 12.8; here it is always
    stored as a list). `drop_tokens=None` means dropless on the native backend and capacity-limited on
    the deepspeed backend (DeepSpeed's default).
    """
    if moe_layers_idx is None and moe_mode not in MOE_MODES:
        raise ValueError(f"Unknown moe_mode {moe_mode!r}: use one of {MOE_MODES} or pass moe_layers_idx.")
    layers = resolve_moe_layers_idx(num_hidden_layers, moe_mode, moe_layers_idx)
    experts = _experts_per_layer(num_experts, moe_layers_idx, len(layers))
    if not isinstance(use_residual, bool):
        raise ValueError(f"use_residual must be True or False, got {use_residual!r}.")
    modules = check_train_modules(train_modules)
    for count in experts:
        check_layer_settings(
            num_experts=count,
            top_k=top_k_experts,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            ep_size=ep_size,
            backend=backend,
            drop_tokens=drop_tokens,
            router_aux_loss_coef=router_aux_loss_coef,
        )
    return {
        "moe_enable": True,
        "num_experts": experts,
        "moe_layers_idx": layers,
        "moe_mode": "custom" if moe_layers_idx is not None else moe_mode,
        "top_k_experts": top_k_experts,
        "capacity_factor": float(capacity_factor),
        "eval_capacity_factor": float(eval_capacity_factor),
        "min_capacity": min_capacity,
        "use_residual": use_residual,
        "router_aux_loss_coef": float(router_aux_loss_coef),
        "ep_size": ep_size,
        "train_modules": modules,
        "backend": backend,
        "drop_tokens": drop_tokens,
    }


def _experts_per_layer(
    num_experts: Union[int, Sequence[int]], moe_layers_idx: Optional[Sequence[int]], num_moe_layers: int
) -> List[int]:
    if isinstance(num_experts, int) and not isinstance(num_experts, bool):
        return [num_experts] * num_moe_layers
    if isinstance(num_experts, (str, bytes)) or not isinstance(num_experts, Sequence):
        raise ValueError(f"num_experts must be an int or a list of ints, got {num_experts!r}.")
    experts = list(num_experts)
    if len(experts) == 1:
        return experts * num_moe_layers
    if len(experts) != num_moe_layers:
        raise ValueError(
            f"num_experts has {len(experts)} entries but there are {num_moe_layers} MoE layers: give one "
            f"value for all layers or exactly one per MoE layer."
        )
    if moe_layers_idx is not None:
        # Keep each count with its layer when the indices were given out of order.
        experts = [count for _, count in sorted(zip(moe_layers_idx, experts))]
    return experts


def check_train_modules(train_modules: Optional[Sequence[str]]) -> List[str]:
    if train_modules is None:
        return []
    if isinstance(train_modules, str):
        raise ValueError(
            f"train_modules must be a list of name substrings, got the string {train_modules!r}: "
            f"write [{train_modules!r}]."
        )
    modules = list(train_modules)
    bad = [m for m in modules if not isinstance(m, str) or not m]
    if bad:
        raise ValueError(f"train_modules entries must be non-empty strings, got {bad}.")
    return modules


def check_moe_settings(moe: dict, num_layers: int) -> None:
    """Validate a `config.moe` dict (ours or a published checkpoint's) against a model with `num_layers`."""
    required = ("num_experts", "moe_layers_idx", "top_k_experts", "capacity_factor", "eval_capacity_factor",
                "min_capacity", "use_residual", "router_aux_loss_coef", "ep_size")
    missing = [key for key in required if key not in moe]
    if missing:
        raise ValueError(f"config.moe lacks {missing}: build it with build_moe_settings().")
    layers = _check_layers_idx(num_layers, moe["moe_layers_idx"])
    if layers != list(moe["moe_layers_idx"]):
        raise ValueError(
            f"config.moe['moe_layers_idx'] {moe['moe_layers_idx']} is not in ascending order: build the "
            f"dict with build_moe_settings(), which sorts it."
        )
    experts = moe["num_experts"]
    if not isinstance(experts, list) or len(experts) != len(layers):
        raise ValueError(
            f"config.moe['num_experts'] must be a list with one entry per MoE layer ({len(layers)}), got "
            f"{experts!r}: build the dict with build_moe_settings()."
        )
    for count in experts:
        check_layer_settings(
            num_experts=count,
            top_k=moe["top_k_experts"],
            capacity_factor=moe["capacity_factor"],
            eval_capacity_factor=moe["eval_capacity_factor"],
            min_capacity=moe["min_capacity"],
            ep_size=moe["ep_size"],
            backend=moe.get("backend", "native"),
            drop_tokens=moe.get("drop_tokens"),
            router_aux_loss_coef=moe["router_aux_loss_coef"],
        )
