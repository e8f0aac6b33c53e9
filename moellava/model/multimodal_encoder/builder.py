"""Choose the image tower class from the tower's own config (its `model_type`), never from its name, so
hub ids and local folders behave the same."""

from typing import Optional

from transformers import PretrainedConfig

from moellava.model.checkpoint_layouts import vision_drop_first_token
from moellava.model.multimodal_encoder.base_encoder import VisionTower
from moellava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from moellava.model.multimodal_encoder.siglip_encoder import SiglipVisionTower

# Vision-only configs and full two-tower configs both name their family.
TOWER_CLASSES = {
    "clip_vision_model": CLIPVisionTower,
    "clip": CLIPVisionTower,
    "siglip_vision_model": SiglipVisionTower,
    "siglip": SiglipVisionTower,
}


def tower_class_for(model_type: Optional[str], name: str) -> type:
    if model_type not in TOWER_CLASSES:
        raise ValueError(
            f"Image tower {name!r} has model_type {model_type!r}; supported towers are "
            f"{sorted(TOWER_CLASSES)} (a CLIP or SigLIP folder or hub id)."
        )
    return TOWER_CLASSES[model_type]


def load_image_tower(name: str, *, select_layer: int = -2, select_feature: str = "patch",
                     cache_dir: Optional[str] = None) -> VisionTower:
    """The tower with its pretrained weights, from a hub id or a local folder (training start)."""
    kwargs = {"cache_dir": cache_dir} if cache_dir is not None else {}
    config_dict, _ = PretrainedConfig.get_config_dict(name, **kwargs)
    tower_class = tower_class_for(config_dict.get("model_type"), name)
    return tower_class.from_pretrained(name, select_layer=select_layer, select_feature=select_feature,
                                       cache_dir=cache_dir)


def build_image_tower(config) -> VisionTower:
    """The tower described by a LLaVA config, without weights (they come from the LLaVA checkpoint).

    Checkpoints written by this project carry the tower and processor configs (`mm_image_tower_config`,
    `mm_image_processor_config`), so nothing is fetched. Older checkpoints (e.g. the published MoE-LLaVA
    ones) only name the tower; its configs are then read from that hub id or folder.
    """
    name = config.mm_image_tower
    select = dict(select_layer=getattr(config, "mm_vision_select_layer", -2),
                  select_feature=getattr(config, "mm_vision_select_feature", "patch"),
                  drop_first_token=vision_drop_first_token(config))
    vision_config = getattr(config, "mm_image_tower_config", None)
    processor_config = getattr(config, "mm_image_processor_config", None)
    if vision_config is not None and processor_config is not None:
        tower_class = tower_class_for(vision_config.get("model_type"), name)
        return tower_class.from_config(name, vision_config, processor_config, **select)
    config_dict, _ = PretrainedConfig.get_config_dict(name)
    tower_class = tower_class_for(config_dict.get("model_type"), name)
    return tower_class.from_config(
        name,
        tower_class.config_class.from_pretrained(name).to_dict(),
        tower_class.processor_class.from_pretrained(name).to_dict(),
        **select,
    )


def count_image_tokens(name: str, select_feature: str = "patch", vision_config: Optional[dict] = None,
                       drop_first_token: Optional[bool] = None) -> int:
    """Tokens one image becomes, from the tower's config alone (`vision_config`, else read from `name`);
    `drop_first_token` as the LLaVA config decides it (`checkpoint_layouts.vision_drop_first_token`)."""
    if vision_config is None:
        vision_config, _ = PretrainedConfig.get_config_dict(name)
    tower_class = tower_class_for(vision_config.get("model_type"), name)
    config = tower_class.config_class.from_dict(vision_config.get("vision_config", vision_config))
    return tower_class.count_tokens(config, select_feature, drop_first_token)
