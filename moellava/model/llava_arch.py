"""LLaVA's multimodal glue, shared by every LLM family: the image tower and projector on the inner
model (`LlavaMetaModel`), and on the causal LM (`LlavaMetaForCausalLM`) the forward and generation
hooks that splice image features into the token embeddings at each `<image>` placeholder
(IMAGE_TOKEN_INDEX = -200)."""

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from moellava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from moellava.model.checkpoint_layouts import ORIGINAL_CONFIG_FIELDS, SIGLIP_POOLING_HEAD
from moellava.model.multimodal_encoder import VisionTower, build_image_tower, load_image_tower
from moellava.model.multimodal_projector import build_projector

logger = logging.getLogger(__name__)

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class LlavaCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`attention_mask`: the mask over the spliced sequence (each image expanded to its feature tokens);
    `generate()` continues decoding from it, so padded batches keep attending to the right positions."""

    attention_mask: Optional[torch.Tensor] = None


def load_projector_file(path: str) -> dict:
    """The tensors of a Stage-1 `mm_projector.bin`, read without running code (weights only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file. Pass the mm_projector.bin written by Stage 1.") from None
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "Weights only load failed" in detail:
            detail = "it holds Python objects besides tensors, and loading those could run code"
        raise ValueError(
            f"{path} is not a projector file written by Stage 1: it cannot be read as PyTorch tensors ({detail}). "
            "Pass the mm_projector.bin that scripts/train_stage1.sh wrote."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a dict of tensors: it is not an mm_projector.bin of Stage 1.")
    return state


class LlavaConfigMixin:
    """Placed first: `LlavaLlamaConfig(LlavaConfigMixin, LlamaConfig)`.

    A backbone's config.json ("llama"), or a LLaVA one read by the MoE subclass, carries its own model_type;
    kept, it would be an instance attribute hiding the class's until the config is saved and reloaded.
    """

    def __init__(self, **kwargs):
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)


class LlavaMetaModel:
    """Mixin placed before the backbone model class: `LlavaLlamaModel(LlavaMetaModel, LlamaModel)`."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_video_tower", None):
            raise ValueError(
                f"mm_video_tower={config.mm_video_tower!r}: video towers are not supported (the original's video "
                "path never ran). Set mm_video_tower to null in config.json."
            )
        if getattr(config, "mm_image_tower", None):
            self.image_tower = build_image_tower(config)
            self.mm_projector = build_projector(config)
            # Saved with the model: the feature selection a checkpoint of the original code gets stays explicit.
            config.mm_vision_drop_first_token = self.image_tower.drop_first_token

    def get_image_tower(self) -> Optional[VisionTower]:
        return getattr(self, "image_tower", None)

    def initialize_vision_modules(self, model_args) -> None:
        """Attach the image tower and projector for training (`model_args` as in train.ModelArguments).

        A model that already has a tower (a LLaVA checkpoint) keeps the tower weights it was saved with.
        A new tower is loaded from `model_args.image_tower` (hub id or local folder). The configs that
        rebuild it offline are written into the model config.
        """
        config = self.config
        name = model_args.image_tower
        select_layer = getattr(model_args, "mm_vision_select_layer", -2)
        select_feature = getattr(model_args, "mm_vision_select_feature", "patch")
        projector_type = getattr(model_args, "image_projector_type", "linear")
        embeddings = self.get_input_embeddings().weight

        tower = self.get_image_tower()
        if tower is None:
            tower = load_image_tower(name, select_layer=select_layer, select_feature=select_feature,
                                     cache_dir=getattr(model_args, "cache_dir", None))
            self.image_tower = tower.to(device=embeddings.device, dtype=embeddings.dtype)
        elif tower.name != name:
            raise ValueError(
                f"This checkpoint already has the image tower {tower.name!r}, but --image_tower is {name!r}. "
                f"Pass --image_tower {tower.name} (or start from a checkpoint without a tower)."
            )
        else:
            # The checkpoint's token selection stays (an original SigLIP checkpoint drops its first patch).
            keep = tower.drop_first_token if select_feature == tower.select_feature else None
            tower.set_feature_selection(select_layer, select_feature, keep)

        config.mm_image_tower = name
        config.mm_image_tower_config = tower.config.to_dict()
        config.mm_image_processor_config = tower.image_processor.to_dict()
        config.mm_hidden_size = tower.hidden_size
        config.mm_vision_select_layer = select_layer
        config.mm_vision_select_feature = select_feature
        config.mm_vision_drop_first_token = tower.drop_first_token
        config.use_mm_proj = True
        for key, value in ORIGINAL_CONFIG_FIELDS.items():
            setattr(config, key, value)

        projector = getattr(self, "mm_projector", None)
        if projector is None:
            config.image_projector_type = projector_type
            self.mm_projector = build_projector(config).to(device=embeddings.device, dtype=embeddings.dtype)
        elif projector.projector_type != projector_type:
            raise ValueError(
                f"This checkpoint's projector is {projector.projector_type!r}, but --image_projector_type is "
                f"{projector_type!r}. Pass --image_projector_type {projector.projector_type}."
            )
        else:
            # A checkpoint's projector may have been frozen; training continues on it (as in MoE-LLaVA).
            self.mm_projector.requires_grad_(True)

        adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
        if adapter:
            self.load_mm_projector(adapter)

    def load_mm_projector(self, path: str) -> None:
        """Load a Stage-1 `mm_projector.bin`: keys containing `mm_projector.`, prefix stripped, strict."""
        state = load_projector_file(path)
        weights = {key.split("mm_projector.", 1)[1]: value for key, value in state.items() if "mm_projector." in key}
        if not weights:
            raise ValueError(
                f"{path} holds no 'mm_projector.' weights (keys: {sorted(state)[:8]}...). Pass the "
                "mm_projector.bin written by Stage 1 (--tune_mm_mlp_adapter True)."
            )
        expected = self.mm_projector.state_dict()
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        wrong_shape = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"{path} does not match this model's projector (image_projector_type="
                f"{self.mm_projector.projector_type!r}, mm_hidden_size={self.config.mm_hidden_size}, "
                f"hidden_size={self.config.hidden_size}): missing keys {missing}, unexpected keys {unexpected}, "
                f"shape mismatches {[(k, tuple(weights[k].shape), tuple(expected[k].shape)) for k in wrong_shape]}. "
                "Use the same --image_tower, --image_projector_type and LLM as Stage 1."
            )
        self.mm_projector.load_state_dict(weights, strict=True)


class LlavaMetaForCausalLM(ABC):
    """Mixin placed before the backbone causal LM: `LlavaLlamaForCausalLM(LlavaMetaForCausalLM, LlamaForCausalLM)`.

    Its `forward` splices the images into the inputs and hands them to the backbone's forward; its
    generation hooks pass `images` along and continue from the spliced attention mask.
    """

    def __init_subclass__(cls, **kwargs):
        # Stored tensors this model knowingly has no place for (checkpoint_layouts' SigLIP rule, which logs
        # them): added to the backbone's own list, which transformers drops from the unexpected keys.
        super().__init_subclass__(**kwargs)
        ignored = list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])
        if SIGLIP_POOLING_HEAD.pattern not in ignored:
            cls._keys_to_ignore_on_load_unexpected = ignored + [SIGLIP_POOLING_HEAD.pattern]

    @abstractmethod
    def get_model(self):
        """The inner model that carries the LlavaMetaModel mixin."""

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        images: Optional[Images] = None,
        return_dict: Optional[bool] = None,
    ):
        if inputs_embeds is None:
            input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images
                )
            )
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return self.llava_output(outputs, attention_mask if images is not None else None, return_dict)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, images=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, **kwargs
        )
        model_inputs["images"] = images
        return model_inputs

    def get_image_tower(self) -> Optional[VisionTower]:
        return self.get_model().get_image_tower()

    def kv_cache_length(self, past_key_values) -> int:
        """Tokens held in the KV cache: [batch, heads, seq, head_dim] layout; Qwen overrides."""
        return past_key_values[-1][-1].shape[-2]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixel values -> [N, tokens, hidden] LLM-space features."""
        projector = self.get_model().mm_projector
        features = self.get_image_tower()(images)
        return projector(features.to(next(projector.parameters(), features).dtype))

    @staticmethod
    def _stack_images(images: Images) -> Optional[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(
                    f"images must be a [N, 3, H, W] tensor or a list of [3, H, W] tensors; got a tensor of shape "
                    f"{tuple(images.shape)}."
                )
            return images
        images = list(images)
        if not images:
            return None
        shapes = {tuple(image.shape) for image in images}
        if any(image.ndim != 3 for image in images) or len(shapes) != 1:
            raise ValueError(
                f"images must be a list of [3, H, W] tensors of one size (one per <image> placeholder); got "
                f"shapes {sorted(shapes)}. Preprocess every image with the tower's image processor."
            )
        return torch.stack(images)

    @staticmethod
    def _check_image_counts(placeholders: List[int], num_images: int) -> None:
        remaining = num_images
        for index, count in enumerate(placeholders):
            if count > remaining:
                raise ValueError(
                    f"Sample {index} of the batch has {count} <image> placeholder(s) but only {remaining} of the "
                    f"{num_images} image(s) given are left for it (placeholders per sample: {placeholders}). "
                    "Pass exactly one image per <image> placeholder, in batch order; text-only samples take none."
                )
            remaining -= count
        if remaining:
            raise ValueError(
                f"{num_images} image(s) were given but the batch has only {sum(placeholders)} <image> "
                f"placeholder(s) (per sample: {placeholders}). Every image needs an <image> placeholder in its "
                "sample's text: pass exactly one image per placeholder, in batch order."
            )

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.LongTensor,
        position_ids: Optional[torch.LongTensor],
        attention_mask: Optional[torch.Tensor],
        past_key_values,
        labels: Optional[torch.LongTensor],
        images: Optional[Images],
        padding_side: Optional[str] = None,
        image_features: Optional[torch.Tensor] = None,
    ) -> Tuple:
        """Replace each -200 placeholder by its image's features.

        Returns `(input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels)` as the
        backbone forward takes them: on a prompt with images, `input_ids` is None and `inputs_embeds` the
        spliced sequence, labels are IGNORE_INDEX over image tokens, the batch is re-padded on
        `padding_side` (default `config.tokenizer_padding_side`, else right) and cut to
        `config.tokenizer_model_max_length` when set. On a decode step (KV cache given) the mask is
        extended to the cache length + new tokens and positions are derived from it.
        `image_features`: `encode_images(images)` when already computed; the tower is then not run again
        (how `moellava.vis.capture` lays out, labels standing for positions, a sequence the model just saw).
        """
        placeholder = input_ids == IMAGE_TOKEN_INDEX if input_ids is not None else None
        if past_key_values is not None:
            if placeholder is not None and placeholder.any():
                raise ValueError(
                    "An <image> placeholder arrived in a decode step (past_key_values given). Pass the whole "
                    "prompt with its images in the first forward call."
                )
            if images is None or attention_mask is None:
                return input_ids, position_ids, attention_mask, past_key_values, None, labels
            return self._decode_step_inputs(input_ids, attention_mask, past_key_values, labels)

        if images is None:
            if placeholder is not None and placeholder.any():
                raise ValueError(
                    f"The batch has {placeholder.sum(1).tolist()} <image> placeholder(s) per sample but images=None. "
                    "Pass one image per placeholder (images=[N, 3, H, W])."
                )
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if self.get_image_tower() is None:
            raise ValueError(
                "images were given but this model has no image tower (config.mm_image_tower is unset). "
                "Call model.get_model().initialize_vision_modules(model_args) first."
            )
        if image_features is None:
            pixel_values = self._stack_images(images)
            num_images = 0 if pixel_values is None else pixel_values.shape[0]
        else:
            num_images = image_features.shape[0]

        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        self._check_image_counts((placeholder & mask).sum(1).tolist(), num_images)
        features = image_features
        if features is None and num_images:
            features = self.encode_images(pixel_values)
        # Placeholders get a valid id for the lookup; their rows are dropped below.
        text_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))

        sequences, sequence_labels = [], []
        image_index = 0
        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        for b in range(input_ids.shape[0]):
            keep = mask[b]
            embeds, ids = text_embeds[b][keep], input_ids[b][keep]
            sample_labels = labels[b][keep] if labels is not None else None
            pieces, piece_labels, start = [], [], 0
            for position in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist() + [ids.shape[0]]:
                pieces.append(embeds[start:position])
                if sample_labels is not None:
                    piece_labels.append(sample_labels[start:position])
                if position < ids.shape[0]:
                    image = features[image_index].to(embeds.dtype)
                    image_index += 1
                    pieces.append(image)
                    piece_labels.append(torch.full((image.shape[0],), IGNORE_INDEX, dtype=ids.dtype,
                                                   device=ids.device))
                start = position + 1
            sequences.append(torch.cat(pieces)[:max_length])
            if sample_labels is not None:
                sequence_labels.append(torch.cat(piece_labels)[:max_length])

        side = padding_side or getattr(self.config, "tokenizer_padding_side", None) or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding side {side!r} is not supported: use 'left' or 'right'.")
        mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
        inputs_embeds, new_mask, new_positions = self._pad(sequences, side, 0.0, mask_dtype)
        new_labels = None
        if labels is not None:
            new_labels, _, _ = self._pad(sequence_labels, side, IGNORE_INDEX, mask_dtype)
        return None, new_positions, new_mask, None, inputs_embeds, new_labels

    @staticmethod
    def _pad(sequences: List[torch.Tensor], side: str, value, mask_dtype: torch.dtype):
        """Stack sequences padded to the longest: values, attention mask, positions (0.. on real tokens)."""
        length = max(seq.shape[0] for seq in sequences)
        padded, masks, positions = [], [], []
        for seq in sequences:
            pad = length - seq.shape[0]
            filler = seq.new_full((pad,) + tuple(seq.shape[1:]), value)
            real = torch.ones(seq.shape[0], dtype=mask_dtype, device=seq.device)
            blank = torch.zeros(pad, dtype=mask_dtype, device=seq.device)
            pos = torch.arange(seq.shape[0], device=seq.device)
            zeros = torch.zeros(pad, dtype=pos.dtype, device=seq.device)
            if side == "left":
                padded.append(torch.cat([filler, seq]))
                masks.append(torch.cat([blank, real]))
                positions.append(torch.cat([zeros, pos]))
            else:
                padded.append(torch.cat([seq, filler]))
                masks.append(torch.cat([real, blank]))
                positions.append(torch.cat([pos, zeros]))
        return torch.stack(padded), torch.stack(masks), torch.stack(positions)

    def _decode_step_inputs(self, input_ids, attention_mask, past_key_values, labels) -> Tuple:
        target = self.kv_cache_length(past_key_values) + input_ids.shape[1]
        missing = target - attention_mask.shape[1]
        if missing < 0:
            raise ValueError(
                f"The attention mask covers {attention_mask.shape[1]} positions but the KV cache plus the new tokens "
                f"hold only {target}."
            )
        if missing > 0:
            # The caller's mask counts each image as one token; the cache holds all image tokens. Without
            # padding the missing positions are all real, so ones complete it (the LLaVA approach).
            if not attention_mask.bool().all():
                raise ValueError(
                    "The attention mask has padding but does not cover the image tokens in the KV cache. "
                    "Continue from the mask returned in the previous step's outputs.attention_mask."
                )
            ones = attention_mask.new_ones((attention_mask.shape[0], missing))
            attention_mask = torch.cat([attention_mask, ones], dim=1)
        position_ids = attention_mask.long().cumsum(-1)[:, -input_ids.shape[1]:] - 1
        return input_ids, position_ids, attention_mask, past_key_values, None, labels

    def llava_output(self, outputs, attention_mask: Optional[torch.Tensor], return_dict: Optional[bool]):
        """The causal LM's result with the spliced attention mask; the MoE mixin adds its losses here."""
        result = LlavaCausalLMOutputWithPast(**outputs, attention_mask=attention_mask)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        return result if return_dict else result.to_tuple()

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            standardize_cache_format=False):
        # With a KV cache, continue from the spliced mask (image tokens expanded) instead of the text mask.
        spliced_mask = getattr(outputs, "attention_mask", None)
        if spliced_mask is not None and getattr(outputs, "past_key_values", None) is not None:
            model_kwargs["attention_mask"] = spliced_mask
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder,
            standardize_cache_format=standardize_cache_format,
        )

    def initialize_vision_tokenizer(self, model_args, tokenizer) -> None:
        """Add `<im_patch>` / `<im_start>`, `<im_end>` when configured; new embedding rows start at the
        mean of the existing rows. Embeddings grow when needed and never shrink."""
        new_tokens = []
        if getattr(model_args, "mm_use_im_patch_token", False):
            new_tokens.append(DEFAULT_IMAGE_PATCH_TOKEN)
        use_start_end = getattr(model_args, "mm_use_im_start_end", False)
        if use_start_end:
            new_tokens += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
        if not new_tokens:
            return
        tokenizer.add_tokens(new_tokens, special_tokens=True)
        old_rows = self.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > old_rows:
            self.resize_token_embeddings(len(tokenizer))
            with torch.no_grad():
                for matrix in (self.get_input_embeddings().weight, self.get_output_embeddings().weight):
                    matrix[old_rows:] = matrix[:old_rows].mean(dim=0, keepdim=True)
        tune_adapter = getattr(model_args, "tune_mm_mlp_adapter", False)
        if use_start_end:
            if tune_adapter:
                self.get_input_embeddings().requires_grad_(True)
                self.get_output_embeddings().requires_grad_(False)
            adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
            if adapter:
                self._load_start_end_embeddings(adapter, new_rows=2)
        elif tune_adapter:
            self.get_input_embeddings().requires_grad_(False)
            self.get_output_embeddings().requires_grad_(False)

    def _load_start_end_embeddings(self, path: str, new_rows: int) -> None:
        """Stage 1 with <im_start>/<im_end> trained their embedding rows; take them from its adapter file."""
        state = load_projector_file(path)
        keys = [key for key in state if key.endswith("embed_tokens.weight")]
        if not keys:
            raise ValueError(f"{path} has no embed_tokens.weight, which --mm_use_im_start_end needs from Stage 1.")
        saved = state[keys[0]]
        weight = self.get_input_embeddings().weight
        with torch.no_grad():
            if saved.shape == weight.shape:
                weight[-new_rows:] = saved[-new_rows:].to(weight.dtype)
            elif saved.shape[0] == new_rows:
                weight[-new_rows:] = saved.to(weight.dtype)
            else:
                raise ValueError(
                    f"{path}: embed_tokens.weight has shape {tuple(saved.shape)}; expected {tuple(weight.shape)} "
                    f"or {new_rows} rows. Use the Stage-1 output of this LLM and tokenizer."
                )
