"""CLIP image tower: the vision half of CLIP written here on `scaled_dot_product_attention` (transformers 4.31's
`CLIPVisionModel` runs eager attention), with transformers' `CLIPVisionConfig`, `CLIPImageProcessor` and
weight names, so openai/clip-vit-large-patch14-336 and every LLaVA checkpoint holding a CLIP tower load
unchanged and give transformers' outputs.

Architecture (as transformers' CLIPVisionTransformer): patch embedding (conv, no bias) after a learned class
embedding, plus learned position embeddings; `pre_layrnorm` (the official spelling); the pre-LayerNorm ViT
encoder shared with SigLIP (`vit.py`); `last_hidden_state` is the encoder output and `pooler_output` the
`post_layernorm` of its class token. `hidden_states` holds the encoder input and each layer's output.

Weight names: `vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}`,
`vision_model.pre_layrnorm`, `vision_model.encoder.layers.N.*`, `vision_model.post_layernorm`. A full CLIP
folder also holds the text tower and the projections; LLaVA uses neither, and they are ignored on load.
"""

from typing import Optional

import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from moellava.model.multimodal_encoder.base_encoder import VisionTower
from moellava.model.multimodal_encoder.vit import VisionAttention, VisionEncoder, VisionMLP


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if patches.shape[1] != self.num_patches:
            raise ValueError(
                f"Images of {tuple(pixel_values.shape[-2:])} px give {patches.shape[1]} patches; this CLIP tower "
                f"was trained for {self.num_patches}. Preprocess with the tower's image processor."
            )
        classes = self.class_embedding.expand(pixel_values.shape[0], 1, -1)
        return torch.cat([classes, patches], dim=1) + self.position_embedding(self.position_ids)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        last_state, all_states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return BaseModelOutputWithPooling(
            last_hidden_state=last_state,
            pooler_output=self.post_layernorm(last_state[:, 0, :]),
            hidden_states=all_states if output_hidden_states else None,
        )


class CLIPPreTrainedModel(PreTrainedModel):
    config_class = CLIPVisionConfig
    base_model_prefix = "clip"
    main_input_name = "pixel_values"
    _no_split_modules = ["VisionEncoderLayer"]
    # A full CLIP folder (openai/clip-vit-*) also holds the text tower and the two projections.
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^visual_projection\.",
                                          r"^logit_scale"]

    def _init_weights(self, module: nn.Module) -> None:
        """CLIP's initialisation (transformers' CLIPPreTrainedModel), for towers built from scratch."""
        config, factor = self.config, self.config.initializer_factor
        width = config.hidden_size
        residual_std = width**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor
        if isinstance(module, CLIPVisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=width**-0.5 * factor)
            nn.init.normal_(module.patch_embedding.weight, std=config.initializer_range * factor)
            nn.init.normal_(module.position_embedding.weight, std=config.initializer_range * factor)
        elif isinstance(module, VisionAttention):
            for projection in (module.q_proj, module.k_proj, module.v_proj):
                nn.init.normal_(projection.weight, std=residual_std)
            nn.init.normal_(module.out_proj.weight, std=width**-0.5 * factor)
        elif isinstance(module, VisionMLP):
            nn.init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
            nn.init.normal_(module.fc2.weight, std=residual_std)
        if isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()


class CLIPVisionModel(CLIPPreTrainedModel):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionTransformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None
    ) -> BaseModelOutputWithPooling:
        return self.vision_model(pixel_values, output_hidden_states=bool(output_hidden_states))


class CLIPVisionTower(VisionTower):
    """CLIP ViT: a CLS token precedes the patches, so `select_feature='patch'` drops token 0."""

    model_class = CLIPVisionModel
    config_class = CLIPVisionConfig
    processor_class = CLIPImageProcessor
    has_cls_token = True
