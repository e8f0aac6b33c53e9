"""`scripts/train_stage{1,2,3}.sh` with `FAMILY=<family>`: each family's original recipe (spec section 10.1) as
the defaults, every value still overridable from the environment, the command printed, and `DRY_RUN=1`
stopping before anything runs. The commands are read back from the scripts' output; nothing is trained."""

import os
import shlex
import subprocess

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO_DIR, "moellava", "train", "train.py")

# family -> base LLM, checkpoint name prefix, stage-2/3 --version (None: train.py's family default),
# stage-3 batch and gradient accumulation.
RECIPES = {
    "phi": ("microsoft/phi-2", "llavaphi-2.7b", None, "8", "2"),
    "qwen": ("Qwen/Qwen-1_8B", "llavaqwen-1.8b", None, "8", "2"),
    "stablelm": ("stabilityai/stablelm-2-1_6b", "llavastablelm-1.6b", None, "8", "2"),
    "openchat": ("openchat/openchat-3.5-1210", "llavaopenchat-7b", "openchat", "4", "4"),
    "mistral": ("mistralai/Mistral-7B-v0.1", "llavamistral-7b", None, "8", "2"),
    "llama": ("lmsys/vicuna-7b-v1.5", "llavavicuna-7b", None, "8", "2"),
}


def dry_run(stage, **env):
    """Run a stage script with DRY_RUN=1, only `env` set, and no launcher on PATH (running would fail)."""
    return subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", f"train_stage{stage}.sh")],
                          env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **env}, cwd=REPO_DIR, capture_output=True,
                          text=True, timeout=60)


def command(stage, **env):
    """The train.py arguments the script prints, as a flag -> values dict."""
    result = dry_run(stage, **env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    family = env.get("FAMILY", "phi")
    assert lines[0] == f"# FAMILY={family} RUN_NAME={env.get('RUN_NAME', RECIPES[family][1])}"
    words = shlex.split(lines[1])
    assert words[:2] == ["+", "deepspeed"] and TRAIN_PY in words
    args = words[words.index(TRAIN_PY) + 1:]
    flags = {}
    for word in args:
        if word.startswith("--"):
            flags[word] = []
            current = flags[word]
        else:
            current.append(word)
    return {flag: " ".join(values) for flag, values in flags.items()}


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_each_family_recipe_is_the_default(family):
    model, name, version, moe_batch, moe_grad_acc = RECIPES[family]
    stage1, stage2, stage3 = (command(stage, FAMILY=family) for stage in (1, 2, 3))

    assert stage1["--model_name_or_path"] == model and stage1["--version"] == "plain"
    assert stage1["--output_dir"] == f"./checkpoints/{name}-pretrain"
    assert (stage1["--per_device_train_batch_size"], stage1["--learning_rate"]) == ("32", "1e-3")

    assert stage2["--model_name_or_path"] == model
    assert stage2["--pretrain_mm_mlp_adapter"] == f"./checkpoints/{name}-pretrain/mm_projector.bin"
    assert stage2["--output_dir"] == f"./checkpoints/{name}-finetune"
    assert (stage2["--per_device_train_batch_size"], stage2["--gradient_accumulation_steps"]) == ("8", "2")

    assert stage3["--model_name_or_path"] == f"./checkpoints/{name}-finetune"
    assert stage3["--output_dir"] == f"./checkpoints/{name}-finetune-moe"
    assert (stage3["--per_device_train_batch_size"], stage3["--gradient_accumulation_steps"]) == (
        moe_batch, moe_grad_acc)
    assert stage3["--moe_enable"] == "True" and stage3["--num_experts"] == "4" and stage3["--top_k_experts"] == "2"
    # train.py picks the template and the trained FFN names from the checkpoint's family when not given.
    assert "--train_modules" not in stage3
    for stage in (stage2, stage3):
        assert stage.get("--version") == version


def test_environment_overrides_the_recipe():
    stage3 = command(3, FAMILY="openchat", RUN_NAME="mine", BATCH="2", VERSION="mistral",
                     TRAIN_MODULES="up_proj down_proj wg")
    assert stage3["--model_name_or_path"] == "./checkpoints/mine-finetune"
    assert stage3["--output_dir"] == "./checkpoints/mine-finetune-moe"
    assert (stage3["--per_device_train_batch_size"], stage3["--gradient_accumulation_steps"]) == ("2", "4")
    assert stage3["--version"] == "mistral" and stage3["--train_modules"] == "up_proj down_proj wg"
    stage2 = command(2, FAMILY="qwen", MODEL="/data/my qwen", PRETRAIN_ADAPTER="", OUTPUT_DIR="/out/s2")
    assert stage2["--model_name_or_path"] == "/data/my qwen" and stage2["--output_dir"] == "/out/s2"
    assert "--pretrain_mm_mlp_adapter" not in stage2


def test_phi_is_the_default_family():
    assert command(1) == command(1, FAMILY="phi")


def test_unknown_family_is_refused_with_the_choices():
    result = dry_run(1, FAMILY="gpt2")
    assert result.returncode == 2 and result.stdout == ""
    assert "FAMILY=gpt2 has no recipe: use phi, qwen, stablelm, openchat, mistral or llama" in result.stderr


def test_without_dry_run_the_printed_command_runs():
    # No deepspeed on this PATH: the script gets as far as running the printed command, which fails.
    result = dry_run(1, FAMILY="qwen", DRY_RUN="0")
    assert result.returncode == 127 and "deepspeed" in result.stderr
    assert result.stdout.splitlines()[1].startswith("+ deepspeed ")


def test_lora_recipe_is_llavas_finetune_lora():
    stage2, stage3 = command(2, LORA="1"), command(3, LORA="1", LORA_TARGET="q_proj v_proj fc1 fc2")
    for stage in (stage2, stage3):
        assert (stage["--lora_enable"], stage["--lora_r"], stage["--lora_alpha"]) == ("True", "128", "256")
        assert (stage["--mm_projector_lr"], stage["--learning_rate"], stage["--lora_dropout"]) == ("2e-5", "2e-4", "0.05")
    assert stage2["--output_dir"] == "./checkpoints/llavaphi-2.7b-finetune-lora" and "--lora_target" not in stage2
    assert stage3["--output_dir"] == "./checkpoints/llavaphi-2.7b-finetune-moe-lora"
    assert stage3["--model_name_or_path"] == "./checkpoints/llavaphi-2.7b-finetune"
    assert stage3["--lora_target"] == "q_proj v_proj fc1 fc2" and "--train_modules" not in stage3
    assert "--lora_enable" not in command(2) and command(2, LORA="1", LR="1e-4")["--learning_rate"] == "1e-4"
    result = dry_run(1, LORA="1")
    assert result.returncode == 2 and "stage 1 trains only the projector, LoRA is for stages 2 and 3" in result.stderr
