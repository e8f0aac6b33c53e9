"""CLIP image tower (transformers' CLIPVisionModel and CLIPImageProcessor)."""

from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from moellava.model.multimodal_encoder.base_encoder import VisionTower


class CLIPVisionTower(VisionTower):
    """CLIP ViT: a CLS token precedes the patches, so `select_feature='patch'` drops token 0."""

    model_class = CLIPVisionModel
    config_class = CLIPVisionConfig
    processor_class = CLIPImageProcessor
    has_cls_token = True
