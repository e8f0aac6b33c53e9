"""SigLIP image tower. transformers 4.31 has no SigLIP, so the vision half is written here with the
official configuration fields and weight names (`vision_model.embeddings.patch_embedding`,
`vision_model.encoder.layers.N.self_attn.q_proj`, ..., `vision_model.post_layernorm`); its encoder is the
pre-LayerNorm ViT encoder it shares with CLIP (`vit.py`).

LLaVA uses hidden states, not the pooled output, so the attention-pooling `head` of the official
vision model is not built and its weights are ignored on load (as are the text half's)."""

import math
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature, get_size_dict
from transformers.image_transforms import resize, to_channel_dimension_format
from transformers.image_utils import (
    ChannelDimension,
    PILImageResampling,
    infer_channel_dimension_format,
    make_list_of_images,
    to_numpy_array,
    valid_images,
)
from transformers.modeling_outputs import BaseModelOutput

from moellava.model.multimodal_encoder.base_encoder import VisionTower
from moellava.model.multimodal_encoder.vit import VisionEncoder


class SiglipVisionConfig(PretrainedConfig):
    model_type = "siglip_vision_model"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 16,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "SiglipVisionConfig":
        cls._set_token_in_kwargs(kwargs)
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        # A full SiglipModel folder keeps the vision settings under "vision_config".
        if config_dict.get("model_type") == "siglip":
            config_dict = config_dict["vision_config"]
        return cls.from_dict(config_dict, **kwargs)


class SiglipVisionEmbeddings(nn.Module):
    """Patch embedding (no CLS token) plus learned position embeddings."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(self.num_patches).unsqueeze(0), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)
        if embeddings.shape[1] != self.num_patches:
            raise ValueError(
                f"Images of {tuple(pixel_values.shape[-2:])} px give {embeddings.shape[1]} patches; this SigLIP "
                f"tower was trained for {self.num_patches}. Preprocess with the tower's image processor."
            )
        return embeddings + self.position_embedding(self.position_ids)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutput:
        last_state, all_states = self.encoder(self.embeddings(pixel_values))
        return BaseModelOutput(
            last_hidden_state=self.post_layernorm(last_state),
            hidden_states=all_states if output_hidden_states else None,
        )


class SiglipPreTrainedModel(PreTrainedModel):
    config_class = SiglipVisionConfig
    base_model_prefix = "siglip"
    main_input_name = "pixel_values"
    # The official checkpoints also hold the text tower and the pooling head; LLaVA uses neither.
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^vision_model\.head\.", r"^logit_scale", r"^logit_bias"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SiglipVisionEmbeddings):
            nn.init.normal_(module.position_embedding.weight, std=1 / math.sqrt(self.config.hidden_size))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class SiglipVisionModel(SiglipPreTrainedModel):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__(config)
        self.vision_model = SiglipVisionTransformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None) -> BaseModelOutput:
        return self.vision_model(pixel_values, output_hidden_states=bool(output_hidden_states))


class SiglipImageProcessor(BaseImageProcessor):
    """Resize to a fixed square (no crop), rescale to [0, 1], normalize with mean = std = 0.5."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: Optional[Dict[str, int]] = None,
        resample: PILImageResampling = PILImageResampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Optional[List[float]] = None,
        image_std: Optional[List[float]] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = get_size_dict(size if size is not None else {"height": 224, "width": 224})
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]

    def preprocess(self, images, return_tensors: Optional[str] = None,
                   data_format: Union[str, ChannelDimension] = ChannelDimension.FIRST, **kwargs) -> BatchFeature:
        if kwargs:
            raise ValueError(f"SiglipImageProcessor.preprocess got unsupported arguments {sorted(kwargs)}.")
        images = make_list_of_images(images)
        if not valid_images(images):
            raise ValueError("Images must be PIL images, numpy arrays or torch tensors.")
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixel_values = []
        for image in images:
            if hasattr(image, "mode") and image.mode != "RGB":
                image = image.convert("RGB")
            array = to_numpy_array(image)
            # Work channels-last so mean/std broadcast over the last axis.
            array = to_channel_dimension_format(array, ChannelDimension.LAST, infer_channel_dimension_format(array))
            if self.do_resize:
                array = resize(array, size=(self.size["height"], self.size["width"]), resample=self.resample)
            array = array.astype(np.float32)
            if self.do_rescale:
                array = array * self.rescale_factor
            if self.do_normalize:
                array = (array - mean) / std
            pixel_values.append(to_channel_dimension_format(array, data_format, ChannelDimension.LAST))
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


class SiglipVisionTower(VisionTower):
    """SigLIP ViT: no CLS token, so `select_feature='patch'` keeps every patch (729 for so400m-patch14-384),
    except for checkpoints of the original MoE-LLaVA, which drop the first one (`mm_vision_drop_first_token`)."""

    model_class = SiglipVisionModel
    config_class = SiglipVisionConfig
    processor_class = SiglipImageProcessor
    has_cls_token = False
