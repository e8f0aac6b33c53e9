"""LLaVATrainer pieces: the length/modality grouped sampler, optimizer groups, loss logging, arguments."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moellava.train.arguments import DataArguments, ModelArguments, TrainingArguments, check_arguments
from moellava.train.llava_trainer import (
    LengthGroupedSampler,
    get_length_grouped_indices,
    get_modality_length_grouped_indices,
    optimizer_param_groups,
    split_to_even_chunks,
)
from moellava.train.train import parse_arguments


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_split_to_even_chunks_balances_lengths():
    lengths = [10, 9, 8, 7, 3, 2, 1, 1]
    chunks = split_to_even_chunks(list(range(8)), lengths, 2)
    # Greedy, longest first, each to the currently shorter chunk, 4 per chunk.
    assert chunks == [[0, 3, 4, 7], [1, 2, 5, 6]]
    assert [sum(lengths[i] for i in chunk) for chunk in chunks] == [21, 20]
    # Counts that do not divide: strided.
    assert split_to_even_chunks([5, 6, 7], lengths, 2) == [[5, 7], [6]]


def test_length_grouped_indices_sort_each_megabatch():
    lengths = [5, 50, 3, 40, 7, 60, 1, 30]
    indices = get_length_grouped_indices(lengths, batch_size=2, world_size=2, generator=generator())
    assert sorted(indices) == list(range(8))
    for start in range(0, 8, 4):
        megabatch = indices[start:start + 4]
        ranked = sorted(megabatch, key=lambda i: -lengths[i])
        # The longest goes to rank 0, the next to rank 1, ...: batches of similar length.
        assert megabatch[0] == ranked[0] and megabatch[2] == ranked[1]
    assert indices == get_length_grouped_indices(lengths, 2, 2, generator())


def test_modality_grouping_keeps_modalities_apart():
    lengths = [10, -4, 12, -5, 11, -6, 9, -7, 13, -8, 14]  # 6 with images, 5 text-only
    indices = get_modality_length_grouped_indices(lengths, batch_size=2, world_size=1, generator=generator(3))
    assert sorted(indices) == list(range(len(lengths)))
    megabatches = [indices[i:i + 2] for i in range(0, len(indices), 2)]
    # 3 image and 2 text megabatches, then the leftover (one text sample) sorted by index.
    assert all(len({lengths[i] > 0 for i in mb}) == 1 for mb in megabatches[:-1])
    assert sorted(lengths[mb[0]] > 0 for mb in megabatches[:-1]) == [False, False, True, True, True]
    assert len(megabatches[-1]) == 1 and lengths[megabatches[-1][0]] < 0
    assert indices == get_modality_length_grouped_indices(lengths, 2, 1, generator(3))
    assert indices != get_modality_length_grouped_indices(lengths, 2, 1, generator(4))
    with pytest.raises(ValueError, match="must be non-zero"):
        get_modality_length_grouped_indices([3, 0, -2], 2, 1, generator())


def test_sampler_order_depends_only_on_seed_and_epoch():
    lengths = [3, -2, 5, -4, 6, -1, 8, -9]
    first = LengthGroupedSampler(2, 1, lengths, seed=7)
    epochs = [list(first) for _ in range(3)]
    assert epochs[0] != epochs[1]
    again = LengthGroupedSampler(2, 1, lengths, seed=7)
    assert [list(again) for _ in range(3)] == epochs
    assert len(first) == 8


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.mm_projector = nn.Linear(4, 4)


def group_names(groups):
    return {group["name"]: [id(p) for p in group["params"]] for group in groups}


def test_param_groups_decay_projector_lr_and_no_empty_group():
    model = Tiny()
    groups = optimizer_param_groups(model, weight_decay=0.1, mm_projector_lr=2e-5)
    names = group_names(groups)
    assert names == {
        "decay_parameters": [id(model.body.weight)],
        "no_decay_parameters": [id(model.body.bias), id(model.norm.weight), id(model.norm.bias)],
        "decay_proj_parameters": [id(model.mm_projector.weight)],
        "no_decay_proj_parameters": [id(model.mm_projector.bias)],
    }
    by_name = {group["name"]: group for group in groups}
    assert by_name["decay_parameters"]["weight_decay"] == 0.1 and "lr" not in by_name["decay_parameters"]
    assert by_name["decay_proj_parameters"]["lr"] == 2e-5
    assert by_name["no_decay_proj_parameters"]["weight_decay"] == 0.0
    # Without a projector lr, the projector joins the other groups.
    assert set(group_names(optimizer_param_groups(model, 0.0, None))) == {"decay_parameters", "no_decay_parameters"}
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="No parameter requires grad"):
        optimizer_param_groups(model, 0.0, None)


def test_deepspeed_moe_params_get_their_own_groups():
    model = Tiny()
    model.norm.requires_grad_(False)
    model.body.bias.requires_grad_(False)
    model.mm_projector.bias.requires_grad_(False)
    # What DeepSpeed's Experts does to expert parameters.
    for param in model.body.parameters():
        param.allreduce = False
        param.group_name = "ep_size_2"
    groups = optimizer_param_groups(model, weight_decay=0.0, mm_projector_lr=None)
    assert [(g["name"], g.get("moe", False), len(g["params"])) for g in groups] == [
        ("decay_parameters", False, 1),  # the projector weight; the emptied groups are gone
        ("ep_size_2", True, 1),
    ]
    assert groups[1]["params"][0] is model.body.weight


def parse(*argv):
    return parse_arguments(["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "/tmp/x",
                            "--report_to", "none", *argv])


def test_arguments_defaults_and_choices():
    model_args, data_args, training_args = parse()
    assert model_args.num_experts == [4] and model_args.moe_mode == "sparse" and model_args.top_k_experts == 2
    assert model_args.version is None and model_args.image_projector_type is None
    assert data_args.image_aspect_ratio == "square" and data_args.max_skipped_fraction == 0.01
    assert training_args.save_safetensors and training_args.model_max_length == 512
    model_args, _, _ = parse("--num_experts", "4", "2", "--top_k_experts", "1", "--moe_layers_idx", "0", "3")
    assert model_args.num_experts == [4, 2] and model_args.top_k_experts == 1 and model_args.moe_layers_idx == [0, 3]
    for bad in (["--moe_mode", "every_other"], ["--top_k_experts", "3"], ["--image_aspect_ratio", "crop"],
                ["--moe_backend", "tutel"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_argument_conflicts_are_refused_with_the_fix(tmp_path):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    model = ModelArguments(model_name_or_path="m", moe_enable=True)
    data = DataArguments(data_path=["d.json"])
    training = SimpleNamespace(deepspeed=str(zero3), freeze_mm_mlp_adapter=False, model_max_length=8)
    with pytest.raises(ValueError, match="cannot run under ZeRO-3.*Use --deepspeed scripts/zero2.json"):
        check_arguments(model, data, training)
    training.deepspeed = None
    with pytest.raises(ValueError, match="--ep_size 2 needs the DeepSpeed engine"):
        check_arguments(ModelArguments(model_name_or_path="m", ep_size=2), data, training)
    training.deepspeed = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="--drop_tokens True.*all-to-all fails"):
        check_arguments(ModelArguments(model_name_or_path="m", ep_size=2, drop_tokens=True), data, training)
    with pytest.raises(ValueError, match="exclude each other"):
        check_arguments(ModelArguments(model_name_or_path="m", moe_enable=True, tune_mm_mlp_adapter=True), data,
                        training)
    with pytest.raises(ValueError, match="--data_path is required"):
        check_arguments(ModelArguments(model_name_or_path="m"), DataArguments(), training)
    with pytest.raises(ValueError, match="max_skipped_fraction must be in"):
        DataArguments(max_skipped_fraction=1.5)
    assert isinstance(parse()[2], TrainingArguments)


def test_model_class_follows_model_type_and_stage():
    from moellava.train.train import model_class_for

    assert model_class_for("llama", moe=False).__name__ == "LlavaLlamaForCausalLM"
    assert model_class_for("llava_llama", moe=True).__name__ == "MoELLaVALlamaForCausalLM"
    assert model_class_for("phi", moe=False).__name__ == "LlavaPhiForCausalLM"
    assert model_class_for("llava_qwen", moe=True).__name__ == "MoELLaVAQWenForCausalLM"
    assert model_class_for("stablelm_epoch", moe=True).__name__ == "MoELLaVAStablelmForCausalLM"
    assert model_class_for("mistral", moe=False).__name__ == "LlavaMistralForCausalLM"
    with pytest.raises(ValueError, match="model_type 'gpt2' does not belong to a known tokenizer family"):
        model_class_for("gpt2", moe=False)


def test_a_stage1_output_is_not_taken_for_a_model(tmp_path):
    from moellava.train.train import train

    (tmp_path / "config.json").write_text('{"model_type": "llava_llama"}')
    torch.save({}, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"is a Stage-1 output \(only mm_projector.bin\): pass the base LLM"):
        train(["--model_name_or_path", str(tmp_path), "--data_path", "d.json", "--output_dir", str(tmp_path / "o"),
               "--report_to", "none"])


@pytest.mark.parametrize("backend, deepspeed, ep_size, expected", [
    ("auto", None, 1, "native"),                 # one device, or torchrun + DDP
    ("auto", "scripts/zero2.json", 1, "native"),  # the DeepSpeed engine without expert parallelism
    ("auto", "scripts/zero2.json", 2, "deepspeed"),  # expert parallelism needs DeepSpeed's all-to-all
    ("deepspeed", "scripts/zero2.json", 1, "deepspeed"),
    ("native", "scripts/zero2.json", 1, "native"),
])
def test_auto_moe_backend_is_native_unless_experts_are_parallel(backend, deepspeed, ep_size, expected):
    from moellava.train.train import resolve_moe_backend

    assert resolve_moe_backend(backend, SimpleNamespace(deepspeed=deepspeed), ep_size) == expected
