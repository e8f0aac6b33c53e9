"""Multimodal helpers shared by training and inference: image placeholders in token ids, image
preprocessing, stopping on keywords."""

import base64
from io import BytesIO
from typing import List, Optional, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria

from moellava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX


def load_image_from_base64(data: str) -> Image.Image:
    return Image.open(BytesIO(base64.b64decode(data)))


def expand2square(image: Image.Image, background_color) -> Image.Image:
    """Pad the shorter side so the image becomes square, keeping it centred."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def preprocess_image(image: Image.Image, image_processor, image_aspect_ratio: Optional[str]) -> torch.Tensor:
    """One PIL image as the model sees it, in training and at inference alike: padded to square with the
    processor's mean colour when `image_aspect_ratio == 'pad'`, then the processor's resize/crop/normalise."""
    if image_aspect_ratio == "pad":
        image = expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))
    return image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


def process_images(images: Sequence[Image.Image], image_processor, model_cfg):
    """Preprocess PIL images as the checkpoint was trained (`model_cfg.image_aspect_ratio`); stacked when
    they share a shape, else a list."""
    aspect = getattr(model_cfg, "image_aspect_ratio", None)
    tensors = [preprocess_image(image, image_processor, aspect) for image in images]
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors, dim=0)
    return tensors


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Tokenize `prompt`, replacing each `<image>` by one `image_token_index` placeholder.

    The text between placeholders is tokenized chunk by chunk (no merges across an image); a BOS that the
    tokenizer adds is kept once, at the start.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    input_ids: List[int] = []
    offset = 0
    if chunks and chunks[0] and tokenizer.bos_token_id is not None and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[offset:])
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"Unsupported return_tensors={return_tensors!r}; use None or 'pt'.")


def image_prompt_prefix(model_cfg) -> str:
    """What opens a user message about an image: `<image>\n`, wrapped in `<im_start>`/`<im_end>` when the
    checkpoint was trained with them (`mm_use_im_start_end`)."""
    if getattr(model_cfg, "mm_use_im_start_end", False):
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n"
    return DEFAULT_IMAGE_TOKEN + "\n"


def unused_vocabulary_rows(model, tokenizer) -> Optional[List[int]]:
    """Output rows past the tokenizer (`suppress_tokens` for generate), or None when there are none.

    Vocabularies padded past the tokenizer (Qwen's, Phi-2's, StableLM-2's) have rows with no text; an
    undertrained model may still pick one, and the answer could not be decoded.
    """
    rows = model.get_output_embeddings().weight.shape[0]
    return list(range(len(tokenizer), rows)) or None


def decode_answer(tokenizer, new_ids, stop_str: Optional[str]) -> str:
    """Generated ids as answer text: no special tokens, no surrounding space, no trailing end-of-turn
    string (a template whose end is not a special token leaves it in the decoded text)."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    if stop_str and text.endswith(stop_str):
        text = text[: -len(stop_str)].rstrip()
    return text


def get_model_name_from_path(model_path: str) -> str:
    """A display name for a checkpoint folder (used for answer files, never to choose code paths)."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop generation once every sequence of the batch ends with one of `keywords`."""

    def __init__(self, keywords: Sequence[str], tokenizer, input_ids: torch.Tensor):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids = []
        self.max_keyword_len = 0
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if len(ids) > 1 and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.max_keyword_len = max(self.max_keyword_len, len(ids))
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))
        self.start_len = input_ids.shape[1]

    def sequence_ended(self, output_ids: torch.Tensor) -> bool:
        """Whether one sequence (1-D ids, prompt included) ends with a keyword: generation of it stops here."""
        generated = output_ids.shape[0] - self.start_len
        if generated <= 0:
            return False
        for ids in self.keyword_ids:
            if len(ids) <= generated and torch.equal(output_ids[-len(ids):].cpu(), ids):
                return True
        window = min(generated, self.max_keyword_len)
        text = self.tokenizer.decode(output_ids[-window:], skip_special_tokens=True)
        return any(keyword and keyword in text for keyword in self.keywords)

    def __call__(self, output_ids: torch.LongTensor, scores: Optional[torch.FloatTensor] = None, **kwargs) -> bool:
        return all(self.sequence_ended(row) for row in output_ids)
