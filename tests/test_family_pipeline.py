"""Every non-Llama family through the whole pipeline: a tiny official-layout backbone folder with the family's
tiny tokenizer saved beside it (as the official folders ship), stage 1 -> 2 -> 3 through
`scripts/train_stage{1,2,3}.sh` (one process on CPU, two steps each; stage 3, the MoE stage, under DeepSpeed
ZeRO-2 as in the recipe, stages 1-2 without it to keep the file fast), then the stage-3 checkpoint through
`load_pretrained_model` and `python -m moellava.serve.cli`.
Llama runs the same path, every stage under DeepSpeed, in tests/test_train_stages.py."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from moellava import conversation as conversation_lib
from moellava.demo import data
from moellava.demo.run import REPO_DIR, script_environment
from moellava.tokenization import FAMILIES
from moellava.train.preprocess import find_trained_spans, preprocess

import tiny_llava
import test_backbone_mistral
import test_backbone_phi
import test_backbone_qwen
import test_backbone_stablelm

pytestmark = pytest.mark.slow

# Vocabularies as the official ones relate to their tokenizers: Qwen's, Phi-2's and StableLM-2's are padded
# past the tokenizer (toy tokenizers: 720, 552 and 545 tokens with the family rules), Mistral's is exact (512).
# 256 positions hold the image tokens, the system prompt and the longest synthetic conversation.
POSITIONS = 256
BACKBONES = {
    # seq_length above every length here: QWen's dynamic NTK and log-n scaling stay off.
    "qwen": dict(test_backbone_qwen.TINY, vocab_size=768, max_position_embeddings=POSITIONS, seq_length=POSITIONS),
    "phi": dict(test_backbone_phi.TINY, vocab_size=576, max_position_embeddings=POSITIONS),
    "stablelm": dict(test_backbone_stablelm.TINY, vocab_size=576, max_position_embeddings=POSITIONS),
    "mistral": dict(test_backbone_mistral.TINY, vocab_size=512, max_position_embeddings=POSITIONS),
}
# Expected tokenizer class and unk (= pad) token after each family's rules.
TOKENIZERS = {
    "qwen": ("QWenTokenizer", "<|extra_0|>"),
    "phi": ("CodeGenTokenizer", "<|extra_0|>"),
    "stablelm": ("Arcade100kTokenizer", "<|reg0|>"),
    "mistral": ("LlamaTokenizer", "<unk>"),
}
QUESTION = data.COLOUR_QUESTIONS[0]


def write_backbone(family, folder, toy_dir, config=None):
    """An official-layout backbone folder: config.json (`config`, default the family's BACKBONES entry),
    model.safetensors under the official weight names, and the family's tokenizer files exactly as shipped
    (no family rules applied yet)."""
    config = config or BACKBONES[family]
    if family == "qwen":
        test_backbone_qwen.write_official_checkpoint(folder, config, seed=3)
    elif family == "phi":
        test_backbone_phi.write_official_checkpoint(folder, config, seed=3)
    else:
        module = test_backbone_stablelm if family == "stablelm" else test_backbone_mistral
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file(module.official_state_dict(config, seed=3), str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    shutil.copytree(toy_dir, folder, dirs_exist_ok=True)
    return str(folder)


def run_script(name, overrides, log_path):
    env = script_environment({"LAUNCHER": "python", "BATCH": "4", "GRAD_ACC": "1", "MAX_STEPS": "2", "LR": "1e-3",
                              "LOG_STEPS": "1", "WORKERS": "0", "SAVE_STEPS": "1000", **overrides})
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "scripts", name)], env=env, cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    with open(log_path, "w") as f:
        f.write(log)
    assert result.returncode == 0, f"{name} failed:\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tower and the synthetic data every family trains on."""
    root = str(tmp_path_factory.mktemp("family_shared"))
    return {"tower": tiny_llava.build_tiny_clip_tower(os.path.join(root, "tower")),
            "paths": data.build_dataset(os.path.join(root, "data"), num_train_images=8, num_eval_images=1)}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def pipeline(request, shared, toy_tokenizer_dir, tmp_path_factory):
    family = request.param
    root = str(tmp_path_factory.mktemp(f"pipeline_{family}"))
    backbone = write_backbone(family, Path(root) / "backbone", toy_tokenizer_dir(family))
    paths = shared["paths"]
    dirs = {i: os.path.join(root, f"stage{i}") for i in (1, 2, 3)}
    common = {"FAMILY": family, "IMAGE_TOWER": shared["tower"], "IMAGE_FOLDER": paths["image_folder"]}
    dense = {**common, "DEEPSPEED_CONFIG": "", "MODEL": backbone}
    logs = {
        1: run_script("train_stage1.sh", {**dense, "DATA_PATH": paths["stage1"], "OUTPUT_DIR": dirs[1]},
                      os.path.join(root, "s1.log")),
        # Stage 2 names the family's template, as the README's table says to.
        2: run_script("train_stage2.sh", {**dense, "DATA_PATH": paths["stage2"], "OUTPUT_DIR": dirs[2],
                                          "VERSION": FAMILIES[family].version,
                                          "PRETRAIN_ADAPTER": os.path.join(dirs[1], "mm_projector.bin")},
                      os.path.join(root, "s2.log")),
        # Stage 3 leaves --version and --train_modules to the family table.
        3: run_script("train_stage3.sh", {**common, "MODEL": dirs[2], "DATA_PATH": paths["stage3"],
                                          "OUTPUT_DIR": dirs[3]}, os.path.join(root, "s3.log")),
    }
    return {"family": family, "backbone": backbone, "dirs": dirs, "logs": logs, "paths": paths}


def lm_losses(folder):
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return [entry["lm_loss"] for entry in json.load(f)["log_history"] if "lm_loss" in entry]


def read_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def test_every_stage_trains_on_real_labels(pipeline):
    vocab_size = BACKBONES[pipeline["family"]]["vocab_size"]
    for stage, folder in pipeline["dirs"].items():
        losses = lm_losses(folder)
        assert len(losses) == 2, stage
        # All labels masked would give nan (or 0): the loss is a real cross entropy over the vocabulary.
        assert all(math.isfinite(loss) and 0.5 < loss < 2 * math.log(vocab_size) for loss in losses), (
            stage, losses)
    assert os.path.isfile(os.path.join(pipeline["dirs"][1], "mm_projector.bin"))


def test_stage_checkpoints_carry_the_family_and_its_template(pipeline):
    family = pipeline["family"]
    version = FAMILIES[family].version
    stage2, stage3 = read_config(pipeline["dirs"][2]), read_config(pipeline["dirs"][3])
    assert stage2["model_type"] == f"llava_{family}" and stage2["conv_template"] == version
    assert stage3["model_type"] == f"moe_llava_{family}" and stage3["conv_template"] == version
    moe = stage3["moe"]
    assert moe["train_modules"] == list(FAMILIES[family].train_modules)
    assert moe["moe_layers_idx"] == list(range(0, stage3["num_hidden_layers"], 2))
    assert moe["num_experts"] == [4] * len(moe["moe_layers_idx"]) and moe["top_k_experts"] == 2
    command = next(line for line in pipeline["logs"][3].splitlines() if line.startswith("+ python "))
    assert "--deepspeed" in command and "--version" not in command and "--train_modules" not in command


def test_stage3_checkpoint_loads_with_the_family_rules(pipeline):
    from moellava.model.builder import load_pretrained_model
    from moellava.model.moe import MoEBlock

    family, out = pipeline["family"], pipeline["dirs"][3]
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    tokenizer, model, processor, _ = load_pretrained_model(out)
    assert model.config.model_type == f"moe_llava_{family}" and processor["image"] is not None
    layers = model.get_decoder_layers()
    assert [isinstance(layer.mlp, MoEBlock) for layer in layers] == [i % 2 == 0 for i in range(len(layers))]
    tokenizer_class, unk = TOKENIZERS[family]
    assert type(tokenizer).__name__ == tokenizer_class
    assert tokenizer.unk_token == tokenizer.pad_token == unk
    assert tokenizer.pad_token_id == model.config.pad_token_id

    # The saved tokenizer and the family's template label exactly each answer and its end-of-turn token.
    conv = conversation_lib.get_conv_template(model.config.conv_template)
    with open(pipeline["paths"]["stage3"]) as f:
        sample = next(item for item in json.load(f) if len(item["conversations"]) >= 4)
    previous = conversation_lib.default_conversation
    conversation_lib.default_conversation = conv
    try:
        labels = preprocess([sample["conversations"]], tokenizer, has_image=True)["labels"][0].tolist()
    finally:
        conversation_lib.default_conversation = previous
    answers = [turn["value"] for turn in sample["conversations"][1::2]]
    spans = [tokenizer.decode(labels[start:end]).strip() for start, end in find_trained_spans(labels)]
    assert spans == [answer + conv.sep2 for answer in answers]


def chat_session(tokenizer, model, processor, image_path, version, max_new_tokens=6):
    from PIL import Image

    from moellava.serve.cli import ChatSession

    return ChatSession(tokenizer, model, processor["image"], Image.open(image_path).convert("RGB"),
                       conversation_lib.get_conv_template(version), temperature=0, max_new_tokens=max_new_tokens)


def test_cli_answers_from_the_stage3_checkpoint_with_its_template(pipeline):
    from moellava.model.builder import load_pretrained_model

    image = os.path.join(pipeline["paths"]["image_folder"], "eval_00000.png")
    run = subprocess.run(
        [sys.executable, "-m", "moellava.serve.cli", "--model-path", pipeline["dirs"][3], "--image-file", image,
         "--query", QUESTION, "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"],
        capture_output=True, text=True, env=script_environment({}), cwd=REPO_DIR, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # The same greedy answer as a session on the family's template and tokenizer rules.
    tokenizer, model, processor, _ = load_pretrained_model(pipeline["dirs"][3])
    expected = chat_session(tokenizer, model, processor, image, FAMILIES[pipeline["family"]].version).ask(QUESTION)
    assert expected.strip() and run.stdout == expected + "\n"


@torch.no_grad()
def test_answers_never_use_vocabulary_rows_past_the_tokenizer(pipeline):
    from moellava.mm_utils import tokenizer_image_token
    from moellava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(pipeline["dirs"][3])
    head = model.get_output_embeddings()
    padded = list(range(len(tokenizer), head.weight.shape[0]))
    image = os.path.join(pipeline["paths"]["image_folder"], "eval_00000.png")
    session = chat_session(tokenizer, model, processor, image, model.config.conv_template, max_new_tokens=3)
    if pipeline["family"] == "mistral":  # Mistral's vocabulary is exactly its tokenizer's
        assert padded == [] and session.suppress_tokens is None
        return
    assert padded and session.suppress_tokens == padded
    # Make the first padded row the most likely token everywhere: plain generation picks it.
    boost = torch.zeros(head.weight.shape[0])
    boost[padded[0]] = 1e4
    hook = head.register_forward_hook(lambda module, inputs, logits: logits + boost)
    try:
        ids = tokenizer_image_token("<image>\nWhat is it?", tokenizer, return_tensors="pt").unsqueeze(0)
        plain = model.generate(ids, images=session.images, do_sample=False, max_new_tokens=1)
        assert plain[0, -1].item() == padded[0]
        reply = session.ask(QUESTION)  # would fail to decode the padded row
    finally:
        hook.remove()
    assert isinstance(reply, str)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cli_template_defaults_to_the_family_of_the_model_type(family):
    from moellava.serve.cli import default_conv_mode

    for model_type in (f"llava_{family}", f"moe_llava_{family}"):
        assert default_conv_mode(SimpleNamespace(model_type=model_type)) == FAMILIES[family].version
        assert default_conv_mode(SimpleNamespace(model_type=model_type, conv_template="plain")) == "plain"
