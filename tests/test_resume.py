"""Resuming: a run killed after a checkpoint and started again with the same command continues from that
checkpoint and ends exactly where an uninterrupted run ends (same steps, same batches, same weights).

Two ways of killing: a deterministic reproduction of what a kill leaves behind (the first two tests: the
output folder holds `checkpoint-2`, copied from the uninterrupted run, which wrote the same bytes at that
step, plus a `checkpoint-4` cut short), and real SIGKILLs at ten moments of a stage-2 run, inside
checkpoint writes and deletions included (tests/faults/sitecustomize.py injects them)."""

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
FAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    paths = data.build_dataset(os.path.join(root, "data"), num_train_images=20, num_eval_images=1)
    tokenizer = models.build_tokenizer(os.path.join(root, "tokenizer"))
    tower = models.build_tower(os.path.join(root, "tower"), TOWER)
    llm = models.build_llm(os.path.join(root, "llm"), tokenizer, LLAMA)
    return {"root": root, "paths": paths, "tokenizer": tokenizer, "tower": tower, "llm": llm}


def run(script, out, overrides, fault=None):
    """Run a stage script; returns its exit code and output. `fault`: a MOELLAVA_TEST_FAULT spec."""
    env = script_environment({"LAUNCHER": "python", "OUTPUT_DIR": out, "MAX_STEPS": str(STEPS), "SAVE_STEPS": "2",
                              "SAVE_TOTAL": "10", "LOG_STEPS": "1", "BATCH": "3", "WORKERS": "0", **overrides})
    if fault is not None:
        env["MOELLAVA_TEST_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join([FAULTS_DIR] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", script)], env=env, cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def train(script, out, overrides):
    returncode, log = run(script, out, overrides)
    assert returncode == 0, f"{script} failed:\n{log[-4000:]}"
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
    assert f"Skipping {resumed}/checkpoint-4: not a complete checkpoint: no checkpoint_complete.json" in log
    assert f"Resuming from {resumed}/checkpoint-2" in log
    assert_same_run(whole, resumed, log)
    # Within the last-bit noise DeepSpeed runs may show between processes (see the kill test below).
    a = load_file(os.path.join(whole, "model.safetensors"))
    b = load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), key


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


# --- real kills ----------------------------------------------------------------------------------------------

FAULT_STEPS = 8  # checkpoints every 2 steps, one kept (the recipes' --save_total_limit 1)
# (fault, the checkpoint the rerun must resume from: the newest complete one at the moment of the kill)
FAULTS = [
    ("step@3", 2),                                   # between saves
    ("step@7", 6),
    ("safetensors@checkpoint-4:partial", 2),          # inside the write of checkpoint-4: weights half written,
    ("torch_save@checkpoint-4:1", 2),                 # before DeepSpeed's model states,
    ("torch_save@checkpoint-4:2:partial", 2),         # optimizer states half written,
    ("state_json@checkpoint-4", 2),                   # trainer_state.json written, scheduler.pt not yet
    ("marker@checkpoint-4", 4),                       # between the completion of checkpoint-4 and deleting 2
    ("rmtree@checkpoint-2", 4),                       # deleting checkpoint-2: renamed, nothing removed yet
    ("unlink@checkpoint-2:3", 4),                     # deleting checkpoint-2: some files removed
    ("safetensors@final:partial", 8),                 # the final save after the last checkpoint
]


@pytest.fixture(scope="module")
def stage2_reference(setup):
    paths, root = setup["paths"], setup["root"]
    overrides = {"MODEL": setup["llm"], "IMAGE_TOWER": setup["tower"], "DATA_PATH": paths["stage2"],
                 "IMAGE_FOLDER": paths["image_folder"], "PRETRAIN_ADAPTER": "", "VERSION": "v1",
                 "MAX_STEPS": str(FAULT_STEPS), "SAVE_TOTAL": "1", "BATCH": "2", "LR": "1e-3"}
    reference = os.path.join(root, "stage2_uninterrupted")
    train("train_stage2.sh", reference, overrides)
    return overrides, reference


@pytest.mark.parametrize("fault,resumes_from", FAULTS, ids=[fault for fault, _ in FAULTS])
def test_a_kill_at_any_moment_loses_only_the_steps_since_the_last_complete_checkpoint(
        setup, stage2_reference, fault, resumes_from):
    overrides, reference = stage2_reference
    out = os.path.join(setup["root"], "killed_" + fault.replace("@", "_").replace(":", "_"))
    returncode, log = run("train_stage2.sh", out, overrides, fault=fault)
    assert returncode in (-9, 128 + 9), f"the fault {fault} did not kill the run (exit {returncode}):\n{log[-3000:]}"

    log = train("train_stage2.sh", out, overrides)
    assert f"Resuming from {out}/checkpoint-{resumes_from}" in log
    # Only the steps after that checkpoint were trained again, and the history has every step once.
    assert log.count("{'loss': ") == FAULT_STEPS - resumes_from
    steps, logs = history(out)
    assert steps == FAULT_STEPS and sorted(logs) == list(range(1, FAULT_STEPS + 1))
    _, reference_logs = history(reference)
    for step in logs:
        assert logs[step]["loss"] == reference_logs[step]["loss"], (fault, step)
    # The same weights. Usually bitwise; CPU kernels do not promise identical bits across processes, and once
    # in ~50 runs the last bits differ (6.5e-7 at most, in q/k_proj, where Adam magnifies tiny gradients).
    # Adam moves each weight by about the learning rate (1e-3) a step: a resume from the wrong step or with the
    # wrong optimizer or scheduler state is off by that much (steps trained twice or skipped fail the counts).
    a = load_file(os.path.join(reference, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[key], b[key], rtol=0, atol=1e-5) for key in a), f"weights differ after {fault}"
    # Nothing half-written or half-deleted is left: one complete checkpoint, no trash.
    left = sorted(name for name in os.listdir(out) if name.startswith(("checkpoint-", ".trash-")))
    assert left == [f"checkpoint-{FAULT_STEPS}"]
    assert os.path.isfile(os.path.join(out, left[0], "checkpoint_complete.json"))
