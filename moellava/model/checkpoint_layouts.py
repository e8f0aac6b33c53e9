"""Checkpoints written by the original MoE-LLaVA (the published ones) load as they are: one named rule per
way their layout differs from ours, decided from what the checkpoint itself says (its config.json and the
names of the tensors it stores, read without loading them), applied at load time by both
`load_pretrained_model` (inference) and `train.load_model` (training) through `load_checkpoint`, and
recorded in the config the model saves (DESIGN decision 7).

Rules:
- Phi head: the original builds LLaVA-Phi's `lm_head` without a bias (the base microsoft/phi-2 has one),
  so its checkpoints store no `lm_head.bias`. A config without `lm_head_bias` gets the head the stored
  tensors describe; the field is then saved.
- SigLIP pooling head: the original stores SigLIP's attention-pooling head
  (`...image_tower.image_tower.vision_model.head.*`), which LLaVA never uses: ignored, with one INFO line.
- Tower weights absent: some checkpoints (and every Stage-1 output) do not store the image tower; it is
  loaded from the config's tower path (or, in training, `--image_tower`). An unreachable path is an
  error naming it, before the model is built.
- Feature selection: the original's `mm_vision_select_feature='patch'` drops token 0 even for SigLIP,
  which has no CLS token (728 of 729 tokens for so400m-patch14-384), and its -384 models were trained so.
  `mm_vision_drop_first_token` records the choice in every config saved here; a config without it keeps
  the rule of the code that wrote it (`vision_drop_first_token`).
- Config fields the original reads unconditionally are written by training (`ORIGINAL_CONFIG_FIELDS`),
  so checkpoints saved here open in the original code too.
"""

import json
import logging
import os
import re
from typing import Collection, FrozenSet, Optional

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, cached_file
from transformers.utils import logging as transformers_logging

logger = logging.getLogger(__name__)

# The order in which transformers' from_pretrained picks a weights file.
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# In every LLaVA layout the tower module `image_tower` holds the vision model as `image_tower`.
TOWER_MARKER = "image_tower.image_tower."
SIGLIP_POOLING_HEAD = re.compile(r"image_tower\.image_tower\.vision_model\.head\.")

# Fields the original's loader reads as attributes (no default), with the values this project's models
# have (no video tower, so the video projector settings are off); training writes them into every config.
ORIGINAL_CONFIG_FIELDS = {
    "mm_video_tower": None,
    "video_projector_type": "linear",
    "video_global_proj": False,
    "video_temproal_proj": False,  # sic: the original's spelling
    "video_spatial_proj": False,
}


def _resolve(path: str, filename: str, cache_dir: Optional[str]) -> Optional[str]:
    """`filename` of a local folder or hub id, None when it has none (or the hub cannot be reached)."""
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        return candidate if os.path.isfile(candidate) else None
    try:
        return cached_file(path, filename, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):  # not a folder, and not a valid hub id either
        return None


def declared_config(path: str, cache_dir: Optional[str] = None) -> dict:
    """config.json of a model folder or hub id as written ({} when there is none or it is not JSON)."""
    config_file = _resolve(path, "config.json", cache_dir)
    if config_file is None:
        return {}
    try:
        with open(config_file, encoding="utf-8") as f:
            declared = json.load(f)
    except (OSError, ValueError):
        return {}
    return declared if isinstance(declared, dict) else {}


def stored_tensor_names(path: str, cache_dir: Optional[str] = None) -> Optional[FrozenSet[str]]:
    """Names of the tensors in the weights file from_pretrained would load (safetensors, whole or sharded,
    else pytorch_model.bin, whole or sharded), read without loading the tensors; None without weights."""
    for name in WEIGHT_FILES:
        weights_file = _resolve(path, name, cache_dir)
        if weights_file is None:
            continue
        try:
            if name.endswith(".index.json"):
                with open(weights_file, encoding="utf-8") as f:
                    return frozenset(json.load(f)["weight_map"])
            if name == SAFE_WEIGHTS_NAME:
                with safe_open(weights_file, framework="pt") as f:
                    return frozenset(f.keys())
            # Memory-mapped: the tensors stay on disk.
            return frozenset(torch.load(weights_file, map_location="cpu", mmap=True, weights_only=True))
        except Exception as err:  # noqa: BLE001 - a broken file fails in many ways; report it once, clearly
            raise ValueError(f"{weights_file} cannot be read as a weights file ({type(err).__name__}: {err}). "
                             "Download or save the checkpoint again.") from None
    return None


def written_by_this_project(config) -> bool:
    """Configs saved here carry the tower's own config (`mm_image_tower_config`); the original never writes it."""
    return getattr(config, "mm_image_tower_config", None) is not None


def vision_drop_first_token(config) -> Optional[bool]:
    """Feature-selection rule: whether the tower's token 0 is left out of the image features.

    The config's `mm_vision_drop_first_token` when it has one; else, for a config written here, None (the
    tower's own rule: only CLIP's CLS token is dropped, by 'patch'); else the original's rule: token 0 is
    dropped whenever `mm_vision_select_feature` is 'patch', SigLIP's first patch included."""
    declared = getattr(config, "mm_vision_drop_first_token", None)
    if declared is not None:
        return bool(declared)
    if written_by_this_project(config):
        return None
    return getattr(config, "mm_vision_select_feature", "patch") == "patch"


def apply_phi_head_rule(config, declared: dict, stored: Optional[FrozenSet[str]]) -> None:
    """Phi-head rule: a LLaVA-Phi config that does not say whether `lm_head` has a bias gets the head the
    stored tensors have (the original's checkpoints have none)."""
    if not hasattr(config, "lm_head_bias") or "lm_head_bias" in declared or stored is None:
        return
    config.lm_head_bias = "lm_head.bias" in stored
    if not config.lm_head_bias:
        logger.info("The checkpoint stores no lm_head.bias (as the original MoE-LLaVA-Phi writes it): the head is "
                    "built without a bias (lm_head_bias=False in the config).")


def apply_tower_source_rule(config, stored: Optional[FrozenSet[str]], image_tower: Optional[str],
                            weights_path: str, cache_dir: Optional[str]) -> None:
    """Tower-source rule: where the image tower's files come from when the checkpoint does not hold them.

    A checkpoint that stores no tower weights takes them from `image_tower` when given (training's
    `--image_tower`), else from its `mm_image_tower`; the architecture and image processor come from there
    too when the config does not carry them (the original's configs do not). That source must be a local
    folder or a reachable hub id: otherwise a ValueError names it, before anything is built."""
    name = getattr(config, "mm_image_tower", None)
    if not name:
        return
    tower_stored = stored is not None and any(TOWER_MARKER in key for key in stored)
    if not tower_stored and image_tower and image_tower != name:
        logger.info("%s stores no image tower: using --image_tower %s instead of its config's %s.", weights_path,
                    image_tower, name)
        config.mm_image_tower = name = image_tower
    needs_configs = any(getattr(config, key, None) is None
                        for key in ("mm_image_tower_config", "mm_image_processor_config"))
    if (tower_stored and not needs_configs) or _resolve(name, "config.json", cache_dir) is not None:
        return
    missing = "the image tower's weights" if not tower_stored else "the image tower's config and image processor"
    raise ValueError(
        f"{weights_path} does not store {missing}: they are read from the tower it names, {name!r} (mm_image_tower "
        f"in its config.json{' or --image_tower' if image_tower else ''}), which is neither a local folder nor "
        "reachable on the Hugging Face hub. Pass a local copy of that tower: --image_tower DIR when training, or set "
        "mm_image_tower to that folder in config.json."
    )


def load_checkpoint(model_class, weights_path: str, config, *, torch_dtype: torch.dtype,
                    cache_dir: Optional[str] = None, image_tower: Optional[str] = None,
                    projector_file: Optional[str] = None, config_path: Optional[str] = None,
                    provided: Collection[str] = ()):
    """`model_class.from_pretrained(weights_path, config=config)` with the layout rules applied, every gap
    filled or refused: returns the model.

    `config_path`: the folder `config` was read from when it is not `weights_path` (a Stage-1 output over a
    base LLM, whose projector comes from `projector_file`; a LoRA checkpoint over its base model).
    `image_tower`: training's `--image_tower`. `provided`: weights the caller loads next (a LoRA checkpoint's
    other trained tensors), so not a gap.
    """
    stored = stored_tensor_names(weights_path, cache_dir)
    apply_phi_head_rule(config, declared_config(config_path or weights_path, cache_dir), stored)
    apply_tower_source_rule(config, stored, image_tower, weights_path, cache_dir)
    # Every missing or unexpected key is filled, ignored or refused below, each with its own message;
    # transformers' generic warnings about them ("newly initialized ... TRAIN this model") would mislead.
    hf_logger = transformers_logging.get_logger("transformers.modeling_utils")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        model, info = model_class.from_pretrained(weights_path, config=config, torch_dtype=torch_dtype,
                                                  cache_dir=cache_dir, output_loading_info=True,
                                                  trust_remote_code=False)
    finally:
        hf_logger.setLevel(level)
    ignored = sorted(key for key in stored or () if SIGLIP_POOLING_HEAD.search(key))
    if ignored:
        logger.info("Ignoring the %d tensors of SigLIP's attention-pooling head stored in %s (%s...): LLaVA feeds "
                    "the projector the tower's hidden states and never uses that head.", len(ignored), weights_path,
                    ignored[0])
    if info["unexpected_keys"]:
        unexpected = sorted(info["unexpected_keys"])
        raise ValueError(
            f"{weights_path} holds weights this model has no place for: {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} tensors): its config.json does not "
            "describe the checkpoint (e.g. a MoE checkpoint without its `moe` settings). Re-save it from training."
        )
    missing = [key for key in info["missing_keys"] if key not in provided]
    complete_missing_weights(model, missing, projector_file, weights_path, cache_dir)
    return model


def complete_missing_weights(model, missing_keys, projector_file: Optional[str], weights_path: str,
                             cache_dir: Optional[str] = None) -> None:
    """Fill the weights a checkpoint may legitimately lack, and refuse any other gap.

    - Image tower (tower-source rule): all of it from `tower.name`, never part of it.
    - Projector, for a Stage-1 output over a base LLM: from its mm_projector.bin.
    """
    tower = model.get_image_tower() if hasattr(model, "get_image_tower") else None
    projector = getattr(model.get_model(), "mm_projector", None) if tower is not None else None
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
        logger.info("%s stores no image tower weights: loading them from %s.", weights_path, tower.name)
        tower.load_pretrained_weights(cache_dir=cache_dir)
    if projector_file is not None:
        model.get_model().load_mm_projector(projector_file)
