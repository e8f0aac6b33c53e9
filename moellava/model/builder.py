"""`load_pretrained_model`: a LLaVA / MoE-LLaVA checkpoint for inference, chosen by `config.model_type`
(never by folder name), on CPU or GPU, with MoE layers on the native backend by default (no `deepspeed`
launcher, no process group). A LoRA checkpoint is recognised by its adapter_config.json and loaded over
its base model (`_load_lora_checkpoint`), merged or not."""

import copy
import json
import logging
import os
from typing import Optional, Tuple, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

import moellava.model  # noqa: F401  (registers the llava_* / moe_llava_* model types)
from moellava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from moellava.model import lora
from moellava.model.moe import router_parameter_names
from moellava.model.moe_model import has_moe_layers, set_moe_backend
from moellava.tokenization import FAMILIES, family_for_model_type, load_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROJECTOR_FILE = "mm_projector.bin"


def load_config(path: str, *, cache_dir: Optional[str] = None):
    """The config of a model folder or hub id, never running code from it (`trust_remote_code=False`); an
    unknown `model_type` (or one that would need the folder's own code) is a clear error."""
    try:
        return AutoConfig.from_pretrained(path, cache_dir=cache_dir, trust_remote_code=False)
    except (KeyError, ValueError) as err:
        model_type = _declared_model_type(path)
        if model_type is None or model_type in CONFIG_MAPPING:
            raise
        known = sorted(t for t in CONFIG_MAPPING if t.startswith(("llava_", "moe_llava_")))
        backbones = sorted({t for family in FAMILIES.values() for t in family.model_types if t in CONFIG_MAPPING})
        raise ValueError(
            f"{path}/config.json has model_type {model_type!r}, which moellava does not know (moellava never runs "
            f"Python code shipped in a model folder). Use a base LLM of type {backbones} or a checkpoint of type "
            f"{known}; for another LLM family, add it as CUSTOM.md describes."
        ) from err


def _declared_model_type(path: str) -> Optional[str]:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return None
    try:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def resolve_dtype(torch_dtype: Union[None, str, torch.dtype], device: str) -> torch.dtype:
    """None -> float32 on CPU, float16 on GPU; names as in DTYPES, or a torch.dtype from DTYPES."""
    if torch_dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    if isinstance(torch_dtype, torch.dtype) and torch_dtype in DTYPES.values():
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype in DTYPES:
        return DTYPES[torch_dtype]
    raise ValueError(f"torch_dtype={torch_dtype!r} is not supported: use one of {sorted(DTYPES)} (or None).")


def load_pretrained_model(
    model_path: str,
    model_base: Optional[str] = None,
    *,
    device: str = "cpu",
    torch_dtype: Union[None, str, torch.dtype] = None,
    moe_backend: str = "native",
    padding_side: str = "right",
    merge: bool = False,
) -> Tuple[object, torch.nn.Module, object, int]:
    """Returns `(tokenizer, model, image_processor, context_len)`, the model in eval mode on `device`.

    model_path: a saved LLaVA checkpoint (config.json model_type `llava_<family>` or `moe_llava_<family>`),
      or, with `model_base`, a Stage-1 output (config.json + mm_projector.bin) over the base LLM folder.
    padding_side: where the tokenizer pads, and where the image splicing re-pads a batch
      (`config.tokenizer_padding_side`); batched generation needs "left".
    moe_backend: "native" (default, any single process) or "deepspeed" (needs deepspeed.init_distributed()).
    A LoRA checkpoint (adapter_config.json; stage 2 or 3 with --lora_enable) loads over `model_base`, else
    over the base recorded in its adapter_config.json; `merge=True` merges the adapters into the weights
    (a plain model, as scripts/merge_lora_weights.py saves), `merge=False` keeps them as peft LoRA layers.
    """
    dtype = resolve_dtype(torch_dtype, device)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} is not supported: use 'left' or 'right'.")
    _refuse_stage1_folder_alone(model_path, model_base)
    config = load_config(model_path)
    model_type = config.model_type
    if not model_type.startswith(("llava_", "moe_llava_")):
        raise ValueError(
            f"{model_path} has model_type {model_type!r}, not a LLaVA checkpoint (llava_<family> or "
            f"moe_llava_<family>). Pass the folder written by training (stage 2 or 3), or a Stage-1 folder "
            f"with --model-base <LLM folder>."
        )
    if has_moe_layers(config):
        set_moe_backend(config, moe_backend)
    config.tokenizer_padding_side = padding_side

    lora_checkpoint = lora.is_lora_checkpoint(model_path)
    if model_base is not None and not lora_checkpoint:
        projector_file = os.path.join(model_path, PROJECTOR_FILE)
        if not os.path.isfile(projector_file):
            raise ValueError(
                f"model_base is for a Stage-1 output (config.json + {PROJECTOR_FILE}), but {model_path} has no "
                f"{PROJECTOR_FILE}. Load a full checkpoint without model_base."
            )
        weights_path, tokenizer_path = model_base, model_base
    else:
        projector_file, weights_path, tokenizer_path = None, model_path, model_path
    if lora_checkpoint:
        model, tokenizer_path = _load_lora_checkpoint(model_path, model_base, config, dtype, merge=merge)
    else:
        model, missing_keys = _from_pretrained(weights_path, config, dtype)
        _complete_missing_weights(model, missing_keys, projector_file, weights_path)

    tokenizer = load_tokenizer(tokenizer_path, family=family_for_model_type(model_type), padding_side=padding_side)
    _add_vision_tokens(model, tokenizer)

    model.to(device=device).eval()
    image_processor = model.get_image_tower().image_processor if model.get_image_tower() is not None else None
    return tokenizer, model, image_processor, _context_length(config)


def _from_pretrained(weights_path: str, config, dtype: torch.dtype):
    """The model of `config` with the weights of `weights_path`, and the weights it lacks; weights the model
    has no place for are an error."""
    model, info = AutoModelForCausalLM.from_pretrained(
        weights_path, config=config, torch_dtype=dtype, output_loading_info=True, trust_remote_code=False
    )
    if info["unexpected_keys"]:
        unexpected = sorted(info["unexpected_keys"])
        raise ValueError(
            f"{weights_path} holds weights this model has no place for: {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} tensors): its config.json does not "
            "describe the checkpoint (e.g. a MoE checkpoint without its `moe` settings). Re-save it from training."
        )
    return model, info["missing_keys"]


def _load_lora_checkpoint(model_path: str, model_base: Optional[str], config, dtype: torch.dtype, *,
                          merge: bool) -> Tuple[torch.nn.Module, str]:
    """The model of a LoRA checkpoint's `config` over its base, with the adapters and the other trained
    tensors of `model_path`, merged into the weights when `merge`. Returns `(model, tokenizer folder)`.

    The base is `model_base`, else adapter_config.json's `base_model_name_or_path`. A MoE checkpoint whose
    base is dense (stage 3 from a stage-2 model) is upcycled again, as in training: its experts start as
    exact copies of the base FFNs, its routers come from the checkpoint."""
    recorded = lora.read_lora_config(model_path).base_model_name_or_path
    base = model_base or recorded
    if not base:
        raise ValueError(f"{model_path}/{lora.ADAPTER_CONFIG_FILE} records no base model: pass --model-base "
                         "(model_base=...), the model the LoRA run started from.")
    if not os.path.isdir(base) and (os.path.isabs(base) or base.startswith(".")):
        source = "--model-base" if model_base else f"{model_path}/{lora.ADAPTER_CONFIG_FILE}"
        raise ValueError(f"The base model {base} (from {source}) does not exist: pass --model-base <the folder the "
                         "LoRA run started from> (model_base=...).")
    upcycled = has_moe_layers(config) and not has_moe_layers(load_config(base))
    build_config = copy.deepcopy(config)
    if upcycled:
        build_config.moe = None
    model, missing_keys = _from_pretrained(base, build_config, dtype)
    if upcycled:
        model.initialize_moe_modules(config.moe)
        missing_keys = list(missing_keys) + router_parameter_names(model)
    saved = lora.non_lora_names(model_path)
    _complete_missing_weights(model, [key for key in missing_keys if key not in saved], None,
                              f"{base} (with {model_path}/{lora.NON_LORA_FILE})")
    lora.add_lora(model, lora.read_lora_config(model_path))
    lora.load_lora_weights(model, model_path)
    if merge:
        model = lora.merge_lora(model)
    has_tokenizer = os.path.isfile(os.path.join(model_path, "tokenizer_config.json"))
    return model, model_path if has_tokenizer else base


def has_weights(folder: str) -> bool:
    """Whether `folder` holds model weights (safetensors or pytorch_model.bin, whole or sharded)."""
    return any(os.path.isfile(os.path.join(folder, name))
               for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME))


def is_stage1_output(folder: str) -> bool:
    """A Stage-1 output folder: config.json and mm_projector.bin, no LLM weights."""
    return os.path.isfile(os.path.join(folder, PROJECTOR_FILE)) and not has_weights(folder)


def _refuse_stage1_folder_alone(model_path: str, model_base: Optional[str]) -> None:
    if model_base is None and is_stage1_output(model_path):
        raise ValueError(
            f"{model_path} is a Stage-1 output (config.json + {PROJECTOR_FILE}, no LLM weights): pass the base LLM "
            f"it was trained on as --model-base (model_base=...), e.g. --model-path {model_path} --model-base "
            "<the MODEL of stage 1>."
        )


def _complete_missing_weights(model, missing_keys, projector_file: Optional[str], weights_path: str) -> None:
    """Fill the weights a checkpoint may legitimately lack, and refuse any other gap.

    - Image tower: published checkpoints and Stage-1 outputs may not hold it: load it from its hub id /
      folder (`config.mm_image_tower`).
    - Projector, for a Stage-1 output over a base LLM: from its mm_projector.bin.
    """
    tower = model.get_image_tower()
    projector = getattr(model.get_model(), "mm_projector", None)
    prefixes = {"tower": None, "projector": None}
    for name, module in model.named_modules():
        if tower is not None and module is tower:
            prefixes["tower"] = name + "."
        elif projector_file is not None and module is projector:
            prefixes["projector"] = name + "."

    def under(part: str) -> set:
        return {key for key in missing_keys if prefixes[part] and key.startswith(prefixes[part])}

    tower_missing, projector_missing = under("tower"), under("projector")
    other = sorted(set(missing_keys) - tower_missing - projector_missing)
    if other:
        raise ValueError(
            f"{weights_path} lacks weights for {other[:10]}{' ...' if len(other) > 10 else ''} "
            f"({len(other)} tensors): the checkpoint does not match its config.json. Re-save it from training."
        )
    if tower_missing:
        tower_parameters = {prefixes["tower"] + name for name, _ in tower.named_parameters()}
        if not tower_parameters <= tower_missing:
            raise ValueError(
                f"{weights_path} holds only part of the image tower (missing {sorted(tower_missing)[:5]} ...): "
                "re-save the checkpoint."
            )
        logger.warning("The checkpoint has no image tower weights: loading them from %s.", tower.name)
        tower.load_pretrained_weights()
    if projector_file is not None:
        model.get_model().load_mm_projector(projector_file)


def _add_vision_tokens(model, tokenizer) -> None:
    """Add the image tokens the checkpoint was trained with; grow (never shrink) the embeddings."""
    config = model.config
    tokens = []
    if getattr(config, "mm_use_im_patch_token", False):
        tokens.append(DEFAULT_IMAGE_PATCH_TOKEN)
    if getattr(config, "mm_use_im_start_end", False):
        tokens += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if tokens:
        tokenizer.add_tokens(tokens, special_tokens=True)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        logger.warning("Tokenizer has %d tokens, the embeddings %d rows: growing the embeddings.", len(tokenizer), rows)
        model.resize_token_embeddings(len(tokenizer))


def _context_length(config) -> int:
    for key in ("max_sequence_length", "tokenizer_model_max_length", "max_position_embeddings"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 2048
