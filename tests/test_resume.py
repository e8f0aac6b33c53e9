"""Resuming: a run killed after a checkpoint and started again with the same command continues from that
checkpoint and ends exactly where an uninterrupted run ends (same steps, same batches, same weights).

The kill is reproduced deterministically: the interrupted run's output folder holds what a run killed
right after writing `checkpoint-2` leaves behind (that checkpoint, copied from the uninterrupted run, which
wrote the same bytes at that step), plus a `checkpoint-4` cut short while being written."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import tiny_llava
from moellava.demo import data, models
from moellava.demo.run import REPO_DIR, script_environment

pytestmark = pytest.mark.slow

TOWER = models.TowerSize(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2)
LLAMA = models.LlamaSize(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=256)
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    paths = data.build_dataset(os.path.join(root, "data"), num_train_images=20, num_eval_images=1)
    tokenizer = models.build_tokenizer(os.path.join(root, "tokenizer"))
    tower = models.build_tower(os.path.join(root, "tower"), TOWER)
    llm = models.build_llm(os.path.join(root, "llm"), tokenizer, LLAMA)
    return {"root": root, "paths": paths, "tokenizer": tokenizer, "tower": tower, "llm": llm}


def train(script, out, overrides):
    env = script_environment({"LAUNCHER": "python", "OUTPUT_DIR": out, "MAX_STEPS": str(STEPS), "SAVE_STEPS": "2",
                              "SAVE_TOTAL": "10", "LOG_STEPS": "1", "BATCH": "3", "WORKERS": "0", **overrides})
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", script)], env=env, cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} failed:\n{log[-4000:]}"
    return log


def interrupted_copy(uninterrupted, out):
    """The folder a run killed during its second save leaves: checkpoint-2 whole, checkpoint-4 partial."""
    os.makedirs(out)
    shutil.copytree(os.path.join(uninterrupted, "checkpoint-2"), os.path.join(out, "checkpoint-2"))
    partial = os.path.join(out, "checkpoint-4")
    os.makedirs(partial)
    with open(os.path.join(partial, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 64)


def history(out):
    with open(os.path.join(out, "trainer_state.json")) as f:
        state = json.load(f)
    return state["global_step"], {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def assert_same_run(uninterrupted, resumed, resumed_log):
    steps_a, logs_a = history(uninterrupted)
    steps_b, logs_b = history(resumed)
    assert steps_a == steps_b == STEPS
    # The resumed run trained the remaining steps only; its history continues the checkpoint's.
    assert resumed_log.count("{'loss': ") == STEPS - 2
    assert sorted(logs_b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "lm_loss", "learning_rate", "epoch"):
            assert logs_b[step][key] == pytest.approx(logs_a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_stage3_deepspeed_resume_matches_an_uninterrupted_run(setup):
    paths, root = setup["paths"], setup["root"]
    stage2 = tiny_llava.build_tiny_llava_llama(os.path.join(root, "stage2"), setup["tokenizer"], setup["tower"])
    overrides = {"MODEL": stage2, "DATA_PATH": paths["stage3"], "IMAGE_FOLDER": paths["image_folder"],
                 "GRAD_ACC": "2", "LR": "1e-3"}
    whole, resumed = os.path.join(root, "stage3_whole"), os.path.join(root, "stage3_resumed")
    train("train_stage3.sh", whole, overrides)
    interrupted_copy(whole, resumed)
    log = train("train_stage3.sh", resumed, overrides)
    assert f"Skipping {resumed}/checkpoint-4: it was not completely written" in log
    assert f"Resuming from {resumed}/checkpoint-2" in log
    assert_same_run(whole, resumed, log)
    a = load_file(os.path.join(whole, "model.safetensors"))
    b = load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_stage1_projector_only_checkpoints_resume_without_deepspeed(setup):
    paths, root = setup["paths"], setup["root"]
    overrides = {"MODEL": setup["llm"], "IMAGE_TOWER": setup["tower"], "DATA_PATH": paths["stage1"],
                 "IMAGE_FOLDER": paths["image_folder"], "DEEPSPEED_CONFIG": "", "LR": "2e-3"}
    whole, resumed = os.path.join(root, "stage1_whole"), os.path.join(root, "stage1_resumed")
    train("train_stage1.sh", whole, overrides)
    checkpoint = set(os.listdir(os.path.join(whole, "checkpoint-2")))
    assert {"mm_projector.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= checkpoint
    interrupted_copy(whole, resumed)
    log = train("train_stage1.sh", resumed, overrides)
    assert f"Resuming from {resumed}/checkpoint-2" in log
    assert_same_run(whole, resumed, log)
    a = torch.load(os.path.join(whole, "mm_projector.bin"), weights_only=True)
    b = torch.load(os.path.join(resumed, "mm_projector.bin"), weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
