"""Stage 3 with two processes through `scripts/train_stage3.sh` on CPU (gloo): with the `deepspeed` launcher and
expert parallelism (ep_size=2: each rank holds 2 of the 4 experts), whose checkpoint, written by rank 0, must
hold all experts under their global indices and load in one process; with the `deepspeed` launcher at
ep_size 1 (the native dispatcher under the DeepSpeed engine); and with `torchrun` and plain DDP."""

import glob
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
STEPS = 3
EXPERT = "model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{expert}.{name}"


def finished(out: str) -> bool:
    state = os.path.join(out, "trainer_state.json")
    if not (os.path.isfile(state) and os.path.isfile(os.path.join(out, "model.safetensors"))):
        return False
    with open(state) as f:
        return json.load(f)["global_step"] == STEPS


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("distributed"))
    paths = data.build_dataset(os.path.join(root, "data"), num_train_images=16, num_eval_images=1)
    tokenizer = models.build_tokenizer(os.path.join(root, "tokenizer"))
    tower = tiny_llava.build_tiny_clip_tower(os.path.join(root, "tower"))
    stage2 = tiny_llava.build_tiny_llava_llama(os.path.join(root, "stage2"), tokenizer, tower)
    return {"root": root, "paths": paths, "stage2": stage2}


def run_stage3(inputs, name, overrides):
    """Stage 3 on two CPU processes; returns the output folder and the log."""
    out = os.path.join(inputs["root"], name)
    env = script_environment({
        "NUM_GPUS": "2", "OMP_NUM_THREADS": "1", "MODEL": inputs["stage2"], "DATA_PATH": inputs["paths"]["stage3"],
        "IMAGE_FOLDER": inputs["paths"]["image_folder"], "OUTPUT_DIR": out, "VERSION": "v1", "BATCH": "2",
        "GRAD_ACC": "1", "LR": "1e-3", "MAX_STEPS": str(STEPS), "SAVE_STEPS": str(STEPS), "LOG_STEPS": "1",
        "WORKERS": "0", **overrides,
    })
    # Known flake: about 1 run in 15 aborts at interpreter exit after all its work is done. Judge by the
    # outputs; retry once, from scratch, only when they are incomplete.
    for attempt in range(2):
        result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", "train_stage3.sh")], env=env,
                                cwd=REPO_DIR, capture_output=True, text=True, timeout=420)
        if finished(out):
            break
        shutil.rmtree(out, ignore_errors=True)
    log = result.stdout + result.stderr
    assert finished(out), f"two-process stage 3 failed (exit {result.returncode}):\n{log[-5000:]}"
    return out, log


@pytest.fixture(scope="module")
def run(inputs):
    out, log = run_stage3(inputs, "stage3", {"EP_SIZE": "2"})
    return {"out": out, "stage2": inputs["stage2"], "log": log}


def test_two_ranks_trained_with_expert_parallelism(run):
    log = run["log"]
    assert "--num_gpus 2" in log and "--ep_size 2" in log
    assert "dist_world_size=2" in log
    assert "MoE (deepspeed backend): layers [0, 2], experts [4, 4]" in log
    with open(os.path.join(run["out"], "config.json")) as f:
        moe = json.load(f)["moe"]
    # The saved experts are in the single-process layout, and the config says so.
    assert moe["ep_size"] == 1 and moe["backend"] == "native" and moe["drop_tokens"] is False
    with open(os.path.join(run["out"], "trainer_state.json")) as f:
        history = [entry for entry in json.load(f)["log_history"] if "loss" in entry]
    assert len(history) == STEPS and all("aux_loss_moe_layer_1" in entry for entry in history)


def test_checkpoint_holds_every_expert_under_its_global_index(run):
    out = run["out"]
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.safetensors")) +
                  glob.glob(os.path.join(out, "*.bin"))) == ["model.safetensors", "training_args.bin"]
    dense = load_file(os.path.join(run["stage2"], "model.safetensors"))
    # DeepSpeed's own checkpoint stores each expert in a file named by its global index, written by the
    # rank that holds it (experts 2 and 3 live on rank 1).
    ds_dir = os.path.join(out, f"checkpoint-{STEPS}", f"global_step{STEPS}")
    for moe_layer, layer in enumerate((0, 2)):
        changed = set()
        for expert in range(4):
            path = os.path.join(ds_dir, f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt")
            saved = torch.load(path, map_location="cpu", weights_only=False)
            for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
                key = EXPERT.format(layer=layer, expert=expert, name=name)
                assert torch.equal(weights[key], saved[key]), key
            if not torch.equal(weights[EXPERT.format(layer=layer, expert=expert, name="up_proj.weight")],
                               dense[f"model.layers.{layer}.mlp.up_proj.weight"]):
                changed.add(expert)
        # Experts held by each rank trained (every rank routes its tokens to all four).
        assert changed & {0, 1} and changed & {2, 3}
        assert f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.4.up_proj.weight" not in weights


def test_checkpoint_loads_in_one_process(run):
    from moellava.model.builder import load_pretrained_model
    from moellava.model.moe import moe_blocks

    tokenizer, model, processor, _ = load_pretrained_model(run["out"])
    blocks = moe_blocks(model)
    assert [block.num_experts for block in blocks] == [4, 4] and {block.backend for block in blocks} == {"native"}
    weights = load_file(os.path.join(run["out"], "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items())
    ids = tokenizer("USER: hello ASSISTANT:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids, images=None).logits
    assert torch.isfinite(logits).all()


def test_torchrun_with_ddp_trains_the_native_moe(inputs):
    """torchrun and DistributedDataParallel without DeepSpeed: every rank holds all experts (native)."""
    out, log = run_stage3(inputs, "stage3_ddp", {"LAUNCHER": "torchrun", "DEEPSPEED_CONFIG": ""})
    assert "+ torchrun --nproc_per_node 2" in log and "MoE (native backend)" in log
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = [entry for entry in json.load(f)["log_history"] if "loss" in entry]
    assert len(history) == STEPS and all("aux_loss" in entry for entry in history)
    weights = load_file(os.path.join(out, "model.safetensors"))
    dense = load_file(os.path.join(inputs["stage2"], "model.safetensors"))
    assert not torch.equal(weights[EXPERT.format(layer=0, expert=0, name="up_proj.weight")],
                           dense["model.layers.0.mlp.up_proj.weight"])


def test_deepspeed_engine_without_expert_parallelism_trains_the_native_moe(inputs):
    """Two ranks under the DeepSpeed engine at ep_size 1: `--moe_backend auto` takes the native dispatcher
    (every expert on every rank, no capacity padding); DeepSpeed still reduces the expert gradients."""
    out, log = run_stage3(inputs, "stage3_ds_native", {"EP_SIZE": "1"})
    assert "--num_gpus 2" in log and "dist_world_size=2" in log and "--ep_size 1" in log
    assert "MoE (native backend): layers [0, 2], experts [4, 4]" in log
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = [entry for entry in json.load(f)["log_history"] if "loss" in entry]
    assert len(history) == STEPS and all("aux_loss_moe_layer_1" in entry for entry in history)
    weights = load_file(os.path.join(out, "model.safetensors"))
    dense = load_file(os.path.join(inputs["stage2"], "model.safetensors"))
    # The engine took the native block's experts for MoE parameters (reduced over the expert-data-parallel
    # group, saved in DeepSpeed's per-expert files), and every expert trained.
    ds_dir = os.path.join(out, f"checkpoint-{STEPS}", f"global_step{STEPS}")
    for moe_layer, layer in enumerate((0, 2)):
        for expert in range(4):
            key = EXPERT.format(layer=layer, expert=expert, name="up_proj.weight")
            saved = torch.load(os.path.join(ds_dir, f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"),
                               map_location="cpu", weights_only=False)
            assert torch.equal(saved[key], weights[key])
            assert not torch.equal(weights[key], dense[f"model.layers.{layer}.mlp.up_proj.weight"])
