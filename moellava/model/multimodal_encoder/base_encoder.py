"""What every image tower shares: a frozen vision transformer, the choice of hidden layer and tokens
fed to the projector, and its image processor."""

from typing import Optional

import torch
from torch import nn

SELECT_FEATURES = ("patch", "cls_patch")


class VisionTower(nn.Module):
    """A frozen vision model plus its image processor.

    Subclasses set `model_class`, `config_class`, `processor_class` and `has_cls_token`. The vision
    model is the attribute `image_tower`, so checkpoint keys read `...image_tower.image_tower.vision_model.*`
    as in MoE-LLaVA.
    """

    model_class = None
    config_class = None
    processor_class = None
    has_cls_token = True

    def __init__(self, name: str, vision_model, image_processor, select_layer: int = -2,
                 select_feature: str = "patch"):
        super().__init__()
        self.name = name
        self.image_tower = vision_model
        self.image_processor = image_processor
        self.image_tower.requires_grad_(False)
        self.set_feature_selection(select_layer, select_feature)

    def set_feature_selection(self, select_layer: int, select_feature: str) -> None:
        """Which hidden layer feeds the projector, and whether CLIP's CLS token is kept."""
        num_layers = self.image_tower.config.num_hidden_layers
        # hidden_states holds the embeddings plus one entry per layer: num_layers + 1 entries.
        if not -(num_layers + 1) <= select_layer <= num_layers:
            raise ValueError(
                f"mm_vision_select_layer={select_layer} is out of range for the image tower {self.name!r} "
                f"({num_layers} layers): use a value in [-{num_layers + 1}, {num_layers}] (-2 = penultimate)."
            )
        if select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature={select_feature!r} is not supported: use one of {SELECT_FEATURES}."
            )
        if select_feature == "cls_patch" and not self.has_cls_token:
            raise ValueError(
                f"mm_vision_select_feature='cls_patch' needs a CLS token, which the {type(self).__name__} "
                f"{self.name!r} does not have: use 'patch' (all patch tokens)."
            )
        self.select_layer = select_layer
        self.select_feature = select_feature

    @classmethod
    def from_pretrained(cls, name: str, *, select_layer: int = -2, select_feature: str = "patch",
                        cache_dir: Optional[str] = None) -> "VisionTower":
        """Load weights and processor from a hub id or a local folder."""
        kwargs = {"cache_dir": cache_dir} if cache_dir is not None else {}
        vision_model = cls.model_class.from_pretrained(name, **kwargs)
        image_processor = cls.processor_class.from_pretrained(name, **kwargs)
        return cls(name, vision_model, image_processor, select_layer, select_feature)

    @classmethod
    def from_config(cls, name: str, vision_config: dict, processor_config: dict, *, select_layer: int = -2,
                    select_feature: str = "patch") -> "VisionTower":
        """Build the architecture only (weights come from the LLaVA checkpoint that stored these configs)."""
        vision_model = cls.model_class(cls.config_class.from_dict(vision_config))
        image_processor = cls.processor_class.from_dict(processor_config)
        return cls(name, vision_model, image_processor, select_layer, select_feature)

    def load_pretrained_weights(self, cache_dir: Optional[str] = None) -> None:
        """Copy the weights of `self.name` (hub id or folder) into this tower, keeping its dtype and device."""
        kwargs = {"cache_dir": cache_dir} if cache_dir is not None else {}
        pretrained = self.model_class.from_pretrained(self.name, **kwargs)
        self.image_tower.load_state_dict(pretrained.state_dict())

    def feature_select(self, hidden_states) -> torch.Tensor:
        features = hidden_states[self.select_layer]
        if self.select_feature == "patch" and self.has_cls_token:
            features = features[:, 1:]
        return features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixel values -> [N, num_tokens, hidden_size] features, in the tower's dtype."""
        if images.ndim != 4:
            raise ValueError(f"The image tower expects pixel values [N, 3, H, W], got shape {tuple(images.shape)}.")
        outputs = self.image_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(outputs.hidden_states)

    @property
    def config(self):
        return self.image_tower.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.image_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.image_tower.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        """Patches in the image grid, e.g. 576 for CLIP ViT-L/14 at 336 px."""
        return (self.config.image_size // self.config.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Features per image handed to the projector."""
        return self.count_tokens(self.config, self.select_feature)

    @classmethod
    def count_tokens(cls, vision_config, select_feature: str) -> int:
        """Features per image of a tower with this config and feature selection (no weights needed)."""
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        return patches + int(cls.has_cls_token and select_feature == "cls_patch")
