"""Image towers (CLIP, our SigLIP), their dispatch and image processors, and the projectors."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoder

from moellava.model.multimodal_encoder import (
    CLIPVisionModel as OurCLIPVisionModel,
    CLIPVisionTower,
    SiglipImageProcessor,
    SiglipVisionModel,
    SiglipVisionTower,
    build_image_tower,
    load_image_tower,
)
from moellava.model.multimodal_projector import build_image_projector, build_projector

import tiny_llava


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_llava.build_tiny_clip_tower(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return tiny_llava.build_tiny_siglip_tower(tmp_path_factory.mktemp("siglip"))


def test_clip_select_layer_and_feature(clip_dir):
    reference = CLIPVisionModel.from_pretrained(clip_dir)
    pixels = tiny_llava.random_pixels(2)
    hidden = reference(pixels, output_hidden_states=True).hidden_states

    tower = load_image_tower(clip_dir, select_layer=-2, select_feature="patch")
    assert isinstance(tower, CLIPVisionTower)
    assert tower.num_patches == 16 and tower.num_tokens == 16 and tower.hidden_size == 32
    # Our SDPA tower against transformers' eager CLIPVisionModel with the same weights.
    torch.testing.assert_close(tower(pixels), hidden[-2][:, 1:], rtol=0, atol=1e-5)  # CLS dropped

    tower = load_image_tower(clip_dir, select_layer=1, select_feature="cls_patch")
    assert tower.num_tokens == 17
    torch.testing.assert_close(tower(pixels), hidden[1], rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_our_sdpa_clip_gives_transformers_clip_outputs(tmp_path, hidden_act):
    """Our CLIPVisionModel loads a transformers CLIPVisionModel folder with nothing missing or left over, and
    its last hidden state, pooled output and every hidden state equal transformers' (eager attention)."""
    folder = tiny_llava.build_tiny_clip_tower(tmp_path, seed=3, hidden_act=hidden_act, num_hidden_layers=3)
    reference = CLIPVisionModel.from_pretrained(folder).eval()
    ours, info = OurCLIPVisionModel.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert set(ours.state_dict()) == set(reference.state_dict())
    pixels = tiny_llava.random_pixels(3, seed=4)
    mine, theirs = ours.eval()(pixels, output_hidden_states=True), reference(pixels, output_hidden_states=True)
    torch.testing.assert_close(mine.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(mine.pooler_output, theirs.pooler_output, rtol=0, atol=1e-5)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == 4
    for a, b in zip(mine.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_our_clip_loads_a_full_clip_folder_ignoring_text_tower_and_projections(tmp_path):
    """openai/clip-vit-* folders hold a whole CLIPModel (text tower, projections, logit scale) and, written by
    older transformers, the position_ids buffer."""
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    config = transformers.CLIPConfig(vision_config=tiny_llava.TINY_TOWER, text_config=text, projection_dim=8)
    full = transformers.CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours, info = OurCLIPVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    pixels = tiny_llava.random_pixels(2)
    with torch.no_grad():
        expected = full.vision_model(pixels).last_hidden_state
        torch.testing.assert_close(ours.eval()(pixels).last_hidden_state, expected, rtol=0, atol=1e-5)


def test_tower_is_frozen_and_runs_without_grad(clip_dir):
    tower = load_image_tower(clip_dir)
    assert not any(p.requires_grad for p in tower.parameters())
    pixels = tiny_llava.random_pixels(1).requires_grad_(True)
    assert not tower(pixels).requires_grad


@pytest.mark.parametrize(
    "layer, feature, message",
    [(-4, "patch", "mm_vision_select_layer=-4 is out of range"), (3, "patch", "use a value in [-3, 2]"),
     (-2, "cls", "mm_vision_select_feature='cls' is not supported")],
)
def test_bad_feature_selection(clip_dir, layer, feature, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_image_tower(clip_dir, select_layer=layer, select_feature=feature)


def test_siglip_patch_keeps_every_patch(siglip_dir):
    tower = load_image_tower(siglip_dir, select_layer=-1)
    assert isinstance(tower, SiglipVisionTower)
    assert tower.num_patches == tower.num_tokens == 16
    pixels = tiny_llava.random_pixels(3)
    hidden = tower.image_tower(pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 3  # embeddings + 2 layers
    torch.testing.assert_close(tower(pixels), hidden[-1], rtol=0, atol=0)
    assert tower(pixels).shape == (3, 16, 32)
    with pytest.raises(ValueError, match="needs a CLS token"):
        load_image_tower(siglip_dir, select_feature="cls_patch")


def test_siglip_embeddings_are_conv_patches_plus_positions(siglip_dir):
    model = SiglipVisionModel.from_pretrained(siglip_dir)
    pixels = tiny_llava.random_pixels(1)
    embeddings = model.vision_model.embeddings
    patches = torch.nn.functional.conv2d(pixels, embeddings.patch_embedding.weight, embeddings.patch_embedding.bias,
                                         stride=8)
    expected = patches.flatten(2).transpose(1, 2) + embeddings.position_embedding.weight
    torch.testing.assert_close(embeddings(pixels), expected)
    with pytest.raises(ValueError, match="Preprocess with the tower's image processor"):
        embeddings(torch.zeros(1, 3, 24, 24))


def test_siglip_encoder_matches_clip_encoder_with_the_same_weights(siglip_dir):
    """Same pre-LN block and weight names as CLIP's encoder: with gelu_pytorch_tanh they compute the same."""
    siglip = SiglipVisionModel.from_pretrained(siglip_dir).vision_model.encoder
    clip_config = CLIPVisionConfig(**tiny_llava.TINY_TOWER, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    clip = CLIPEncoder(clip_config)
    assert set(clip.state_dict()) == set(siglip.state_dict())
    clip.load_state_dict(siglip.state_dict())
    embeds = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    last, states = siglip(embeds)
    reference = clip(inputs_embeds=embeds, output_hidden_states=True)
    torch.testing.assert_close(last, reference.last_hidden_state)
    for ours, theirs in zip(states, reference.hidden_states):
        torch.testing.assert_close(ours, theirs)


def test_siglip_loads_an_official_style_folder_ignoring_head_and_text(tmp_path, siglip_dir):
    """The official folder is a full SiglipModel: vision_config nested, plus text tower and pooling head."""
    vision = SiglipVisionModel.from_pretrained(siglip_dir)
    state = {k: v.contiguous() for k, v in vision.state_dict().items()}
    state.update({
        "vision_model.head.probe": torch.zeros(1, 1, 32),
        "vision_model.head.attention.in_proj_weight": torch.zeros(96, 32),
        "text_model.embeddings.token_embedding.weight": torch.zeros(10, 32),
        "logit_scale": torch.zeros(1),
        "logit_bias": torch.zeros(1),
    })
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    vision_config = json.loads((open(os.path.join(siglip_dir, "config.json")).read()))
    full = {"model_type": "siglip", "architectures": ["SiglipModel"], "vision_config": vision_config,
            "text_config": {"model_type": "siglip_text_model", "hidden_size": 32}}
    (tmp_path / "config.json").write_text(json.dumps(full))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    loaded, info = SiglipVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    for key, value in vision.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    tower = load_image_tower(str(tmp_path))
    assert isinstance(tower, SiglipVisionTower) and tower.config.hidden_size == 32


def test_siglip_image_processor_resize_rescale_normalize():
    official = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
                "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"height": 12, "width": 16}}
    processor = SiglipImageProcessor.from_dict(official)
    pixels = np.random.default_rng(0).integers(0, 256, size=(9, 20, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = processor.preprocess(image, return_tensors="pt")["pixel_values"]
    resized = np.asarray(image.resize((16, 12), resample=Image.BICUBIC), dtype=np.float32)
    expected = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    assert out.shape == (1, 3, 12, 16)  # no crop: the full resized image
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)
    # __call__ and a batch of two (what mm_utils.process_images uses).
    assert processor([image, image], return_tensors="pt")["pixel_values"].shape == (2, 3, 12, 16)


def test_tower_dispatch_reads_model_type_not_the_name(tmp_path, clip_dir):
    misleading = tmp_path / "google-siglip-so400m"
    tiny_llava.build_tiny_clip_tower(misleading)
    assert isinstance(load_image_tower(str(misleading)), CLIPVisionTower)

    not_a_tower = tmp_path / "openai-clip-vit"
    not_a_tower.mkdir()
    (not_a_tower / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'.*supported towers"):
        load_image_tower(str(not_a_tower))


def test_build_from_stored_configs_needs_no_tower_folder(clip_dir):
    tower = load_image_tower(clip_dir)
    config = SimpleNamespace(
        mm_image_tower="/nonexistent/tower", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_image_tower_config=tower.config.to_dict(), mm_image_processor_config=tower.image_processor.to_dict(),
    )
    rebuilt = build_image_tower(config)
    assert isinstance(rebuilt, CLIPVisionTower) and rebuilt.name == "/nonexistent/tower"
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in tower.state_dict().items()}
    assert rebuilt.image_processor.to_dict() == tower.image_processor.to_dict()
    assert not any(p.requires_grad for p in rebuilt.parameters())


def test_projector_types():
    linear = build_image_projector("linear", 32, 64)
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (64, 32)

    mlp = build_image_projector("mlp3x_gelu", 32, 64)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    x = torch.randn(2, 5, 32)
    expected = mlp[4](torch.nn.functional.gelu(mlp[2](torch.nn.functional.gelu(mlp[0](x)))))
    torch.testing.assert_close(mlp(x), expected)

    identity = build_image_projector("identity", 64, 64)
    y = torch.randn(2, 3, 64)
    assert identity(y) is y
    with pytest.raises(ValueError, match="identity' needs the tower width \\(32\\) to equal"):
        build_image_projector("identity", 32, 64)


def test_projector_keys_and_unknown_types():
    config = SimpleNamespace(image_projector_type="mlp2x_gelu", mm_hidden_size=32, hidden_size=64)
    projector = build_projector(config)
    assert sorted(projector.state_dict()) == [
        "image_spatial_proj.0.bias", "image_spatial_proj.0.weight", "image_spatial_proj.2.bias",
        "image_spatial_proj.2.weight",
    ]
    with pytest.raises(ValueError, match="Unknown image_projector_type 'qformer4_36': use one of linear"):
        build_image_projector("qformer4_36", 32, 64)
    with pytest.raises(ValueError, match="needs at least one layer"):
        build_image_projector("mlp0x_gelu", 32, 64)
