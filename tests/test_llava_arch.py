"""Splicing image features at the -200 placeholders, labels, padding, truncation, decode steps, the
Stage-1 projector file and the vision/tokenizer initialisation."""

import copy

import pytest
import torch
import torch.nn.functional as F

from moellava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from moellava.tokenization import load_tokenizer

import tiny_llava

TOKENS = 16  # features per image of the tiny CLIP tower (4x4 patches, CLS dropped)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return {
        "tokenizer": tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer"),
        "tower": tiny_llava.build_tiny_clip_tower(root / "clip"),
        "root": root,
    }


@pytest.fixture(scope="module")
def base_model(dirs):
    return tiny_llava.tiny_llava_llama(dirs["tokenizer"], dirs["tower"])


@pytest.fixture
def model(base_model):
    model = copy.deepcopy(base_model)
    yield model


def splice_by_hand(model, ids, pixels):
    """The expected sequence: text embeddings with each -200 replaced by its image's features."""
    embed = model.get_input_embeddings()
    features = model.encode_images(pixels) if pixels is not None else None
    pieces, image, start = [], 0, 0
    for pos in [i for i, t in enumerate(ids) if t == IMG] + [len(ids)]:
        pieces.append(embed(torch.tensor(ids[start:pos], dtype=torch.long)))
        if pos < len(ids):
            pieces.append(features[image])
            image += 1
        start = pos + 1
    return torch.cat(pieces)


SAMPLE_A = [1, 300, 301, IMG, 302, 303, 304]            # one image
SAMPLE_B = [1, 310, 311, 312]                           # text only
SAMPLE_C = [1, IMG, 320, IMG, 321]                      # two images


def test_forward_equals_backbone_on_hand_spliced_embeddings(model):
    pixels = tiny_llava.random_pixels(1)
    ids = torch.tensor([SAMPLE_A])
    out = model(ids, images=pixels)
    embeds = splice_by_hand(model, SAMPLE_A, pixels)
    assert out.logits.shape == (1, len(SAMPLE_A) - 1 + TOKENS, model.config.vocab_size)
    reference = model(inputs_embeds=embeds[None])
    torch.testing.assert_close(out.logits, reference.logits)
    assert out.attention_mask.tolist() == [[1] * embeds.shape[0]]


def test_labels_are_ignored_over_image_tokens(model):
    pixels = tiny_llava.random_pixels(2)
    ids = torch.tensor([SAMPLE_C])
    labels = torch.tensor([[IGNORE_INDEX, IMG, 320, IMG, 321]])
    _, positions, mask, _, embeds, new_labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, None, None, labels, pixels
    )
    expected = [IGNORE_INDEX] + [IGNORE_INDEX] * TOKENS + [320] + [IGNORE_INDEX] * TOKENS + [321]
    assert new_labels.tolist() == [expected]
    assert positions.tolist() == [list(range(len(expected)))]
    torch.testing.assert_close(embeds[0], splice_by_hand(model, SAMPLE_C, pixels))
    # Images are assigned in order: the first placeholder gets image 0.
    torch.testing.assert_close(embeds[0, 1:1 + TOKENS], model.encode_images(pixels)[0])

    out = model(ids, images=pixels, labels=labels)
    logits = out.logits[0, :-1]
    target = torch.tensor(expected[1:])
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX))


def pad_batch(samples, pad_id=0):
    """Right-padded ids and mask, as a collator produces them."""
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, sample in enumerate(samples):
        ids[i, :len(sample)] = torch.tensor(sample)
        mask[i, :len(sample)] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_each_sample_alone(model, side):
    model.config.tokenizer_padding_side = side
    pixels = tiny_llava.random_pixels(3)
    samples = [SAMPLE_A, SAMPLE_B, SAMPLE_C]
    ids, mask = pad_batch(samples)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    out = model(ids, attention_mask=mask, images=pixels, labels=labels)

    lengths = [len(SAMPLE_A) - 1 + TOKENS, len(SAMPLE_B), len(SAMPLE_C) - 2 + 2 * TOKENS]
    longest = max(lengths)
    assert out.logits.shape[1] == longest
    alone_images = [pixels[:1], None, pixels[1:]]
    for i, (sample, length) in enumerate(zip(samples, lengths)):
        real = slice(longest - length, longest) if side == "left" else slice(0, length)
        expected_mask = torch.zeros(longest, dtype=torch.long)
        expected_mask[real] = 1
        assert out.attention_mask[i].tolist() == expected_mask.tolist()
        alone = model(torch.tensor([sample]), images=alone_images[i])
        torch.testing.assert_close(out.logits[i, real], alone.logits[0], rtol=1e-4, atol=1e-5)

    _, positions, _, _, _, new_labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, pixels
    )
    real_b = slice(longest - lengths[1], longest) if side == "left" else slice(0, lengths[1])
    assert positions[1, real_b].tolist() == list(range(lengths[1]))
    assert new_labels[1, real_b].tolist() == SAMPLE_B
    assert (new_labels[1][torch.ones(longest, dtype=torch.bool).index_fill_(0, torch.arange(longest)[real_b], False)]
            == IGNORE_INDEX).all()


def test_truncation_after_image_expansion(model):
    pixels = tiny_llava.random_pixels(1)
    ids = torch.tensor([SAMPLE_A])
    labels = ids.clone()
    full = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, labels, pixels)
    model.config.tokenizer_model_max_length = 10
    cut = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, labels, pixels)
    assert full[4].shape[1] == len(SAMPLE_A) - 1 + TOKENS and cut[4].shape[1] == 10
    torch.testing.assert_close(cut[4], full[4][:, :10])
    assert cut[5].tolist() == full[5][:, :10].tolist()
    assert cut[2].tolist() == [[1] * 10]


def test_images_must_match_placeholders(model):
    ids, mask = pad_batch([SAMPLE_A, SAMPLE_B, SAMPLE_C])
    with pytest.raises(ValueError, match=r"Sample 2 of the batch has 2 <image> placeholder\(s\) but only 1 of the 2 "
                                         r"image\(s\) given are left for it \(placeholders per sample: \[1, 0, 2\]\)"):
        model(ids, attention_mask=mask, images=tiny_llava.random_pixels(2))
    with pytest.raises(ValueError, match=r"4 image\(s\) were given but the batch has only 3 <image> placeholder\(s\) "
                                         r"\(per sample: \[1, 0, 2\]\).*one image per placeholder"):
        model(ids, attention_mask=mask, images=tiny_llava.random_pixels(4))
    with pytest.raises(ValueError, match=r"\[1, 0, 2\] <image> placeholder\(s\) per sample but images=None"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"list of \[3, H, W\] tensors of one size"):
        model(torch.tensor([SAMPLE_A]), images=[torch.zeros(3, 32, 32), torch.zeros(3, 16, 16)])


def test_images_as_list_equal_images_as_tensor(model):
    pixels = tiny_llava.random_pixels(2)
    ids = torch.tensor([SAMPLE_C])
    torch.testing.assert_close(model(ids, images=list(pixels)).logits, model(ids, images=pixels).logits)
    # A text-only batch may come with an empty image list.
    text = torch.tensor([SAMPLE_B])
    torch.testing.assert_close(model(text, images=[]).logits, model(text).logits)


def fake_cache(batch, length, layers=2):
    kv = torch.zeros(batch, 4, length, 16)
    return tuple((kv, kv) for _ in range(layers))


def test_decode_step_extends_mask_to_the_cache(model):
    ids = torch.tensor([[305], [306]])
    text_mask = torch.ones(2, 8, dtype=torch.long)  # 7 prompt tokens (one <image>) + this one
    cache = fake_cache(2, 7 - 1 + TOKENS)
    new_ids, positions, mask, past, embeds, _ = model.prepare_inputs_labels_for_multimodal(
        ids, None, text_mask, cache, None, tiny_llava.random_pixels(2)
    )
    assert embeds is None and new_ids is ids and past is cache
    assert mask.shape == (2, 7 + TOKENS) and bool(mask.all())
    assert positions.tolist() == [[7 - 1 + TOKENS]] * 2

    # A spliced, left-padded mask that already covers the cache is kept; positions skip the padding.
    spliced = torch.ones(2, 7 + TOKENS, dtype=torch.long)
    spliced[1, :3] = 0
    _, positions, mask, _, _, _ = model.prepare_inputs_labels_for_multimodal(
        ids, None, spliced, cache, None, tiny_llava.random_pixels(2)
    )
    assert mask is spliced and positions.tolist() == [[6 + TOKENS], [3 + TOKENS]]

    padded_text_mask = text_mask.clone()
    padded_text_mask[1, 0] = 0
    with pytest.raises(ValueError, match="has padding but does not cover the image tokens"):
        model.prepare_inputs_labels_for_multimodal(ids, None, padded_text_mask, cache, None,
                                                   tiny_llava.random_pixels(2))
    with pytest.raises(ValueError, match="placeholder arrived in a decode step"):
        model.prepare_inputs_labels_for_multimodal(torch.tensor([[IMG]]), None, text_mask[:1], fake_cache(1, 5),
                                                   None, tiny_llava.random_pixels(1))


def test_stage1_projector_file_round_trip_and_errors(model, base_model, dirs, tmp_path):
    with torch.no_grad():
        for param in model.get_model().mm_projector.parameters():
            param.add_(1.0)
    state = {f"model.mm_projector.{k}": v for k, v in model.get_model().mm_projector.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(3, 3)  # other keys are ignored
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)

    fresh = copy.deepcopy(base_model)
    fresh.get_model().load_mm_projector(str(path))
    for key, value in model.get_model().mm_projector.state_dict().items():
        torch.testing.assert_close(fresh.get_model().mm_projector.state_dict()[key], value, rtol=0, atol=0)

    # LLaVA-style keys (no image_spatial_proj) do not fit: the error lists them.
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32)}, path)
    with pytest.raises(ValueError, match=r"missing keys \['image_spatial_proj.0.bias'.*unexpected keys \['0.weight'\]"):
        fresh.get_model().load_mm_projector(str(path))
    torch.save({"model.mm_projector.image_spatial_proj.0.weight": torch.zeros(64, 31),
                "model.mm_projector.image_spatial_proj.0.bias": torch.zeros(64),
                "model.mm_projector.image_spatial_proj.2.weight": torch.zeros(64, 64),
                "model.mm_projector.image_spatial_proj.2.bias": torch.zeros(64)}, path)
    with pytest.raises(ValueError, match=r"shape mismatches \[\('image_spatial_proj.0.weight', \(64, 31\), \(64, 32\)\)\]"):
        fresh.get_model().load_mm_projector(str(path))
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="holds no 'mm_projector.' weights"):
        fresh.get_model().load_mm_projector(str(path))


def test_initialize_vision_modules_writes_a_self_contained_config(base_model, dirs):
    config = base_model.config
    tower = base_model.get_image_tower()
    assert config.mm_image_tower == str(dirs["tower"])
    assert config.mm_hidden_size == 32 and config.use_mm_proj is True
    assert config.mm_vision_select_layer == -2 and config.mm_vision_select_feature == "patch"
    assert config.image_projector_type == "mlp2x_gelu"
    assert config.mm_image_tower_config["model_type"] == "clip_vision_model"
    assert config.mm_image_processor_config["crop_size"] == {"height": 32, "width": 32}
    assert not any(p.requires_grad for p in tower.parameters())
    assert all(p.requires_grad for p in base_model.get_model().mm_projector.parameters())


def test_initialize_vision_modules_on_an_existing_tower(model, dirs):
    inner = model.get_model()
    inner.mm_projector.requires_grad_(False)
    inner.initialize_vision_modules(tiny_llava.tiny_model_args(dirs["tower"], mm_vision_select_layer=-1))
    assert model.get_image_tower().select_layer == -1 and model.config.mm_vision_select_layer == -1
    assert all(p.requires_grad for p in inner.mm_projector.parameters())
    with pytest.raises(ValueError, match="already has the image tower .* Pass --image_tower"):
        inner.initialize_vision_modules(tiny_llava.tiny_model_args("openai/clip-vit-large-patch14-336"))
    with pytest.raises(ValueError, match="projector is 'mlp2x_gelu', but --image_projector_type is 'linear'"):
        inner.initialize_vision_modules(tiny_llava.tiny_model_args(dirs["tower"], image_projector_type="linear"))


def test_no_tower_means_images_are_refused(dirs):
    from moellava.model import LlavaLlamaConfig, LlavaLlamaForCausalLM

    tokenizer = load_tokenizer(dirs["tokenizer"])
    text_only = LlavaLlamaForCausalLM(tiny_llava.tiny_llama_config(tokenizer, LlavaLlamaConfig))
    assert text_only.get_image_tower() is None
    with pytest.raises(ValueError, match="no image tower.*initialize_vision_modules"):
        text_only(torch.tensor([SAMPLE_A]), images=tiny_llava.random_pixels(1))


def test_initialize_vision_tokenizer_adds_rows_at_the_mean(model, dirs):
    tokenizer = load_tokenizer(dirs["tokenizer"])
    old_rows = model.get_input_embeddings().weight.shape[0]
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    args = tiny_llava.tiny_model_args(dirs["tower"], mm_use_im_patch_token=True, mm_use_im_start_end=True,
                                      tune_mm_mlp_adapter=True)
    model.initialize_vision_tokenizer(args, tokenizer)
    assert len(tokenizer) == old_rows + 3
    new_in = model.get_input_embeddings().weight
    assert new_in.shape[0] == old_rows + 3
    torch.testing.assert_close(new_in[:old_rows], old_in)
    torch.testing.assert_close(new_in[old_rows:], old_in.mean(0, keepdim=True).expand(3, -1))
    torch.testing.assert_close(model.get_output_embeddings().weight[old_rows:], old_out.mean(0, keepdim=True).expand(3, -1))
    assert new_in.requires_grad and not model.get_output_embeddings().weight.requires_grad
    assert tokenizer.convert_tokens_to_ids("<im_start>") == old_rows + 1
