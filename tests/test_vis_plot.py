"""Routing figures (`moellava.vis.plot`): the statistics behind them on hand-made routes, and every figure
drawn for 4 and 8 experts, top-1 and top-2, CLIP (576) and SigLIP (729, 728) image tokens, each PNG opened
and checked for its size, for not being blank and for showing every expert's colour."""

import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import torch
from PIL import Image

from moellava.constants import IMAGE_TOKEN_INDEX
from moellava.model.moe import load_balance
from moellava.model.moe.routing import route_tokens
from moellava.vis import plot
from moellava.vis.routes import ANSWER, IMAGE, INSTRUCTION, PADDING, RoutingFileError, RoutingRecords, SampleRoutes


def synthetic_sample(sample_id, experts, top_k, image_tokens, layers, generator):
    """A prompt with one image of `image_tokens` tokens, a padded start and a short answer; routes from
    random router logits, image tokens leaning to expert 0 so the figures have structure."""
    roles = torch.tensor([PADDING] * 3 + [INSTRUCTION] * 12 + [IMAGE] * image_tokens + [INSTRUCTION] * 9
                         + [ANSWER] * 7, dtype=torch.uint8)
    logits, index, weight = [], [], []
    for num_experts in experts:
        layer_logits = torch.randn(roles.shape[0], num_experts, generator=generator)
        layer_logits[roles == IMAGE, 0] += 1.5
        routing = route_tokens(layer_logits, top_k)
        logits.append(layer_logits)
        index.append(routing.expert_index)
        weight.append(routing.gate)
    prompt = torch.tensor([1] + [5] * 11 + [IMAGE_TOKEN_INDEX] + [6] * 9)
    token_ids = torch.cat([torch.full((3,), -1), prompt[:12], torch.full((image_tokens,), IMAGE_TOKEN_INDEX),
                           prompt[13:], torch.arange(7)])
    return SampleRoutes(sample_id, roles, token_ids, logits, index, weight, prompt, torch.arange(8))


def synthetic_records(num_experts, top_k, image_tokens, layers=(1, 3, 5, 7), samples=3, seed=0):
    """`num_experts`: one count for every layer, or one per layer."""
    generator = torch.Generator().manual_seed(seed)
    experts = [num_experts] * len(layers) if isinstance(num_experts, int) else list(num_experts)
    records = RoutingRecords(list(layers), experts, top_k, {"model_type": "synthetic"})
    for i in range(samples):
        records.add(synthetic_sample(f"s{i}", experts, top_k, image_tokens, layers, generator))
    return records


def test_statistics_on_hand_made_routes():
    choice = torch.tensor([0, 0, 1, 3, 3, 3])
    mask = torch.tensor([True, True, True, True, False, False])
    assert plot.expert_shares(choice, mask, 4).tolist() == [0.5, 0.25, 0.0, 0.25]
    assert plot.expert_shares(choice, torch.zeros(6, dtype=torch.bool), 4).tolist() == [0.0] * 4
    assert load_balance(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert load_balance(torch.tensor([9, 0, 0, 0])) == pytest.approx(0.0)
    assert load_balance(torch.tensor([1, 1, 0, 0])) == pytest.approx(0.5)  # log 2 / log 4
    paths = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [1, 1]])
    assert plot.top_paths(paths) == [([0, 1], 0.5), ([2, 3], pytest.approx(1 / 3))]

    records = synthetic_records(4, 2, image_tokens=5, layers=(0, 2), samples=2)
    table = plot.routing_table(records)
    per_sample = 12 + 5 + 9 + 7
    assert table.roles.shape == (2 * per_sample,) and not (table.roles == PADDING).any()
    assert table.first_choice.shape == (2 * per_sample, 2) and table.tokens_per_image == 5
    assert torch.equal(table.first_choice[:per_sample, 1], records.samples[0].expert_index[1][3:, 0])
    groups = table.groups()
    assert int(groups["image"].sum()) == 10 and int(groups["text"].sum()) == 2 * 28
    logits = torch.cat([s.router_logits[0][3:] for s in records.samples])
    probs = torch.softmax(logits, -1)
    expected = -(probs * probs.log()).sum(-1) / torch.log(torch.tensor(4.0))
    torch.testing.assert_close(table.entropy[:, 0], expected)


def image_array(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def has_colour(pixels, rgb, tolerance=8, minimum=50):
    close = (np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tolerance).sum()
    return close >= minimum


@pytest.mark.parametrize("num_experts,top_k,image_tokens,formats", [
    (4, 2, 576, ["png", "svg"]),  # CLIP ViT-L/14 at 336 px, the MoE-LLaVA default
    (8, 1, 729, ["png"]),  # SigLIP so400m at 384 px
    (4, 1, 728, ["png"]),  # SigLIP with the first patch dropped (published MoE-LLaVA SigLIP checkpoints)
    (8, 2, 576, ["png"]),
])
def test_every_figure_is_drawn_for_any_moe_shape(tmp_path, num_experts, top_k, image_tokens, formats):
    records = synthetic_records(num_experts, top_k, image_tokens)
    records.save(str(tmp_path / "routes"))
    plot.main([str(tmp_path / "routes.json"), "--out", str(tmp_path / "figures"), "--formats", *formats])
    expected = {f"{name}.{fmt}" for name in plot.FIGURES for fmt in formats}
    assert {p.name for p in (tmp_path / "figures").iterdir()} == expected
    colours = [tuple(int(255 * c) for c in colour[:3]) for colour in plot.expert_colours(num_experts)]
    for name in plot.FIGURES:
        pixels = image_array(tmp_path / "figures" / f"{name}.png")
        height, width, _ = pixels.shape
        assert 600 <= width <= 3000 and 350 <= height <= 2500, (name, width, height)
        not_white = (pixels < 245).any(axis=-1).mean()
        assert not_white > 0.03, f"{name}.png is (nearly) blank: {not_white:.1%} of its pixels are drawn"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
        if name in ("expert_load", "modality_split"):
            missing = [e for e, rgb in enumerate(colours) if not has_colour(pixels, rgb)]
            assert not missing, f"{name}.png shows no bar of experts {missing}"
        if "svg" in formats:
            root = ElementTree.parse(tmp_path / "figures" / f"{name}.svg").getroot()
            assert root.tag.endswith("svg") and f"{image_tokens} tokens per image" in ElementTree.tostring(
                root, encoding="unicode")


def test_text_only_captures_and_several_files(tmp_path):
    records = synthetic_records(4, 2, image_tokens=0, layers=(0,), samples=2)
    for sample in records.samples:
        sample.prompt_ids = sample.prompt_ids[sample.prompt_ids != IMAGE_TOKEN_INDEX]
    records.save(str(tmp_path / "a"))
    synthetic_records(4, 2, image_tokens=16, layers=(0,), samples=1, seed=1).save(str(tmp_path / "b"))
    pooled = plot.load_captures([str(tmp_path / "a"), str(tmp_path / "b.safetensors")])
    assert [s.sample_id for s in pooled.samples] == ["s0", "s1", "s0"]
    written = plot.plot_records(records, str(tmp_path / "text_only"), formats=["png"])
    assert len(written) == len(plot.FIGURES)
    for path in written:
        assert (image_array(path) < 245).any(axis=-1).mean() > 0.02
    synthetic_records(8, 2, image_tokens=4, layers=(0,), samples=1).save(str(tmp_path / "other"))
    with pytest.raises(RoutingFileError, match="plot the captures of different models separately"):
        plot.load_captures([str(tmp_path / "a"), str(tmp_path / "other")])


def test_layers_with_different_numbers_of_experts(tmp_path):
    records = synthetic_records([4, 8], 2, image_tokens=16, layers=(0, 2))
    table = plot.routing_table(records)
    assert int(table.first_choice[:, 0].max()) < 4 and int(table.first_choice[:, 1].max()) < 8
    written = plot.plot_records(records, str(tmp_path), formats=["svg"])
    assert all("4-8 experts" in open(path).read() for path in written)
