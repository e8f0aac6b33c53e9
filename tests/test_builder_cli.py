"""load_pretrained_model (dispatch on model_type, dtypes, Stage-1 projector over a base, missing weights,
embeddings never shrunk) and the CLI (one --query in a subprocess, history without doubled end tokens)."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionModel, GenerationConfig, LlamaTokenizer

from moellava.conversation import get_conv_template
from moellava.model import LlavaLlamaForCausalLM, MoELLaVALlamaForCausalLM
from moellava.model.builder import load_pretrained_model
from moellava.model.moe import moe_blocks
from moellava.serve.cli import ChatSession, default_conv_mode

import tiny_llava

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
IDS = torch.tensor([[1, 300, -200, 301, 302]])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("builder")
    tokenizer = tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer")
    tower = tiny_llava.build_tiny_clip_tower(root / "clip")
    # Folder names that would mislead a name-based loader: dispatch must read config.json.
    dense = tiny_llava.build_tiny_llava_llama(root / "llava-phi-moe-lora", tokenizer, tower, seed=1)
    moe = tiny_llava.build_tiny_llava_llama(root / "qwen-dense", tokenizer, tower, seed=2, moe=dict(num_experts=4))
    return {"root": root, "tokenizer": tokenizer, "tower": tower, "dense": dense, "moe": moe}


def logits_of(model, pixels=None):
    with torch.no_grad():
        return model(IDS, images=tiny_llava.random_pixels(1) if pixels is None else pixels).logits


def test_dense_and_moe_load_by_model_type(dirs):
    tokenizer, model, processor, context_len = load_pretrained_model(dirs["dense"])
    assert type(model) is LlavaLlamaForCausalLM and not model.training
    assert isinstance(tokenizer, LlamaTokenizer) and tokenizer.pad_token == tokenizer.unk_token == "<unk>"
    assert processor["video"] is None and isinstance(processor["image"], CLIPImageProcessor) and context_len == 256
    assert next(model.parameters()).dtype == torch.float32
    reference = LlavaLlamaForCausalLM.from_pretrained(dirs["dense"]).eval()
    torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=0, atol=0)

    _, moe, _, _ = load_pretrained_model(dirs["moe"])
    assert type(moe) is MoELLaVALlamaForCausalLM
    assert [b.backend for b in moe_blocks(moe)] == ["native", "native"]
    reference = MoELLaVALlamaForCausalLM.from_pretrained(dirs["moe"]).eval()
    torch.testing.assert_close(logits_of(moe), logits_of(reference), rtol=0, atol=0)


def test_moe_config_of_an_expert_parallel_run_loads_on_one_process(dirs, tmp_path):
    folder = tmp_path / "ep2"
    shutil.copytree(dirs["moe"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["moe"].update(ep_size=2, backend="deepspeed")
    (folder / "config.json").write_text(json.dumps(config))
    _, model, _, _ = load_pretrained_model(str(folder))
    assert model.config.moe["ep_size"] == 1 and [b.backend for b in moe_blocks(model)] == ["native", "native"]
    reference = MoELLaVALlamaForCausalLM.from_pretrained(dirs["moe"]).eval()
    torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=0, atol=0)


def test_dtype_padding_side_and_bad_settings(dirs):
    tokenizer, model, _, _ = load_pretrained_model(dirs["dense"], torch_dtype="bfloat16", padding_side="left")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert next(model.get_image_tower().parameters()).dtype == torch.bfloat16
    assert tokenizer.padding_side == "left" and model.config.tokenizer_padding_side == "left"
    assert logits_of(model).dtype == torch.float32  # Llama returns fp32 logits
    with pytest.raises(ValueError, match=r"torch_dtype='float64' is not supported: use one of \['bfloat16'"):
        load_pretrained_model(dirs["dense"], torch_dtype="float64")
    with pytest.raises(ValueError, match="Unknown MoE backend 'tutel'"):
        load_pretrained_model(dirs["moe"], moe_backend="tutel")
    with pytest.raises(ValueError, match="padding_side='middle'"):
        load_pretrained_model(dirs["dense"], padding_side="middle")


def test_stage1_projector_over_a_base_llm(dirs, tmp_path):
    stage1, base = tiny_llava.build_tiny_stage1(tmp_path / "stage1", tmp_path / "vicuna", dirs["tokenizer"],
                                                dirs["tower"], seed=4)
    tokenizer, model, processor, _ = load_pretrained_model(stage1, base)
    assert type(model) is LlavaLlamaForCausalLM and len(tokenizer) == 512
    saved = torch.load(os.path.join(stage1, "mm_projector.bin"))
    for key, value in model.get_model().mm_projector.state_dict().items():
        torch.testing.assert_close(value, saved[f"model.mm_projector.{key}"], rtol=0, atol=0)
    tower = CLIPVisionModel.from_pretrained(dirs["tower"])
    for key, value in model.get_image_tower().image_tower.state_dict().items():
        torch.testing.assert_close(value, tower.state_dict()[key], rtol=0, atol=0)
    base_state = load_file(os.path.join(base, "model.safetensors"))
    torch.testing.assert_close(model.lm_head.weight, base_state["lm_head.weight"], rtol=0, atol=0)

    with pytest.raises(ValueError, match="has no mm_projector.bin. Load a full checkpoint without model_base"):
        load_pretrained_model(dirs["dense"], base)


def test_missing_tower_weights_come_from_the_tower_other_gaps_fail(dirs, tmp_path):
    path = tmp_path / "no-tower"
    tiny_llava.build_tiny_llava_llama(path, dirs["tokenizer"], dirs["tower"], seed=1)
    weights = load_file(str(path / "model.safetensors"))
    # Cloned: the loaded tensors map the file that is rewritten below.
    without_tower = {k: v.clone() for k, v in weights.items() if ".image_tower." not in k}
    assert len(without_tower) < len(weights)
    save_file(without_tower, str(path / "model.safetensors"), metadata={"format": "pt"})
    _, model, _, _ = load_pretrained_model(str(path))
    _, complete, _, _ = load_pretrained_model(dirs["dense"])
    torch.testing.assert_close(logits_of(model), logits_of(complete), rtol=0, atol=0)

    del without_tower["model.layers.1.mlp.up_proj.weight"]
    save_file(without_tower, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights for \['model.layers.1.mlp.up_proj.weight'\]"):
        load_pretrained_model(str(path))


# transformers 4.31 reports unexpected keys through the deprecated Logger.warn.
@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
def test_weights_without_a_place_in_the_model_fail(dirs, tmp_path):
    """A MoE checkpoint whose config lost its `moe` settings must not load as a dense model."""
    path = tmp_path / "moe-without-settings"
    tiny_llava.build_tiny_llava_llama(path, dirs["tokenizer"], dirs["tower"], moe=dict(num_experts=2))
    config = json.loads((path / "config.json").read_text())
    del config["moe"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"holds weights this model has no place for: \['model.layers.0.mlp.deepspeed_moe"):
        load_pretrained_model(str(path))


def test_embeddings_grow_but_never_shrink(dirs, tmp_path):
    bigger = tiny_llava.build_tiny_llava_llama(tmp_path / "bigger", dirs["tokenizer"], dirs["tower"],
                                               vocab_size=520)
    tokenizer, model, _, _ = load_pretrained_model(bigger)
    assert len(tokenizer) == 512 and model.get_input_embeddings().weight.shape[0] == 520

    patched = tiny_llava.build_tiny_llava_llama(tmp_path / "patch", dirs["tokenizer"], dirs["tower"],
                                                mm_use_im_patch_token=True)
    tokenizer, model, _, _ = load_pretrained_model(patched)
    assert tokenizer.convert_tokens_to_ids("<im_patch>") == 512
    assert model.get_input_embeddings().weight.shape[0] == 513 == model.lm_head.weight.shape[0]


def test_refuses_a_plain_llm(dirs, tmp_path):
    _, base = tiny_llava.build_tiny_stage1(tmp_path / "s1", tmp_path / "base", dirs["tokenizer"], dirs["tower"])
    with pytest.raises(ValueError, match=r"model_type 'llama', not a LLaVA checkpoint"):
        load_pretrained_model(base)


def test_conv_mode_comes_from_the_checkpoint(dirs):
    _, model, _, _ = load_pretrained_model(dirs["dense"])
    assert default_conv_mode(model.config) == "v1"  # llama family default
    model.config.conv_template = "llava_v1"
    assert default_conv_mode(model.config) == "llava_v1"


def test_history_keeps_one_end_token_per_answer(dirs, tmp_path):
    tokenizer, model, processor, _ = load_pretrained_model(dirs["dense"])
    image = tiny_llava.write_test_image(tmp_path / "cat.png")
    session = ChatSession(tokenizer, model, processor["image"], Image.open(image).convert("RGB"),
                          get_conv_template("v1"), temperature=0, max_new_tokens=4)
    # Make the answer end with </s> like a trained model's, so the stored reply is what the fix is about.
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                               forced_eos_token_id=tokenizer.eos_token_id)
    reply = session.ask("What is in the image?")
    assert "</s>" not in reply and session.conv.messages[1] == ["ASSISTANT", reply]
    assert session.conv.messages[0][1] == "<image>\nWhat is in the image?"

    session.conv.append_message("USER", "And its color?")
    session.conv.append_message("ASSISTANT", None)
    second_prompt = session.conv.get_prompt()
    assert second_prompt.count("</s>") == 1
    assert f"ASSISTANT: {reply}</s>USER: And its color? ASSISTANT:" in second_prompt
    assert second_prompt.count("<image>") == 1

    # A template that starts with canned example turns (v0) still puts the image in the user's first turn.
    with_examples = ChatSession(tokenizer, model, processor["image"], Image.open(image).convert("RGB"),
                                get_conv_template("v0"), temperature=0, max_new_tokens=2)
    with_examples.ask("What is in the image?")
    assert with_examples.conv.messages[2] == ["Human", "<image>\nWhat is in the image?"]


def test_cli_query_answers_once(dirs, tmp_path):
    image = tiny_llava.write_test_image(tmp_path / "photo.png")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "moellava.serve.cli", "--model-path", dirs["moe"], "--image-file", image,
         "--query", "What is in the image?", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    tokenizer, model, processor, _ = load_pretrained_model(dirs["moe"])
    session = ChatSession(tokenizer, model, processor["image"], Image.open(image).convert("RGB"),
                          get_conv_template(default_conv_mode(model.config)), temperature=0, max_new_tokens=6)
    expected = session.ask("What is in the image?")
    assert expected and run.stdout == expected + "\n"


def test_cli_interactive_streams_each_answer_and_keeps_history(dirs, tmp_path, monkeypatch, capsys):
    from moellava.serve import cli

    image = tiny_llava.write_test_image(tmp_path / "photo.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is in the image?\n\nAnd its color?\n"))
    cli.main(["--model-path", dirs["dense"], "--image-file", image, "--temperature", "0", "--max-new-tokens", "5",
              "--device", "cpu"])
    out = capsys.readouterr().out

    tokenizer, model, processor, _ = load_pretrained_model(dirs["dense"])
    session = ChatSession(tokenizer, model, processor["image"], Image.open(image).convert("RGB"),
                          get_conv_template("v1"), temperature=0, max_new_tokens=5)
    first, second = session.ask("What is in the image?"), session.ask("And its color?")
    # Prompt, streamed answer, prompt answered by an empty line (asked again), streamed answer, prompt, EOF.
    turns = out.split("USER: ")
    assert len(turns) == 5 and turns[0] == turns[2] == "" and turns[4] == "\n"
    assert turns[1].startswith("ASSISTANT: ") and first in turns[1]
    assert turns[3].startswith("ASSISTANT: ") and second in turns[3]
