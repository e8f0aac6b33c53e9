"""mm_utils: image placeholders in token ids, square padding, one image preprocessing for training and
inference, keyword stopping, display names."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from moellava.constants import IMAGE_TOKEN_INDEX
from moellava.mm_utils import (
    KeywordsStoppingCriteria,
    expand2square,
    get_model_name_from_path,
    preprocess_image,
    process_images,
    tokenizer_image_token,
)


def test_expand2square_centres_the_image_on_the_background():
    image = Image.new("RGB", (6, 2), (255, 0, 0))
    square = expand2square(image, (0, 0, 255))
    assert square.size == (6, 6)
    assert square.getpixel((0, 0)) == (0, 0, 255) and square.getpixel((0, 5)) == (0, 0, 255)
    assert square.getpixel((0, 2)) == (255, 0, 0) and square.getpixel((5, 3)) == (255, 0, 0)
    assert expand2square(square, (0, 0, 0)) is square


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})


def test_pad_keeps_the_whole_image_and_square_crops_it(processor):
    # A wide image whose right quarter is red: padding keeps it, the default resize + centre crop cuts it off.
    image = Image.new("RGB", (32, 8), (255, 255, 255))
    image.paste((255, 0, 0), (24, 0, 32, 8))
    padded = preprocess_image(image, processor, "pad")
    cropped = preprocess_image(image, processor, "square")
    assert padded.shape == cropped.shape == (3, 8, 8)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert torch.allclose(padded[:, 4, 7], red, atol=0.3)
    assert not torch.allclose(cropped[:, 4, 7], red, atol=0.3)


def test_inference_preprocessing_equals_training_preprocessing(processor):
    images = [Image.new("RGB", (20, 10), (10, 200, 30)), Image.new("RGB", (9, 15), (200, 20, 30))]
    for aspect in ("pad", "square"):
        batch = process_images(images, processor, SimpleNamespace(image_aspect_ratio=aspect))
        assert torch.equal(batch, torch.stack([preprocess_image(i, processor, aspect) for i in images]))


def test_tokenizer_image_token_keeps_one_bos_and_one_placeholder_per_image(toy_tokenizers):
    llama, qwen = toy_tokenizers["llama"], toy_tokenizers["qwen"]
    ids = tokenizer_image_token("<image>\nHi <image> there", llama)
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    assert ids[1] == IMAGE_TOKEN_INDEX and ids.count(IMAGE_TOKEN_INDEX) == 2
    assert tokenizer_image_token("Hi there", llama) == llama("Hi there").input_ids
    ids = tokenizer_image_token("Hi<image>there", qwen)
    assert ids == qwen("Hi").input_ids + [IMAGE_TOKEN_INDEX] + qwen("there").input_ids
    assert torch.equal(tokenizer_image_token("Hi", qwen, return_tensors="pt"), torch.tensor(qwen("Hi").input_ids))
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer_image_token("Hi", qwen, return_tensors="np")


def test_keywords_stopping_criteria_stops_on_the_end_string(toy_tokenizers):
    tokenizer = toy_tokenizers["qwen"]
    prompt = torch.tensor([tokenizer("USER: hi ASSISTANT:").input_ids])
    stop = KeywordsStoppingCriteria(["<|endoftext|>"], tokenizer, prompt)
    assert not stop(prompt)
    going = torch.cat([prompt, torch.tensor([tokenizer(" A cat").input_ids])], dim=1)
    assert not stop(going)
    ended = torch.cat([going, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
    assert stop(ended)


def test_model_name_from_path():
    assert get_model_name_from_path("/ckpt/llava-phi-moe/") == "llava-phi-moe"
    assert get_model_name_from_path("/ckpt/run/checkpoint-200") == "run_checkpoint-200"
