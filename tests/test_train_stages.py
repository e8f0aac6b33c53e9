"""Stage 1 -> 2 -> 3 on a tiny Llama LLaVA through the real entry point: `scripts/train_stage{1,2,3}.sh`
running `moellava/train/train.py` (one process, DeepSpeed ZeRO-2 on CPU), a few steps each."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from moellava.demo import data, models
from moellava.demo.run import REPO_DIR, script_environment

pytestmark = pytest.mark.slow

TOWER = models.TowerSize(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2)
LLAMA = models.LlamaSize(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=256)


def run_script(name, overrides, log_path):
    env = script_environment({"LAUNCHER": "python", "BATCH": "4", "LR": "2e-3", "LOG_STEPS": "1",
                              "WORKERS": "0", **overrides})
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", name)], env=env, cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=300)
    with open(log_path, "w") as f:
        f.write(result.stdout + result.stderr)
    assert result.returncode == 0, f"{name} failed:\n{(result.stdout + result.stderr)[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stages"))
    paths = data.build_dataset(os.path.join(root, "data"), num_train_images=24, num_eval_images=1)
    tokenizer = models.build_tokenizer(os.path.join(root, "tokenizer"))
    tower = models.build_tower(os.path.join(root, "tower"), TOWER)
    llm = models.build_llm(os.path.join(root, "llm"), tokenizer, LLAMA)
    dirs = {i: os.path.join(root, f"stage{i}") for i in (1, 2, 3)}
    common = {"IMAGE_TOWER": tower, "IMAGE_FOLDER": paths["image_folder"], "SAVE_STEPS": "3"}
    logs = {}
    logs[1] = run_script("train_stage1.sh", {**common, "MODEL": llm, "DATA_PATH": paths["stage1"],
                                             "OUTPUT_DIR": dirs[1], "MAX_STEPS": "4"}, os.path.join(root, "s1.log"))
    # Stage 2 trains one epoch over data with bad samples mixed in, skipping and counting them.
    bad = os.path.join(root, "data", "bad.json")
    with open(os.path.join(paths["image_folder"], "corrupt.png"), "wb") as f:
        f.write(b"not an image")
    with open(bad, "w") as f:
        json.dump([
            {"id": "gone", "image": "missing.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "A circle."}]},
            {"id": "broken", "image": "corrupt.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "A square."}]},
        ], f)
    logs[2] = run_script("train_stage2.sh", {**common, "MODEL": llm, "DATA_PATH": f"{paths['stage2']} {bad}",
                                             "OUTPUT_DIR": dirs[2], "EPOCHS": "1", "VERSION": "v1",
                                             "PRETRAIN_ADAPTER": os.path.join(dirs[1], "mm_projector.bin"),
                                             "EXTRA_ARGS": "--skip_bad_samples True --max_skipped_fraction 0.1"},
                         os.path.join(root, "s2.log"))
    # Stage 3 takes the family defaults: --version v1 and --train_modules gate_proj up_proj down_proj wg.
    logs[3] = run_script("train_stage3.sh", {**common, "MODEL": dirs[2], "DATA_PATH": paths["stage3"],
                                             "OUTPUT_DIR": dirs[3], "MAX_STEPS": "4", "GRAD_ACC": "2"},
                         os.path.join(root, "s3.log"))
    return {"dirs": dirs, "llm": llm, "tower": tower, "paths": paths, "logs": logs}


def log_history(folder):
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return [entry for entry in json.load(f)["log_history"] if "loss" in entry]


def test_scripts_print_the_command_they_run(stages):
    for number, log in stages["logs"].items():
        command = next(line for line in log.splitlines() if line.startswith("+ python "))
        assert f"{REPO_DIR}/moellava/train/train.py" in command and "--deepspeed" in command
        assert f"--output_dir {stages['dirs'][number]}" in command


def test_stage1_trains_and_saves_only_the_projector(stages):
    out = stages["dirs"][1]
    assert sorted(os.listdir(out)) == ["checkpoint-3", "config.json", "data_check.json", "mm_projector.bin",
                                       "trainer_state.json"]
    projector = torch.load(os.path.join(out, "mm_projector.bin"), weights_only=True)
    assert sorted(projector) == ["model.mm_projector.image_spatial_proj.0.bias",
                                 "model.mm_projector.image_spatial_proj.0.weight",
                                 "model.mm_projector.image_spatial_proj.2.bias",
                                 "model.mm_projector.image_spatial_proj.2.weight"]
    checkpoint = os.path.join(out, "checkpoint-3")
    files = set(os.listdir(checkpoint))
    assert {"mm_projector.bin", "scheduler.pt", "trainer_state.json", "rng_state.pth", "checkpoint_complete.json"} <= files
    assert not any(name.endswith((".safetensors", "pytorch_model.bin")) for name in files)
    history = log_history(out)
    assert len(history) == 4 and history[-1]["lm_loss"] < history[0]["lm_loss"]


def test_stage2_trains_llm_and_projector_but_not_the_tower(stages):
    out = stages["dirs"][2]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llava_llama" and config["conv_template"] == "v1"
    assert config["image_aspect_ratio"] == "pad" and config["tokenizer_model_max_length"] == 256
    assert config["use_cache"] is True
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))
    weights = load_file(os.path.join(out, "model.safetensors"))
    base = load_file(os.path.join(stages["llm"], "model.safetensors"))
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(weights["lm_head.weight"], base["lm_head.weight"])
    tower = torch.load(os.path.join(stages["tower"], "pytorch_model.bin"), weights_only=True)
    for key, value in tower.items():
        if key.startswith("vision_model."):
            assert torch.equal(weights[f"model.image_tower.image_tower.{key}"], value), key
    history = log_history(out)
    assert len(history) == 7 and history[-1]["lm_loss"] < history[0]["lm_loss"]  # 26 + 2 samples, batch 4


def test_stage2_skips_and_reports_bad_samples(stages):
    out = stages["dirs"][2]
    with open(os.path.join(out, "skipped_samples.json")) as f:
        report = json.load(f)
    assert report["total_samples"] == 28 and report["skipped"] == 2
    assert report["by_reason"] == {"corrupt_image": 1, "missing_image": 1}
    assert sorted(sample["sample_id"] for sample in report["samples"]) == ["broken", "gone"]
    assert "Bad samples: skipped 2 of 28 samples: {'corrupt_image': 1, 'missing_image': 1}" in stages["logs"][2]


def test_stage3_upcycles_trains_experts_and_logs_losses_apart(stages):
    out, previous = stages["dirs"][3], stages["dirs"][2]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    moe = config["moe"]
    assert config["model_type"] == "moe_llava_llama"
    assert moe["moe_layers_idx"] == [0, 2] and moe["num_experts"] == [4, 4] and moe["top_k_experts"] == 2
    assert moe["capacity_factor"] == 1.5 and moe["train_modules"] == ["gate_proj", "up_proj", "down_proj", "wg"]
    weights = load_file(os.path.join(out, "model.safetensors"))
    dense = load_file(os.path.join(previous, "model.safetensors"))
    # Attention is frozen; experts started as copies of the dense FFN and trained apart.
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(weights[key], dense[key]), key
    expert = "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.{}.up_proj.weight"
    copies = [weights[expert.format(j)] for j in range(4)]
    assert not all(torch.equal(copies[0], other) for other in copies[1:])
    assert not any(torch.equal(copy, dense["model.layers.0.mlp.up_proj.weight"]) for copy in copies)
    assert not torch.equal(weights["model.layers.1.mlp.up_proj.weight"], dense["model.layers.1.mlp.up_proj.weight"])
    history = log_history(out)
    assert len(history) == 4
    for entry in history:
        layers = [entry["aux_loss_moe_layer_0"], entry["aux_loss_moe_layer_1"]]
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + entry["aux_loss"], abs=2e-4)
        assert entry["aux_loss"] == pytest.approx(0.01 * sum(layers), abs=2e-4)
        assert entry["aux_loss_per_layer"] == pytest.approx(sum(layers) / 2, abs=2e-4)
        assert 0.9 < entry["aux_loss_per_layer"] < 2.0  # about 1 when balanced, per layer


def test_final_checkpoint_loads_and_answers(stages):
    from PIL import Image

    from moellava.conversation import get_conv_template
    from moellava.model.builder import load_pretrained_model
    from moellava.serve.cli import ChatSession

    tokenizer, model, processor, _ = load_pretrained_model(stages["dirs"][3])
    assert type(model).__name__ == "MoELLaVALlamaForCausalLM"
    with open(stages["paths"]["eval"]) as f:
        item = json.load(f)[0]
    image = Image.open(os.path.join(stages["paths"]["image_folder"], item["image"])).convert("RGB")
    session = ChatSession(tokenizer, model, processor["image"], image, get_conv_template(model.config.conv_template),
                          temperature=0, max_new_tokens=4)
    reply = session.ask(data.COLOUR_QUESTIONS[0])
    assert isinstance(reply, str) and session.conv.messages[-1][1] == reply
