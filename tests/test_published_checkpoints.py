"""Checkpoints in the published MoE-LLaVA layout (tests/published_layout.py: the original's key names and
config fields, sizes shrunk) load and train here unchanged: Phi-2 / Qwen / StableLM, CLIP-336-like and
SigLIP-384-like towers, the tower stored or not, sharded safetensors or pytorch_model.bin. Each variant loads
bit-exact through `load_pretrained_model`, answers in the CLI and continues stage-3 training (its tower,
when not stored, taken from the tower path of its config); the layout rules of
moellava/model/checkpoint_layouts.py (Phi head, SigLIP pooling head, feature selection, tower source) are
pinned on the way."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from moellava.conversation import get_conv_template
from moellava.demo import data
from moellava.demo.run import REPO_DIR, script_environment
from moellava.model.builder import load_pretrained_model
from moellava.model.checkpoint_layouts import ORIGINAL_CONFIG_FIELDS, SIGLIP_POOLING_HEAD, vision_drop_first_token
from moellava.model.multimodal_encoder.builder import count_image_tokens
from moellava.serve import cli
from moellava.tokenization import FAMILIES, doctor, load_tokenizer

import published_layout
import tiny_llava

# Each family with both towers, both tower states and both weight formats.
VARIANTS = [
    ("phi", "siglip", True, "sharded-safetensors"),
    ("phi", "clip", False, "pytorch_model.bin"),
    ("qwen", "clip", True, "pytorch_model.bin"),
    ("qwen", "siglip", False, "sharded-safetensors"),
    ("stablelm", "clip", True, "sharded-safetensors"),
    ("stablelm", "siglip", False, "pytorch_model.bin"),
]
# Vocabularies past the toy tokenizers (720 / 552 / 545 ids with the family rules), as the official ones are.
VOCAB = {"qwen": 768, "phi": 576, "stablelm": 576}
PATCHES = (tiny_llava.TINY_TOWER["image_size"] // tiny_llava.TINY_TOWER["patch_size"]) ** 2  # 16
QUESTION = data.COLOUR_QUESTIONS[0]


def variant_id(variant):
    family, tower, stored, weights = variant
    return f"{family}-{tower}-{'tower' if stored else 'no_tower'}-{weights}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("published_shared")
    return {
        "clip": tiny_llava.build_tiny_clip_tower(root / "clip-vit-large-patch14-336"),
        "siglip": published_layout.write_official_siglip_folder(root / "siglip-so400m-patch14-384"),
        "paths": data.build_dataset(str(root / "data"), num_train_images=4, num_eval_images=1),
    }


@pytest.fixture(scope="module", params=VARIANTS, ids=variant_id)
def published(request, shared, toy_tokenizer_dir, tmp_path_factory):
    family, tower_kind, tower_stored, weights = request.param
    folder = tmp_path_factory.mktemp(variant_id(request.param)) / f"MoE-LLaVA-{family}-4e"
    tokenizer_dir = toy_tokenizer_dir(family)
    tensors = published_layout.write_published_checkpoint(
        folder, family, tower_kind=tower_kind, tower_dir=shared[tower_kind], tower_stored=tower_stored,
        weights=weights, tokenizer_dir=tokenizer_dir, vocab_size=VOCAB[family],
        pad_token_id=load_tokenizer(tokenizer_dir).pad_token_id, seed=request.param_index + 3)
    return {"family": family, "tower_kind": tower_kind, "tower_stored": tower_stored, "folder": str(folder),
            "tensors": tensors, "tower_dir": shared[tower_kind], "paths": shared["paths"]}


def tower_folder_weights(tower_kind, tower_dir):
    """The vision weights of a tower folder, as the LLaVA model names them under its tower."""
    if tower_kind == "clip":
        state = CLIPVisionModel.from_pretrained(tower_dir).state_dict()
    else:  # the official two-tower SigLIP folder: the vision tower without its pooling head
        state = {key: value for key, value in load_file(os.path.join(tower_dir, "model.safetensors")).items()
                 if key.startswith("vision_model.") and not key.startswith("vision_model.head.")}
    return state


def test_every_stored_tensor_loads_bit_exact(published, caplog):
    caplog.set_level("INFO", logger="moellava")
    _, model, processor, _ = load_pretrained_model(published["folder"])
    state, tensors = model.state_dict(), published["tensors"]
    head = {key for key in tensors if SIGLIP_POOLING_HEAD.search(key)}
    assert bool(head) == (published["tower_kind"] == "siglip" and published["tower_stored"])
    assert set(tensors) - set(state) == head
    assert [key for key in set(tensors) - head if not torch.equal(state[key], tensors[key])] == []
    tower_prefix = next(key for key in state if ".image_tower.image_tower." in key).split("image_tower.")[0]
    tower_state = {key[len(tower_prefix + "image_tower.image_tower."):]: value for key, value in state.items()
                   if key.startswith(tower_prefix + "image_tower.image_tower.")}
    expected_tower = tower_folder_weights(published["tower_kind"], published["tower_dir"])
    if published["tower_stored"]:
        assert not any(torch.equal(tower_state[key], value) for key, value in expected_tower.items())
    else:  # loaded from the tower the config names
        assert sorted(tower_state) == sorted(expected_tower)
        assert all(torch.equal(tower_state[key], value) for key, value in expected_tower.items())
    messages = [record.getMessage() for record in caplog.records]
    assert sum("SigLIP's attention-pooling head" in m for m in messages) == int(bool(head))

    # Phi head: built as stored, without a bias (the original's LLaVA-Phi has none).
    if published["family"] == "phi":
        assert model.lm_head.bias is None and model.config.lm_head_bias is False
    # Feature selection: the original's rule for its own checkpoints (SigLIP: the first patch dropped).
    tokens = PATCHES - 1 if published["tower_kind"] == "siglip" else PATCHES
    assert model.config.mm_vision_drop_first_token is True
    with torch.no_grad():
        features = model.encode_images(tiny_llava.random_pixels(1))
    assert model.get_image_tower().num_tokens == tokens == features.shape[1]
    assert processor["video"] is None and processor["image"] is model.get_image_tower().image_processor


def test_the_cli_answers(published, capsys):
    image = os.path.join(published["paths"]["image_folder"], "eval_00000.png")
    cli.main(["--model-path", published["folder"], "--image-file", image, "--query", QUESTION,
              "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"])
    answer = capsys.readouterr().out
    tokenizer, model, processor, _ = load_pretrained_model(published["folder"], None, None, False, False,
                                                           device="cpu")
    conv = get_conv_template(FAMILIES[published["family"]].version)
    session = cli.ChatSession(tokenizer, model, processor["image"], Image.open(image).convert("RGB"), conv,
                              temperature=0, max_new_tokens=4)
    expected = session.ask(QUESTION)
    assert expected.strip() and answer == expected + "\n"


@pytest.mark.slow
def test_stage3_training_continues(published, tmp_path):
    """The original's stage-3 flags (scripts/v1/<model>/finetune_moe.sh) on the published checkpoint, two
    steps on CPU (bf16/tf32 off), without --image_tower: a tower the checkpoint does not store comes from its
    config's path."""
    family, out = published["family"], tmp_path / "finetune-moe"
    paths = published["paths"]
    command = [
        sys.executable, os.path.join(REPO_DIR, "moellava", "train", "train_mem.py"),
        "--moe_enable", "True", "--num_experts", "4", "--top_k_experts", "2", "--capacity_factor", "1.5",
        "--moe_mode", "sparse", "--use_residual", "False", "--router_aux_loss_coef", "0.01",
        "--train_modules", *FAMILIES[family].train_modules,
        "--model_name_or_path", published["folder"], "--version", FAMILIES[family].version,
        "--data_path", paths["stage3"], "--image_folder", paths["image_folder"], "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True", "--bf16", "False", "--tf32", "False", "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--lazy_preprocess", "True", "--report_to", "none",
        "--dataloader_num_workers", "0", "--data_check_workers", "0", "--disable_tqdm", "True",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=script_environment({}), cwd=REPO_DIR,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["lm_loss"] for entry in log if "lm_loss" in entry]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)

    saved = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert not any(SIGLIP_POOLING_HEAD.search(key) for key in saved)
    assert config["mm_vision_drop_first_token"] is True  # the checkpoint's token selection carries on
    assert {key: config[key] for key in ORIGINAL_CONFIG_FIELDS} == ORIGINAL_CONFIG_FIELDS
    if family == "phi":
        assert config["lm_head_bias"] is False and "lm_head.bias" not in saved
    tower_prefix = ("transformer." if family == "qwen" else "model.") + "image_tower.image_tower."
    expected_tower = tower_folder_weights(published["tower_kind"], published["tower_dir"])
    for key, value in expected_tower.items():  # the tower is frozen: saved as it was loaded
        reference = value if not published["tower_stored"] else published["tensors"][tower_prefix + key]
        assert torch.equal(saved[tower_prefix + key], reference), key
    # The experts trained on from the published ones.
    experts = [key for key in published["tensors"] if ".deepspeed_experts." in key]
    assert any(not torch.equal(saved[key], published["tensors"][key]) for key in experts)


def test_a_tower_not_stored_comes_from_its_path_or_fails_naming_it(shared, toy_tokenizer_dir, tmp_path):
    from moellava.train.train import load_model, parse_arguments, train

    folder, missing = tmp_path / "MoE-LLaVA-Qwen", str(tmp_path / "no" / "clip-vit-large-patch14-336")
    tokenizer_dir = toy_tokenizer_dir("qwen")
    published_layout.write_published_checkpoint(
        folder, "qwen", tower_kind="clip", tower_dir=missing, tower_stored=False, weights="pytorch_model.bin",
        tokenizer_dir=tokenizer_dir, vocab_size=VOCAB["qwen"], pad_token_id=load_tokenizer(tokenizer_dir).pad_token_id)
    message = rf"{folder} does not store the image tower's weights: they are read from the tower it names, '{missing}'"
    with pytest.raises(ValueError, match=message):
        load_pretrained_model(str(folder))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        train(["--model_name_or_path", str(folder), "--moe_enable", "True", "--data_path", shared["paths"]["stage3"],
               "--image_folder", shared["paths"]["image_folder"], "--output_dir", str(out), "--report_to", "none"])
    assert not (out / "trainer_state.json").exists()

    # --image_tower naming a local copy of the tower: training takes the tower from there.
    model_args, _, training_args = parse_arguments([
        "--model_name_or_path", str(folder), "--moe_enable", "True", "--data_path", shared["paths"]["stage3"],
        "--output_dir", str(out), "--report_to", "none", "--image_tower", shared["clip"]])
    model = load_model(model_args, training_args)
    assert model.config.mm_image_tower == shared["clip"] == model.get_image_tower().name
    tower = model.get_image_tower().image_tower.state_dict()
    assert all(torch.equal(tower[key], value) for key, value in tower_folder_weights("clip", shared["clip"]).items())


OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "official"


def test_siglip_384_gives_728_tokens_to_the_original_checkpoints_and_729_to_ours():
    vision_file = OFFICIAL / "siglip-so400m-patch14-384" / "vision_config_saved.json"
    if not vision_file.is_file():
        pytest.skip(f"{vision_file} is not available (../shared beside the repository)")
    vision = json.loads(vision_file.read_text())
    name = "google/siglip-so400m-patch14-384"
    original = SimpleNamespace(mm_image_tower=name, mm_vision_select_feature="patch")  # names the tower only
    ours = SimpleNamespace(mm_image_tower=name, mm_vision_select_feature="patch", mm_image_tower_config=vision)
    assert count_image_tokens(name, "patch", vision, vision_drop_first_token(original)) == 728
    assert count_image_tokens(name, "patch", vision, vision_drop_first_token(ours)) == 729
    clip = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
    for config in (original, ours):  # CLIP's token 0 is its CLS token: 576 patches either way
        assert count_image_tokens("openai/clip-vit-large-patch14-336", "patch", clip,
                                  vision_drop_first_token(config)) == 576
    assert count_image_tokens("openai/clip-vit-large-patch14-336", "cls_patch", clip,
                              vision_drop_first_token(SimpleNamespace(mm_vision_select_feature="cls_patch"))) == 577


def test_a_siglip_model_trained_here_keeps_every_patch(shared, tmp_path):
    tokenizer = tiny_llava.build_tiny_llama_tokenizer(tmp_path / "tokenizer")
    folder = tiny_llava.build_tiny_llava_llama(tmp_path / "llava-siglip", tokenizer, shared["siglip"])
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["mm_vision_drop_first_token"] is False

    def tokens(config_dict):
        (Path(folder) / "config.json").write_text(json.dumps(config_dict))
        _, model, _, _ = load_pretrained_model(folder)
        with torch.no_grad():
            count = model.encode_images(tiny_llava.random_pixels(1)).shape[1]
        args = doctor.parse_args(["--model-path", folder, "--version", "v1"])
        assert doctor.tokens_per_image(args, config_dict) == model.get_image_tower().num_tokens == count
        return count

    assert tokens(config) == PATCHES
    older = {key: value for key, value in config.items() if key != "mm_vision_drop_first_token"}
    assert tokens(older) == PATCHES  # written here (it carries the tower's config): all patches
    original = {key: value for key, value in older.items()
                if key not in ("mm_image_tower_config", "mm_image_processor_config")}
    assert tokens(original) == PATCHES - 1  # the original's rule: token 0 dropped

    clip = tiny_llava.tiny_llava_llama(tokenizer, shared["clip"]).get_image_tower()
    with pytest.raises(ValueError, match="mm_vision_drop_first_token=False contradicts mm_vision_select_feature='patch'"):
        clip.set_feature_selection(-2, "patch", drop_first_token=False)
