"""Sparse upcycling (dense FFN -> MoE block with copies of it as experts) and MoE-stage parameter freezing."""

import logging
import re
from typing import List, Optional, Sequence

import torch
from torch import nn

from .layer import EXPERT_KEY, MoEBlock
from .settings import BACKENDS, check_train_modules, check_moe_settings

logger = logging.getLogger(__name__)

# An expert parameter name with this infix removed is the dense FFN name it was copied from.
EXPERT_INFIX = re.compile(re.escape(EXPERT_KEY) + r"\d+\.")


def convert_layers_to_moe(
    layers: Sequence[nn.Module],
    moe: dict,
    hidden_size: int,
    *,
    backend: Optional[str] = None,
    upcycle: bool = True,
) -> None:
    """Replace `layers[i].mlp` with a `MoEBlock` for every i in `moe["moe_layers_idx"]`.

    `upcycle=True` (training): every expert is a deep copy of the dense FFN, verified equal to it.
    `upcycle=False` (loading): same structure, the checkpoint supplies the weights.
    `backend` overrides `moe["backend"]` (absent in published checkpoints: "native"). The native backend
    holds every expert on one device, so a stored `ep_size > 1` applies to the deepspeed backend only.
    """
    check_moe_settings(moe, len(layers))
    backend = backend if backend is not None else moe.get("backend", "native")
    if backend not in BACKENDS:
        raise ValueError(f"Unknown MoE backend {backend!r}: use one of {BACKENDS}.")
    ep_size = moe["ep_size"] if backend == "deepspeed" else 1
    if ep_size != moe["ep_size"]:
        logger.info("MoE backend 'native' holds all experts on one device: ep_size=%d applies only to "
                    "backend 'deepspeed'.", moe["ep_size"])
    for idx, num_experts in zip(moe["moe_layers_idx"], moe["num_experts"]):
        layer = layers[idx]
        dense = getattr(layer, "mlp", None)
        if not isinstance(dense, nn.Module):
            raise ValueError(
                f"Layer {idx} ({type(layer).__name__}) has no `mlp` module to upcycle: MoE conversion "
                f"replaces `layer.mlp`, so the decoder layer must keep its FFN there."
            )
        if isinstance(dense, MoEBlock):
            raise ValueError(f"Layer {idx} is already a MoE layer: convert a dense model only once.")
        block = MoEBlock(
            hidden_size,
            dense,
            num_experts,
            top_k=moe["top_k_experts"],
            capacity_factor=moe["capacity_factor"],
            eval_capacity_factor=moe["eval_capacity_factor"],
            min_capacity=moe["min_capacity"],
            use_residual=moe["use_residual"],
            ep_size=ep_size,
            backend=backend,
            drop_tokens=moe.get("drop_tokens"),
            router_aux_loss_coef=moe["router_aux_loss_coef"],
        )
        _place_new_modules(block, dense)
        if upcycle:
            _check_experts_equal_dense(block, dense, idx)
        block.layer_idx = idx
        layer.mlp = block
    logger.info("MoE (%s backend): layers %s, experts %s, top-%d.", backend, moe["moe_layers_idx"],
                moe["num_experts"], moe["top_k_experts"])


def _place_new_modules(block: MoEBlock, dense: nn.Module) -> None:
    # The router and the residual mix are created on CPU in fp32; put them where the FFN lives.
    # The router stays fp32 (its math is fp32), the mix takes the FFN dtype it multiplies with.
    reference = next(dense.parameters(), None)
    if reference is None:
        return
    block.deepspeed_moe.gate.to(device=reference.device)
    if block.use_residual:
        block.coefficient.to(device=reference.device, dtype=reference.dtype)


def _check_experts_equal_dense(block: MoEBlock, dense: nn.Module, idx: int) -> None:
    reference = dense.state_dict()
    for j, expert in enumerate(block.deepspeed_moe.experts.deepspeed_experts):
        state = expert.state_dict()
        if state.keys() != reference.keys():
            raise RuntimeError(
                f"Layer {idx}: expert {j} has parameters {sorted(state)} but the dense FFN has "
                f"{sorted(reference)}; the FFN module must survive copy.deepcopy unchanged."
            )
        for key, value in reference.items():
            if not torch.equal(state[key], value):
                raise RuntimeError(
                    f"Layer {idx}: expert {j} differs from the dense FFN at {key!r} after copying; the FFN "
                    f"module must survive copy.deepcopy unchanged (no lazy or shared parameters)."
                )


def router_parameter_names(model: nn.Module) -> List[str]:
    """The parameters created by upcycling, which always train in full: every MoE block's router (`wg`)
    and, with `use_residual`, its residual mix (`coefficient`)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, MoEBlock):
            names.append(f"{prefix}.deepspeed_moe.gate.wg.weight")
            if module.use_residual:
                names.extend(f"{prefix}.coefficient.{name}" for name, _ in module.coefficient.named_parameters())
    return names


def freeze_for_moe_training(model: nn.Module, train_modules: Sequence[str]) -> List[str]:
    """Train only parameters whose name contains one of `train_modules`, plus every router and residual mix.

    Matching is by substring, as in the original, which froze the dense model before copying its FFN
    into experts: an expert parameter also matches through its dense name (without
    `deepspeed_moe.experts.deepspeed_experts.{j}.`), so published settings such as Qwen's `"mlp.w1"` work.
    Modules that never train are the caller's to freeze afterwards: Phi's `fc1` also names the vision
    tower's MLP, which `moellava.train.train.set_trainable` freezes again.
    Returns the trainable parameter names. Raises ValueError when no expert parameter would train (the
    original then failed inside DeepSpeed with "None of the param groups are marked as MoE").
    """
    modules = check_train_modules(train_modules)
    if not modules:
        raise ValueError(
            "train_modules is empty, so no expert would train: list the expert FFN module names "
            "(e.g. ['gate_proj', 'up_proj', 'down_proj', 'wg'] for Llama)."
        )
    always = set(router_parameter_names(model))
    if not always:
        raise ValueError("The model has no MoE layers: call convert_layers_to_moe before freezing for MoE training.")

    trainable, expert_names, expert_trains = [], [], False
    for name, param in model.named_parameters():
        dense_name = EXPERT_INFIX.sub("", name)
        train = name in always or any(m in name or m in dense_name for m in modules)
        param.requires_grad_(train)
        if train:
            trainable.append(name)
        if dense_name != name:
            expert_names.append(name)
            expert_trains = expert_trains or train
    if not expert_trains:
        ffn_names = sorted({EXPERT_INFIX.split(name)[-1].rsplit(".", 1)[0] for name in expert_names})
        raise ValueError(
            f"train_modules={modules} matches no expert parameter, so the experts would not train. The "
            f"experts' FFN modules are named {ffn_names}: use e.g. train_modules={ffn_names + ['wg']}."
        )
    logger.info("MoE training: %d of %d parameter tensors trainable.", len(trainable),
                len(list(model.parameters())))
    return trainable

