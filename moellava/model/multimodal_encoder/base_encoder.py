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
                 select_feature: str = "patch", drop_first_token: Optional[bool] = None):
        super().__init__()
        self.name = name
        self.image_tower = vision_model
        self.image_processor = image_processor
        self.image_tower.requires_grad_(False)
        self.set_feature_selection(select_layer, select_feature, drop_first_token)

    @classmethod
    def drops_first_token(cls, select_feature: str) -> bool:
        """This project's rule: 'patch' leaves out the CLS token, so only a tower that has one drops token 0."""
        return cls.has_cls_token and select_feature == "patch"

    def set_feature_selection(self, select_layer: int, select_feature: str,
                              drop_first_token: Optional[bool] = None) -> None:
        """Which hidden layer feeds the projector, and which tokens: with a CLS token, 'patch' drops it and
        'cls_patch' keeps it. `drop_first_token` (None: this project's rule) may also drop the first patch of
        a tower without a CLS token, as the original MoE-LLaVA did for SigLIP (its checkpoints expect it)."""
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
        if drop_first_token is None:
            drop_first_token = self.drops_first_token(select_feature)
        elif self.has_cls_token and drop_first_token != self.drops_first_token(select_feature):
            raise ValueError(
                f"mm_vision_drop_first_token={drop_first_token} contradicts mm_vision_select_feature="
                f"{select_feature!r} for the {type(self).__name__} {self.name!r}: its token 0 is the CLS token, "
                "which 'patch' drops and 'cls_patch' keeps. Remove mm_vision_drop_first_token from config.json."
            )
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.drop_first_token = bool(drop_first_token)

    @classmethod
    def from_pretrained(cls, name: str, *, select_layer: int = -2, select_feature: str = "patch",
                        drop_first_token: Optional[bool] = None, cache_dir: Optional[str] = None) -> "VisionTower":
        """Load weights and processor from a hub id or a local folder."""
        kwargs = {"cache_dir": cache_dir} if cache_dir is not None else {}
        vision_model = cls.model_class.from_pretrained(name, **kwargs)
        image_processor = cls.processor_class.from_pretrained(name, **kwargs)
        return cls(name, vision_model, image_processor, select_layer, select_feature, drop_first_token)

    @classmethod
    def from_config(cls, name: str, vision_config: dict, processor_config: dict, *, select_layer: int = -2,
                    select_feature: str = "patch", drop_first_token: Optional[bool] = None) -> "VisionTower":
        """Build the architecture only (weights come from the LLaVA checkpoint that stored these configs)."""
        vision_model = cls.model_class(cls.config_class.from_dict(vision_config))
        image_processor = cls.processor_class.from_dict(processor_config)
        return cls(name, vision_model, image_processor, select_layer, select_feature, drop_first_token)

    def load_pretrained_weights(self, cache_dir: Optional[str] = None) -> None:
        """Copy the weights of `self.name` (hub id or folder) into this tower, keeping its dtype and device."""
        kwargs = {"cache_dir": cache_dir} if cache_dir is not None else {}
        pretrained = self.model_class.from_pretrained(self.name, **kwargs)
        try:
            self.image_tower.load_state_dict(pretrained.state_dict())
        except RuntimeError as err:  # shapes or names that differ
            raise ValueError(f"The weights of the image tower {self.name!r} do not fit this model's tower (another "
                             f"architecture): {str(err).splitlines()[0]} Use the tower it was trained with.") from None

    def feature_select(self, hidden_states) -> torch.Tensor:
        features = hidden_states[self.select_layer]
        return features[:, 1:] if self.drop_first_token else features

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
        return self.count_tokens(self.config, self.select_feature, self.drop_first_token)

    @classmethod
    def count_tokens(cls, vision_config, select_feature: str, drop_first_token: Optional[bool] = None) -> int:
        """Features per image of a tower with this config and feature selection (no weights needed)."""
        if drop_first_token is None:
            drop_first_token = cls.drops_first_token(select_feature)
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        return patches + int(cls.has_cls_token) - int(drop_first_token)
