from moellava.model.multimodal_encoder.base_encoder import VisionTower
from moellava.model.multimodal_encoder.builder import build_image_tower, load_image_tower
from moellava.model.multimodal_encoder.clip_encoder import CLIPVisionModel, CLIPVisionTower
from moellava.model.multimodal_encoder.siglip_encoder import (
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    SiglipVisionTower,
)

__all__ = [
    "VisionTower",
    "build_image_tower",
    "load_image_tower",
    "CLIPVisionModel",
    "CLIPVisionTower",
    "SiglipImageProcessor",
    "SiglipVisionConfig",
    "SiglipVisionModel",
    "SiglipVisionTower",
]
