"""LoRA for LLaVA and MoE-LLaVA models (peft): which Linears get adapters, adding them, saving and loading a
LoRA checkpoint, merging the adapters into the weights.

Targets are the LLM's own Linears only: a `--lora_target` name (`q_proj`, or a dotted tail such as
`mlp.w1`) selects the Linear modules inside the decoder layers whose name ends with it, and peft receives
one regular expression that matches exactly those modules. The vision tower, the projector and `lm_head` therefore never get an adapter, whatever
their Linears are called (the original matched short names model-wide and also adapted CLIP and the
projector, spec 12.9). In a MoE layer each expert is a module of its own, so each expert gets its own
adapter; an expert name matches through its dense name (`...mlp.deepspeed_moe.experts.deepspeed_experts.2.w1`
as `...mlp.w1`). The routers (`wg`) and the residual mix are never adapted: they are new and train in full.

A LoRA checkpoint folder holds, besides the model's `config.json` (which describes the trained model: its
MoE layers, tower, template) and its tokenizer:
- `adapter_config.json` and `adapter_model.safetensors`: peft's layout (keys `base_model.model.<name>`), so
  `peft.PeftModel.from_pretrained` reads them too; `base_model_name_or_path` is the model training started
  from (an absolute path for a local folder);
- `non_lora_trainables.safetensors`: every other trained tensor (projector, routers), under the model's own
  parameter names.
The base weights are those of `base_model_name_or_path`; a MoE LoRA checkpoint over a dense base is rebuilt
by upcycling the base again (experts are exact copies of its FFNs) before the adapters are loaded.
"""

import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Set

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moellava.model.moe import EXPERT_INFIX, moe_blocks, router_parameter_names
from moellava.model.moe.layer import EXPERT_KEY

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora_trainables.safetensors"
# peft's PeftModel names the wrapped model's parameters "base_model.model.<name>"; the files keep that layout.
PEFT_PREFIX = "base_model.model."
BIAS_CHOICES = ("none", "all", "lora_only")


def is_lora_checkpoint(folder: str) -> bool:
    """Whether `folder` is a LoRA checkpoint (it has an adapter_config.json), whatever it is called."""
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_FILE))


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


# --- targets -----------------------------------------------------------------------------------------------


def _decoder_linears(model: nn.Module) -> Dict[str, str]:
    """Full name -> name inside its decoder layer (`self_attn.q_proj`, `mlp.deepspeed_moe.experts.
    deepspeed_experts.2.up_proj`) of every Linear of the model's decoder layers, routers and residual mixes
    left out."""
    layer_ids = {id(layer) for layer in model.get_decoder_layers()}
    routers = {name.rsplit(".", 1)[0] for name in router_parameter_names(model)}
    linears = {}
    for prefix, layer in model.named_modules():
        if id(layer) not in layer_ids:
            continue
        for name, module in layer.named_modules():
            full = f"{prefix}.{name}"
            if isinstance(module, nn.Linear) and full not in routers:
                linears[full] = name
    return linears


def lora_target_modules(model: nn.Module, targets: Sequence[str]) -> List[str]:
    """The full names of the decoder-layer Linears selected by `targets`: a target selects the Linears whose
    name inside the layer (an expert's through its dense name) is the target or ends with "." + target.

    Every target must select something; the routers cannot be targets (they train in full)."""
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"--lora_target must be a list of module names (e.g. q_proj v_proj), got {targets!r}.")
    if any(target in ("wg", "gate.wg", "coefficient") for target in targets):
        raise ValueError(
            f"--lora_target {' '.join(targets)}: the MoE routers (wg) and residual mixes (coefficient) are new "
            "in stage 3 and always train in full; leave them out of --lora_target."
        )
    dense_names = {full: EXPERT_INFIX.sub("", inner) for full, inner in _decoder_linears(model).items()}
    selected, unmatched = set(), []
    for target in targets:
        found = {full for full, dense in dense_names.items() if dense == target or dense.endswith("." + target)}
        if not found:
            unmatched.append(target)
        selected |= found
    if unmatched:
        names = sorted(set(dense_names.values()))
        raise ValueError(
            f"--lora_target {' '.join(unmatched)} matches no Linear in the LLM's decoder layers. Their Linears are "
            f"{names}: pass some of these names (the last part is enough, e.g. {names[0].rsplit('.', 1)[-1]})."
        )
    return sorted(selected)


def _target_pattern(model: nn.Module, names: Sequence[str]) -> str:
    """A regular expression that peft full-matches against module names, matching exactly `names`:
    `<decoder layers>.<i>.(<name inside the layer>|...)`, any expert index where the name has one. (A list
    of hundreds of full names would be rewritten by peft into short suffixes, which are ambiguous to read.)"""
    inner = _decoder_linears(model)
    layers = {full[: -len(inner[full]) - 1].rsplit(".", 1)[0] for full in names}
    if len(layers) != 1:
        raise ValueError(f"The LoRA targets lie in several module lists {sorted(layers)}: expected the decoder layers.")
    any_expert = re.escape(EXPERT_KEY) + r"\d+\."
    alternatives = sorted({any_expert.join(re.escape(part) for part in EXPERT_INFIX.split(inner[full]))
                           for full in names})
    return rf"{re.escape(layers.pop())}\.\d+\.(?:{'|'.join(alternatives)})"


# --- adding adapters ---------------------------------------------------------------------------------------


def make_lora_config(model: nn.Module, *, r: int, alpha: float, dropout: float, bias: str,
                     targets: Sequence[str], base_model_name_or_path: Optional[str]) -> LoraConfig:
    if bias not in BIAS_CHOICES:
        raise ValueError(f"--lora_bias {bias!r}: use one of {BIAS_CHOICES}.")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias=bias,
        target_modules=_target_pattern(model, lora_target_modules(model, targets)),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def add_lora(model: nn.Module, config: LoraConfig) -> None:
    """Put LoRA adapters into `model` in place (peft's LoraLayer around each target Linear). peft freezes
    every other parameter (biases excepted with `bias` "all" / "lora_only"); the caller decides what else
    trains. Adapters inside experts are tagged as expert parameters, as DeepSpeed-MoE tags the experts'
    own weights, so DeepSpeed reduces their gradients over the expert-data-parallel group."""
    inject_adapter_in_model(config, model)
    for block in moe_blocks(model):
        for expert in block.deepspeed_moe.experts.deepspeed_experts:
            base = [p for name, p in expert.named_parameters() if "lora_" not in name]
            for name, param in expert.named_parameters():
                if "lora_" in name:
                    param.allreduce = base[0].allreduce
                    param.group_name = base[0].group_name
    adapted = sum(isinstance(module, LoraLayer) for module in model.modules())
    logger.info("LoRA r=%d alpha=%s dropout=%s bias=%s on %d Linears of the LLM (%s)", config.r, config.lora_alpha,
                config.lora_dropout, config.bias, adapted, config.target_modules)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its Linear (W + alpha/r * B A) and put the plain Linear back: the result
    holds no peft module and saves as a plain checkpoint."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            merged += 1
    if hasattr(model, "peft_config"):
        del model.peft_config
    logger.info("Merged %d LoRA adapters into their weights", merged)
    return model


# --- saving ------------------------------------------------------------------------------------------------


def split_lora_state(model: nn.Module, state_dict: Dict[str, torch.Tensor]):
    """`(adapter, non_lora)` parts of `state_dict` (the model's, or the one DeepSpeed gathered): the adapter
    tensors as peft saves them (prefixed), and every other trainable tensor under its own name."""
    # Embeddings are never adapted or resized under LoRA (train.py refuses new tokens): no embedding copy.
    adapter = get_peft_model_state_dict(model, state_dict=state_dict, save_embedding_layers=False)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    non_lora = {name: state_dict[name] for name in trainable if "lora_" not in name and name not in adapter}
    return {PEFT_PREFIX + key: value for key, value in adapter.items()}, non_lora


def save_lora_checkpoint(model: nn.Module, folder: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write the adapter (config and weights), the non-LoRA trainables and the model's config to `folder`."""
    os.makedirs(folder, exist_ok=True)
    adapter, non_lora = split_lora_state(model, state_dict if state_dict is not None else model.state_dict())

    def owned(tensors):  # safetensors refuses tensors that share storage (views of DeepSpeed's flat buffers)
        return {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}

    save_file(owned(adapter), os.path.join(folder, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    save_file(owned(non_lora), os.path.join(folder, NON_LORA_FILE), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(folder)
    model.config.save_pretrained(folder)
    logger.info("Saved the LoRA adapter (%d tensors) and %d other trained tensors to %s", len(adapter),
                len(non_lora), folder)


# --- loading -----------------------------------------------------------------------------------------------


def read_lora_config(folder: str) -> LoraConfig:
    path = os.path.join(folder, ADAPTER_CONFIG_FILE)
    try:
        config = LoraConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path} cannot be read as a peft LoRA config: {err}") from None
    if config.peft_type != "LORA":  # peft builds the config class of the file's own peft_type
        raise ValueError(f"{path} describes a {config.peft_type} adapter; only LoRA adapters are supported.")
    return config


def _path(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has {ADAPTER_CONFIG_FILE} but no {name}: the LoRA checkpoint is incomplete.")
    return path


def non_lora_names(folder: str) -> Set[str]:
    with safe_open(_path(folder, NON_LORA_FILE), framework="pt") as f:
        return set(f.keys())


def load_lora_weights(model: nn.Module, folder: str) -> Set[str]:
    """Load the adapter and the non-LoRA trainables of `folder` into `model` (which has the same adapters).

    Every adapter tensor of the model must be in the file and every file tensor in the model. Returns the
    names of the non-LoRA tensors loaded."""
    adapter = load_file(_path(folder, ADAPTER_WEIGHTS_FILE))
    adapter = {key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key: value for key, value in adapter.items()}
    non_lora = load_file(_path(folder, NON_LORA_FILE))
    unfit = (f"The LoRA checkpoint {folder} does not fit this model: its {ADAPTER_CONFIG_FILE} and config.json must "
             "describe the model (and LoRA settings) it is loaded into")
    expected = {key for key in model.state_dict() if "lora_" in key}
    try:
        result = set_peft_model_state_dict(model, adapter)
    except RuntimeError as err:  # shapes differ (another --lora_r, another model size)
        raise ValueError(f"{unfit}: {_first_mismatches(err)}") from None
    missing = sorted(expected & set(result.missing_keys))
    unexpected = sorted(set(result.unexpected_keys) | (set(non_lora) - set(model.state_dict())))
    if missing or unexpected:
        raise ValueError(f"{unfit}: missing {missing[:5]}, unexpected {unexpected[:5]} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected).")
    try:
        model.load_state_dict(non_lora, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{unfit}: {_first_mismatches(err)}") from None
    return set(non_lora)


def _first_mismatches(err: RuntimeError, shown: int = 2) -> str:
    """torch's load_state_dict error, which lists every mismatched tensor on a line, shortened."""
    lines = [line.strip() for line in str(err).splitlines()[1:]]
    more = f" (and {len(lines) - shown} more)" if len(lines) > shown else ""
    return "; ".join(lines[:shown]) + more
