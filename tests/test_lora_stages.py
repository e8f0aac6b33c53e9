"""LoRA through the stage scripts (`LORA=1`) on a tiny Llama LLaVA: stage 2 (dense, without DeepSpeed) and
stage 3 (MoE, DeepSpeed ZeRO-2, experts upcycled and then given one adapter each).

For each: the loss falls; only the adapters, the projector and (stage 3) the routers change, every other
tensor equals the base's; a run killed after its first checkpoint resumes to the same result as an
uninterrupted run; the folder loads under any name; `scripts/merge_lora_weights.py` writes a plain
checkpoint whose logits equal the LoRA model's (1e-5, fp32) and which answers through the CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_llava
from moellava.demo import data, models
from moellava.demo.run import REPO_DIR, script_environment
from moellava.model import lora
from moellava.model.builder import load_pretrained_model
from moellava.model.moe import EXPERT_INFIX
from test_resume import LLAMA, TOWER  # the tiny LLM and tower of the full-training resume tests

pytestmark = pytest.mark.slow

STEPS = 6
LORA_ENV = {"LORA": "1", "LORA_R": "8", "LORA_ALPHA": "16", "LORA_DROPOUT": "0.0", "PROJECTOR_LR": "1e-3"}
# The MoE merge runs under the original's script name (an alias of merge_lora_weights.py).
MERGE_SCRIPTS = {"dense": os.path.join(REPO_DIR, "scripts", "merge_lora_weights.py"),
                 "moe": os.path.join(REPO_DIR, "scripts", "merge_moe_lora_weights.py")}


def train(script, out, overrides):
    env = script_environment({"LAUNCHER": "python", "OUTPUT_DIR": out, "MAX_STEPS": str(STEPS), "SAVE_STEPS": "3",
                              "SAVE_TOTAL": "10", "LOG_STEPS": "1", "BATCH": "4", "WORKERS": "0", "LR": "3e-3",
                              **LORA_ENV, **overrides})
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", script)], env=env, cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} failed:\n{log[-4000:]}"
    return log


def resumed_run(script, whole, out, overrides):
    """The run killed during its second save (checkpoint-3 whole, checkpoint-6 cut short), started again."""
    os.makedirs(out)
    shutil.copytree(os.path.join(whole, "checkpoint-3"), os.path.join(out, "checkpoint-3"))
    os.makedirs(os.path.join(out, "checkpoint-6"))
    with open(os.path.join(out, "checkpoint-6", lora.ADAPTER_WEIGHTS_FILE), "wb") as f:
        f.write(b"\0" * 64)
    return train(script, out, overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lora"))
    paths = data.build_dataset(os.path.join(root, "data"), num_train_images=24, num_eval_images=1)
    tokenizer = models.build_tokenizer(os.path.join(root, "tokenizer"))
    tower = models.build_tower(os.path.join(root, "tower"), TOWER)
    llm = models.build_llm(os.path.join(root, "llm"), tokenizer, LLAMA)
    stage2_full = tiny_llava.build_tiny_llava_llama(os.path.join(root, "stage2_full"), tokenizer, tower)
    dense = {"MODEL": llm, "IMAGE_TOWER": tower, "DATA_PATH": paths["stage2"], "IMAGE_FOLDER": paths["image_folder"],
             "PRETRAIN_ADAPTER": "", "VERSION": "v1", "DEEPSPEED_CONFIG": ""}
    moe = {"MODEL": stage2_full, "DATA_PATH": paths["stage3"], "IMAGE_FOLDER": paths["image_folder"]}
    result = {"root": root, "paths": paths, "llm": llm, "tower": tower, "stage2_full": stage2_full}
    for name, script, overrides in (("dense", "train_stage2.sh", dense), ("moe", "train_stage3.sh", moe)):
        whole, resumed = os.path.join(root, f"{name}_whole"), os.path.join(root, f"{name}_resumed")
        train(script, whole, overrides)
        result[name] = {"whole": whole, "resumed": resumed, "resume_log": resumed_run(script, whole, resumed, overrides)}
    return result


def history(out):
    with open(os.path.join(out, "trainer_state.json")) as f:
        state = json.load(f)
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def base_state(runs, kind):
    """The tensors training started from, under the names the LoRA model gives them."""
    if kind == "dense":
        state = load_file(os.path.join(runs["llm"], "model.safetensors"))
        tower = torch.load(os.path.join(runs["tower"], "pytorch_model.bin"), weights_only=True)
        state.update({f"model.image_tower.image_tower.{key}": value for key, value in tower.items()})
        return state
    return load_file(os.path.join(runs["stage2_full"], "model.safetensors"))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_loss_falls_and_only_adapters_projector_and_routers_change(runs, kind):
    out = runs[kind]["whole"]
    losses = [history(out)[step]["lm_loss"] for step in range(1, STEPS + 1)]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    files = set(os.listdir(out))
    assert {lora.ADAPTER_CONFIG_FILE, lora.ADAPTER_WEIGHTS_FILE, lora.NON_LORA_FILE, "config.json",
            "tokenizer.model"} <= files
    assert not any(name.endswith("model.safetensors") and name != lora.ADAPTER_WEIGHTS_FILE for name in files)
    with open(os.path.join(out, lora.ADAPTER_CONFIG_FILE)) as f:
        adapter = json.load(f)
    base = runs["llm"] if kind == "dense" else runs["stage2_full"]
    assert adapter["base_model_name_or_path"] == os.path.abspath(base)
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert adapter["target_modules"].startswith(r"model\.layers\.\d+\.(?:")  # the LLM's decoder layers only

    start, before = base_state(runs, kind), load_file(os.path.join(out, "checkpoint-3", lora.NON_LORA_FILE))
    non_lora = load_file(os.path.join(out, lora.NON_LORA_FILE))
    projector = {key for key in non_lora if ".mm_projector." in key}
    routers = {key for key in non_lora if key.endswith("deepspeed_moe.gate.wg.weight")}
    assert projector and set(non_lora) == projector | routers
    assert bool(routers) == (kind == "moe")
    for key in non_lora:  # trained from step 3 to step 6
        assert not torch.equal(non_lora[key], before[key]), key

    adapters = load_file(os.path.join(out, lora.ADAPTER_WEIGHTS_FILE))
    adapters_before = load_file(os.path.join(out, "checkpoint-3", lora.ADAPTER_WEIGHTS_FILE))
    assert all(key.startswith(lora.PEFT_PREFIX) and ".lora_" in key for key in adapters)
    for key, value in adapters.items():
        assert not torch.equal(value, adapters_before[key]), key
        if ".lora_B." in key:
            assert value.abs().max() > 0, key  # B starts at zero

    # Every frozen tensor of the trained model is the base's, bit for bit.
    _, model, _, _ = load_pretrained_model(out)
    frozen = 0
    for name, value in model.state_dict().items():
        if "lora_" in name or name in non_lora:
            continue
        source = EXPERT_INFIX.sub("", name.replace(".base_layer.", "."))
        assert torch.equal(value, start[source]), name
        frozen += 1
    assert frozen == len([key for key in model.state_dict() if "lora_" not in key]) - len(non_lora)


def test_moe_experts_have_their_own_adapters(runs):
    adapters = load_file(os.path.join(runs["moe"]["whole"], lora.ADAPTER_WEIGHTS_FILE))
    expert = lora.PEFT_PREFIX + "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.{}.up_proj.lora_{}.weight"
    for part in ("A", "B"):
        copies = [adapters[expert.format(j, part)] for j in range(4)]
        assert all(not torch.equal(copies[0], other) for other in copies[1:]), part
    # The dense layers (1, every other one) and every attention have adapters too.
    assert lora.PEFT_PREFIX + "model.layers.1.mlp.up_proj.lora_A.weight" in adapters
    assert lora.PEFT_PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight" in adapters
    with open(os.path.join(runs["moe"]["whole"], "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "moe_llava_llama" and config["moe"]["moe_layers_idx"] == [0, 2]
    assert config["moe"]["train_modules"] == ["wg"]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(runs, kind):
    whole, resumed, log = runs[kind]["whole"], runs[kind]["resumed"], runs[kind]["resume_log"]
    assert f"Skipping {resumed}/checkpoint-6: not a complete checkpoint" in log
    assert f"Resuming from {resumed}/checkpoint-3" in log
    assert log.count("{'loss': ") == STEPS - 3
    if kind == "dense":  # without DeepSpeed, the trainer itself loads the adapters back (DeepSpeed: its states)
        assert f"Resumed the LoRA adapters and 4 other trained tensors from {resumed}/checkpoint-3" in log
    a, b = history(whole), history(resumed)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "lm_loss", "learning_rate"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    # The same tensors, usually bitwise. Under DeepSpeed the last bits may differ between processes (seen once:
    # 1.7e-6 at most, in q/k_proj's lora_A, where Adam magnifies tiny gradients); Adam moves each weight by
    # about the learning rate (3e-3) a step, which a resume with the wrong state would be off by.
    for name in (lora.ADAPTER_WEIGHTS_FILE, lora.NON_LORA_FILE):
        x, y = load_file(os.path.join(whole, name)), load_file(os.path.join(resumed, name))
        assert x.keys() == y.keys()
        for key in x:
            assert torch.allclose(x[key], y[key], rtol=0, atol=1e-5), key


def sample_inputs(runs):
    from PIL import Image

    from moellava.conversation import get_conv_template

    with open(runs["paths"]["eval"]) as f:
        item = json.load(f)[0]
    image_path = os.path.join(runs["paths"]["image_folder"], item["image"])
    conv = get_conv_template("v1")
    conv.append_message(conv.roles[0], "<image>\n" + data.COLOUR_QUESTIONS[0])
    conv.append_message(conv.roles[1], None)
    return image_path, conv.get_prompt(), Image.open(image_path).convert("RGB")


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_merged_checkpoint_is_plain_gives_the_same_logits_and_answers_through_the_cli(runs, kind, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from moellava.mm_utils import process_images, tokenizer_image_token
    from moellava.serve import cli

    out = runs[kind]["whole"]
    merged = str(tmp_path / "merged")
    result = subprocess.run([sys.executable, MERGE_SCRIPTS[kind], "--model-path", out, "--save-model-path", merged],
                            capture_output=True, text=True, timeout=300, env=script_environment({}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not lora.is_lora_checkpoint(merged) and os.path.isfile(os.path.join(merged, "model.safetensors"))

    image_path, prompt, image = sample_inputs(runs)
    tokenizer, unmerged, processors, _ = load_pretrained_model(out)
    processor = processors["image"]
    assert lora.has_lora(unmerged)
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
    pixels = process_images([image], processor, unmerged.config)
    with torch.no_grad():
        expected = unmerged(ids, images=pixels).logits
        _, plain, _, _ = load_pretrained_model(merged)
        assert not lora.has_lora(plain)
        torch.testing.assert_close(plain(ids, images=pixels).logits, expected, rtol=0, atol=1e-5)
        _, merged_in_memory, _, _ = load_pretrained_model(out, merge=True)
        assert not lora.has_lora(merged_in_memory)
        torch.testing.assert_close(merged_in_memory(ids, images=pixels).logits, expected, rtol=0, atol=1e-5)
        # Generation through the KV cache too; past the end token, as the tiny model may answer with it at once.
        greedy = dict(images=pixels, do_sample=False, max_new_tokens=6, min_new_tokens=6)
        generated = unmerged.generate(ids, **greedy)
        assert generated.shape[1] == ids.shape[1] + 6 and torch.equal(plain.generate(ids, **greedy), generated)
    # The adapters moved the weights (so agreeing logits say something): a merged Linear is not the base's.
    start = base_state(runs, kind)
    weights = load_file(os.path.join(merged, "model.safetensors"))
    assert (weights["model.layers.1.self_attn.q_proj.weight"] - start["model.layers.1.self_attn.q_proj.weight"]).abs().max() > 1e-4
    # Plain: every tensor has its place in the model class, with no peft module involved.
    loaded, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and not lora.has_lora(loaded)

    if kind == "dense":  # the merged stage-2 model is what a stage-3 run starts from
        from types import SimpleNamespace

        from moellava.train.arguments import ModelArguments
        from moellava.train.train import load_model

        stage3_start = load_model(ModelArguments(model_name_or_path=merged, moe_enable=True),
                                  SimpleNamespace(cache_dir=None, deepspeed=None, bf16=False, fp16=False))
        assert type(stage3_start).__name__ == "MoELLaVALlamaForCausalLM"
        assert all(torch.equal(value, weights[key]) for key, value in stage3_start.state_dict().items())

    cli.main(["--model-path", merged, "--image-file", image_path, "--query", data.COLOUR_QUESTIONS[0],
              "--temperature", "0", "--max-new-tokens", "4"])
    answer = capsys.readouterr().out.strip()
    assert answer == cli_answer_of(unmerged, tokenizer, processor, image)


def cli_answer_of(model, tokenizer, processor, image):
    from moellava.conversation import get_conv_template
    from moellava.serve.cli import ChatSession

    session = ChatSession(tokenizer, model, processor, image, get_conv_template("v1"), temperature=0,
                          max_new_tokens=4)
    return session.ask(data.COLOUR_QUESTIONS[0])


def test_a_lora_checkpoint_loads_under_any_folder_name_and_with_a_moved_base(runs, tmp_path):
    out = runs["moe"]["whole"]
    renamed = str(tmp_path / "my_model")  # no "lora", "moe" or "llava" in the name
    shutil.copytree(out, renamed, ignore=shutil.ignore_patterns("checkpoint-*"))
    moved_base = str(tmp_path / "base_elsewhere")
    shutil.copytree(runs["stage2_full"], moved_base)
    ids = torch.tensor([[1, 5, 6, -200, 7, 8]])
    pixels = tiny_llava.random_pixels(1)
    with torch.no_grad():
        _, reference, _, _ = load_pretrained_model(out)
        expected = reference(ids, images=pixels).logits
        _, model, _, _ = load_pretrained_model(renamed)
        assert type(model).__name__ == "MoELLaVALlamaForCausalLM" and lora.has_lora(model)
        torch.testing.assert_close(model(ids, images=pixels).logits, expected, rtol=0, atol=0)
        # The recorded base gone: --model-base says where it is now.
        with open(os.path.join(renamed, lora.ADAPTER_CONFIG_FILE)) as f:
            adapter = json.load(f)
        adapter["base_model_name_or_path"] = str(tmp_path / "deleted")
        with open(os.path.join(renamed, lora.ADAPTER_CONFIG_FILE), "w") as f:
            json.dump(adapter, f)
        with pytest.raises(ValueError, match="does not exist: pass --model-base"):
            load_pretrained_model(renamed)
        _, model, _, _ = load_pretrained_model(renamed, moved_base)
        torch.testing.assert_close(model(ids, images=pixels).logits, expected, rtol=0, atol=0)
