"""Projector from image-tower features to the LLM's hidden size.

The module is `mm_projector.image_spatial_proj.<...>` as in MoE-LLaVA, so published Stage-1
`mm_projector.bin` files and full checkpoints load with their own key names."""

import re

import torch
from torch import nn

PROJECTOR_TYPES = ("linear", "mlp{N}x_gelu (e.g. mlp2x_gelu)", "identity")


def build_image_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    mlp = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if mlp:
        depth = int(mlp.group(1))
        if depth < 1:
            raise ValueError(f"image_projector_type {projector_type!r} needs at least one layer: use mlp1x_gelu or more.")
        layers = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ValueError(
                f"image_projector_type 'identity' needs the tower width ({mm_hidden_size}) to equal the LLM "
                f"hidden size ({hidden_size}); use 'linear' or 'mlp2x_gelu' instead."
            )
        return nn.Identity()
    raise ValueError(f"Unknown image_projector_type {projector_type!r}: use one of {', '.join(PROJECTOR_TYPES)}.")


class LlavaProjector(nn.Module):
    """Holds the image projector under the MoE-LLaVA name `image_spatial_proj`."""

    def __init__(self, projector_type: str, mm_hidden_size: int, hidden_size: int):
        super().__init__()
        self.projector_type = projector_type
        self.image_spatial_proj = build_image_projector(projector_type, mm_hidden_size, hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.image_spatial_proj(image_features)


def build_projector(config) -> LlavaProjector:
    """The projector a LLaVA config describes (`image_projector_type`, `mm_hidden_size`, `hidden_size`)."""
    return LlavaProjector(getattr(config, "image_projector_type", "linear"), config.mm_hidden_size,
                          config.hidden_size)
