"""`load_pretrained_model`: a LLaVA / MoE-LLaVA checkpoint for inference, chosen by `config.model_type`
(never by folder name), on CPU or GPU, with MoE layers on the native backend by default (no `deepspeed`
launcher, no process group). A LoRA checkpoint is recognised by its adapter_config.json and loaded over
its base model (`_load_lora_checkpoint`), merged or not."""

import copy
import logging
import os
from typing import Dict, Optional, Tuple, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

import moellava.model  # noqa: F401  (registers the llava_* / moe_llava_* model types)
from moellava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from moellava.model import lora
from moellava.model.checkpoint_layouts import declared_config, load_checkpoint
from moellava.model.moe import router_parameter_names
from moellava.model.moe_model import has_moe_layers, set_moe_backend
from moellava.tokenization import FAMILIES, family_for_model_type, load_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROJECTOR_FILE = "mm_projector.bin"
# transformers' device_map values that split a model over devices.
SPLIT_DEVICE_MAPS = ("balanced", "balanced_low_0", "sequential")


def load_config(path: str, *, cache_dir: Optional[str] = None):
    """The config of a model folder or hub id, never running code from it (`trust_remote_code=False`); an
    unknown `model_type` (or one that would need the folder's own code) is a clear error."""
    try:
        return AutoConfig.from_pretrained(path, cache_dir=cache_dir, trust_remote_code=False)
    except (KeyError, ValueError) as err:
        model_type = declared_config(path, cache_dir).get("model_type")
        if model_type is None or model_type in CONFIG_MAPPING:
            raise
        known = sorted(t for t in CONFIG_MAPPING if t.startswith(("llava_", "moe_llava_")))
        backbones = sorted({t for family in FAMILIES.values() for t in family.model_types if t in CONFIG_MAPPING})
        raise ValueError(
            f"{path}/config.json has model_type {model_type!r}, which moellava does not know (moellava never runs "
            f"Python code shipped in a model folder). Use a base LLM of type {backbones} or a checkpoint of type "
            f"{known}; for another LLM family, add it as CUSTOM.md describes."
        ) from err


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
    model_name: Optional[str] = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: Union[None, str, dict] = "auto",
    device: Optional[str] = None,
    padding_side: str = "right",
    merge: bool = False,
    *,
    torch_dtype: Union[None, str, torch.dtype] = None,
    moe_backend: str = "native",
    **kwargs,
) -> Tuple[object, torch.nn.Module, Dict[str, object], int]:
    """Returns `(tokenizer, model, processor, context_len)` as the original MoE-LLaVA does, with
    `processor = {"image": <the tower's image processor>, "video": None}` and the model in eval mode.

    The positional arguments are the original's, so its calls (`load_pretrained_model(path, None, name,
    False, False, device="cuda")`) work unchanged.
    model_path: a saved LLaVA checkpoint (config.json model_type `llava_<family>` or `moe_llava_<family>`,
      written here or by the original MoE-LLaVA), or, with `model_base`, a Stage-1 output (config.json +
      mm_projector.bin) over the base LLM folder.
    model_name: accepted for the original's calls and never used: the checkpoint's model_type decides.
    load_8bit / load_4bit: refused with a clear error (bitsandbytes quantization needs a CUDA GPU; MoE
      checkpoints cannot be quantized, as in the original).
    device_map: "auto" or None (the model goes to `device`), or one device for the whole model ({"": "cpu"},
      "cpu"); a model split over several devices is not supported.
    device: default "cuda" when a GPU is visible, else "cpu".
    padding_side: where the tokenizer pads, and where the image splicing re-pads a batch
      (`config.tokenizer_padding_side`); batched generation needs "left".
    torch_dtype: default float32 on CPU, float16 on GPU.
    moe_backend: "native" (default, any single process) or "deepspeed" (needs deepspeed.init_distributed()).
    merge: a LoRA checkpoint (adapter_config.json; stage 2 or 3 with --lora_enable) loads over `model_base`,
      else over the base recorded in its adapter_config.json; `merge=True` merges the adapters into the
      weights (a plain model, as scripts/merge_lora_weights.py saves), `merge=False` keeps them as peft LoRA
      layers.
    """
    if kwargs:
        raise ValueError(
            f"load_pretrained_model got arguments it does not take: {sorted(kwargs)} (the original passed extra "
            "arguments on to from_pretrained; here choose the precision with torch_dtype= and the device with device=)."
        )
    if load_8bit or load_4bit:
        raise ValueError(
            f"load_{'8' if load_8bit else '4'}bit=True: 8-/4-bit loading needs bitsandbytes and a CUDA GPU, which "
            "this build does not use (and MoE checkpoints cannot be quantized, as in the original). Load in half "
            "precision instead: torch_dtype='float16' (the CLI: --dtype float16)."
        )
    device = resolve_device(device_map, device)
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
        model = load_checkpoint(AutoModelForCausalLM, weights_path, config, torch_dtype=dtype,
                                projector_file=projector_file, config_path=model_path)
    tokenizer = load_tokenizer(tokenizer_path, family=family_for_model_type(model_type), padding_side=padding_side)
    _add_vision_tokens(model, tokenizer)
    _default_end_of_answer(model, tokenizer)

    model.to(device=device).eval()
    tower = model.get_image_tower()
    processor = {"image": tower.image_processor if tower is not None else None, "video": None}
    return tokenizer, model, processor, _context_length(config)


def resolve_device(device_map: Union[None, str, dict], device: Optional[str]) -> str:
    """The one device the model goes to, from the original's `device_map` / `device` pair."""
    mapped = None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        mapped = str(device_map[""])
    elif isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", *SPLIT_DEVICE_MAPS):
        mapped = str(device_map)
    elif device_map is not None and device_map != "auto":
        raise ValueError(
            f"device_map={device_map!r}: moellava loads the whole model onto one device. Use device_map='auto' (or "
            "None) with device='cuda:0' / 'cpu', or device_map={'': 'cuda:0'}."
        )
    if mapped is not None and device is not None and torch.device(mapped) != torch.device(device):
        raise ValueError(f"device_map={device_map!r} and device={device!r} disagree: pass one of them.")
    device = mapped or device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but no CUDA GPU is visible here: use device='cpu'.")
    return device


def _load_lora_checkpoint(model_path: str, model_base: Optional[str], config, dtype: torch.dtype, *,
                          merge: bool) -> Tuple[torch.nn.Module, str]:
    """The model of a LoRA checkpoint's `config` over its base, with the adapters and the other trained
    tensors of `model_path`, merged into the weights when `merge`. Returns `(model, tokenizer folder)`.

    The base is `model_base`, else adapter_config.json's `base_model_name_or_path`. A MoE checkpoint whose
    base is dense (stage 3 from a stage-2 model) is upcycled again, as in training: its experts start as
    exact copies of the base FFNs, its routers come from the checkpoint."""
    lora_config = lora.read_lora_config(model_path)
    base = model_base or lora_config.base_model_name_or_path
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
    saved = lora.non_lora_names(model_path)
    model = load_checkpoint(AutoModelForCausalLM, base, build_config, torch_dtype=dtype, config_path=model_path,
                            provided=saved)
    if upcycled:
        model.initialize_moe_modules(config.moe)
        unsaved = sorted(set(router_parameter_names(model)) - saved)
        if unsaved:
            raise ValueError(f"{model_path}/{lora.NON_LORA_FILE} lacks the routers of its MoE layers ({unsaved[:4]} "
                             "...): the LoRA checkpoint is incomplete. Save it again from training.")
    lora.add_lora(model, lora_config)
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


def _default_end_of_answer(model, tokenizer) -> None:
    """Generation stops at the tokenizer's eos when the checkpoint names none: the published MoE-LLaVA-Phi
    configs have `eos_token_id: null`, and the original's loader sets it from the tokenizer likewise."""
    if model.generation_config.eos_token_id is not None or tokenizer.eos_token_id is None:
        return
    logger.info("The checkpoint names no eos_token_id: generation stops at the tokenizer's eos %r (id %d).",
                tokenizer.eos_token, tokenizer.eos_token_id)
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id


def _context_length(config) -> int:
    for key in ("max_sequence_length", "tokenizer_model_max_length", "max_position_embeddings"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 2048
