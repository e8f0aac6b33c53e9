"""The original MoE-LLaVA's Python API and command-line habits work here: `load_pretrained_model` with its
positional and keyword call forms (predict.py, the eval scripts, the merge scripts) and its return value
(`processor['image']`), the README / predict.py snippet (`disable_torch_init`, `get_model_name_from_path`,
`conv_templates`, `KeywordsStoppingCriteria`), `--local_rank` from the deepspeed launcher, image URLs in the
CLI, and clear refusals of 4-/8-bit loading and of model-splitting device maps."""

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import CLIPImageProcessor

from moellava.mm_utils import get_model_name_from_path
from moellava.model.builder import load_pretrained_model
from moellava.serve import cli
from moellava.tokenization import doctor, load_tokenizer
from moellava.utils import disable_torch_init

import published_layout
import tiny_llava

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)

# predict.py of the original (its README's API snippet), with what a CPU needs: the model path and image
# filled in, device 'cpu' instead of 'cuda', float32 instead of float16, `.to(model.device)` for `.cuda()`.
README_SNIPPET = '''
import torch
from PIL import Image
from moellava.constants import IMAGE_TOKEN_INDEX, DEFAULT_IMAGE_TOKEN
from moellava.conversation import conv_templates, SeparatorStyle
from moellava.model.builder import load_pretrained_model
from moellava.utils import disable_torch_init
from moellava.mm_utils import tokenizer_image_token, get_model_name_from_path, KeywordsStoppingCriteria

def main():
    disable_torch_init()
    image = {image!r}
    inp = 'What is unusual about this image?'
    model_path = {model_path!r}  # choose a model
    device = 'cpu'
    load_4bit, load_8bit = False, False
    model_name = get_model_name_from_path(model_path)
    tokenizer, model, processor, context_len = load_pretrained_model(model_path, None, model_name, load_8bit, load_4bit, device=device)
    image_processor = processor['image']
    conv_mode = "phi"  # phi or qwen or stablelm
    conv = conv_templates[conv_mode].copy()
    roles = conv.roles

    image_tensor = image_processor.preprocess(Image.open(image).convert('RGB'), return_tensors='pt')['pixel_values'].to(model.device, dtype=torch.float32)


    print(f"{{roles[1]}}: {{inp}}")
    inp = DEFAULT_IMAGE_TOKEN + '\\n' + inp
    conv.append_message(conv.roles[0], inp)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors='pt').unsqueeze(0).to(model.device)
    stop_str = conv.sep if conv.sep_style != SeparatorStyle.TWO else conv.sep2
    keywords = [stop_str]
    stopping_criteria = KeywordsStoppingCriteria(keywords, tokenizer, input_ids)

    with torch.inference_mode():
        output_ids = model.generate(
            input_ids,
            images=image_tensor,
            do_sample=True,
            temperature=0.2,
            max_new_tokens=1024,
            use_cache=True,
            stopping_criteria=[stopping_criteria])

    outputs = tokenizer.decode(output_ids[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    print(outputs)

if __name__ == '__main__':
    main()
'''


def environment():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("original_api")
    tokenizer = tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer")
    tower = tiny_llava.build_tiny_clip_tower(root / "clip")
    return {"root": root, "tower": tower, "image": tiny_llava.write_test_image(root / "extreme_ironing.png"),
            "llava": tiny_llava.build_tiny_llava_llama(root / "checkpoints" / "llava-v1.5-tiny", tokenizer, tower)}


def test_load_pretrained_model_takes_the_original_call_forms(dirs):
    path = dirs["llava"]
    name = get_model_name_from_path(path)
    assert name == "llava-v1.5-tiny"
    calls = [
        ((path, None, name, False, False), dict(device="cpu")),  # predict.py, serve/cli.py
        ((path, None, name), {}),  # eval/model_vqa*.py (device: "cuda" when there is a GPU)
        ((path, None, name), dict(device_map="cpu")),  # scripts/merge_lora_weights.py
        ((path, None, name, False, False), dict(padding_side="left")),  # eval/eval_mmlu.py
        ((), dict(model_path=path, model_base=None, model_name=name, load_8bit=False, load_4bit=False,
                  device_map="auto", device="cpu", padding_side="right", merge=False)),
        ((path,), dict(device_map={"": "cpu"})),
    ]
    for args, kwargs in calls:
        tokenizer, model, processor, context_len = load_pretrained_model(*args, **kwargs)
        assert set(processor) == {"image", "video"} and processor["video"] is None
        assert isinstance(processor["image"], CLIPImageProcessor)
        assert processor["image"] is model.get_image_tower().image_processor
        assert context_len == 256 and not model.training
        assert tokenizer.padding_side == kwargs.get("padding_side", "right")
        if not torch.cuda.is_available():
            assert model.device.type == "cpu"


@pytest.mark.parametrize("kwargs, message", [
    (dict(load_4bit=True), r"load_4bit=True: 8-/4-bit loading needs bitsandbytes and a CUDA GPU"),
    (dict(load_8bit=True), r"load_8bit=True: 8-/4-bit loading needs bitsandbytes and a CUDA GPU"),
    (dict(device_map="balanced"), r"device_map='balanced': moellava loads the whole model onto one device"),
    (dict(device_map={"model": "cpu", "lm_head": "cpu"}), r"loads the whole model onto one device"),
    (dict(device_map="cpu", device="cuda:0"), r"device_map='cpu' and device='cuda:0' disagree"),
    (dict(use_flash_attn=True), r"got arguments it does not take: \['use_flash_attn'\]"),
])
def test_what_this_build_cannot_do_is_refused_clearly(dirs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_pretrained_model(dirs["llava"], None, "name", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_refused(dirs):
    with pytest.raises(ValueError, match=r"device='cuda', but no CUDA GPU is visible here: use device='cpu'"):
        load_pretrained_model(dirs["llava"], None, "name", False, False, device="cuda")


def test_the_readme_snippet_runs(dirs, toy_tokenizer_dir, tmp_path):
    """predict.py on a published-layout MoE-LLaVA-Phi2 checkpoint (its `phi` template)."""
    tokenizer_dir = toy_tokenizer_dir("phi")
    # A vocabulary exactly the tokenizer's: a random model could otherwise sample rows no text decodes to.
    tokenizer = load_tokenizer(tokenizer_dir)
    model_path = tmp_path / "MoE-LLaVA-Phi2-2.7B-4e"
    tensors = published_layout.write_published_checkpoint(
        model_path, "phi", tower_kind="clip", tower_dir=dirs["tower"], tower_stored=True, weights="pytorch_model.bin",
        tokenizer_dir=tokenizer_dir, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    # An answer that ends at once (max_new_tokens is 1024): every position's final hidden state is the final
    # norm's bias, and only the eos row of the head points along it.
    bias = tensors["model.final_layernorm.bias"]
    tensors["model.final_layernorm.weight"] = torch.zeros_like(bias)
    tensors["lm_head.weight"] = torch.zeros_like(tensors["lm_head.weight"])
    tensors["lm_head.weight"][tokenizer.eos_token_id] = 100 * bias
    torch.save(tensors, model_path / "pytorch_model.bin")
    script = tmp_path / "predict.py"
    script.write_text(README_SNIPPET.format(image=dirs["image"], model_path=str(model_path)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment(),
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if not line.startswith("[20")]  # DeepSpeed logs to stdout
    assert lines == ["ASSISTANT: What is unusual about this image?", ""]  # the question, then the (empty) answer


def test_disable_torch_init_skips_the_initialisation_of_linear_and_layernorm(monkeypatch):
    for layer_class in (torch.nn.Linear, torch.nn.LayerNorm):  # restored after the test
        monkeypatch.setattr(layer_class, "reset_parameters", layer_class.reset_parameters)
    linear = torch.nn.Linear(8, 8)
    before = linear.weight.detach().clone()
    linear.reset_parameters()
    assert not torch.equal(linear.weight, before)
    disable_torch_init()
    before = linear.weight.detach().clone()
    linear.reset_parameters()
    norm = torch.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.fill_(3.0)
    norm.reset_parameters()
    assert torch.equal(linear.weight, before) and torch.equal(norm.weight, torch.full((8,), 3.0))


def test_get_model_name_from_path():
    assert get_model_name_from_path("LanguageBind/MoE-LLaVA-Phi2-2.7B-4e") == "MoE-LLaVA-Phi2-2.7B-4e"
    assert get_model_name_from_path("./checkpoints/llavaphi-2.7b-finetune-moe/checkpoint-500/") == (
        "llavaphi-2.7b-finetune-moe_checkpoint-500")


def test_entry_points_accept_local_rank(dirs):
    for flag in (["--local_rank=0"], ["--local-rank", "1"]):
        assert cli.parse_args(["--model-path", "m", "--image-file", "i.png", *flag]).local_rank in (0, 1)
        assert doctor.parse_args(["--model-path", "m", "--version", "phi", *flag]).local_rank in (0, 1)
    # As the original runs it: `deepspeed --include localhost:0 moellava/serve/cli.py ...` (a script path).
    run = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "moellava", "serve", "cli.py"), "--local_rank=0",
                          "--model-path", dirs["llava"], "--image-file", str(dirs["root"] / "missing.png")],
                         capture_output=True, text=True, env=environment(), timeout=300)
    assert run.returncode == 1 and f"--image-file {dirs['root'] / 'missing.png'}: no such file." in run.stderr


class _Images(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture()
def image_server(dirs):
    handler = lambda *args, **kwargs: _Images(*args, directory=str(dirs["root"]), **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_cli_reads_an_image_url(dirs, image_server):
    name = Path(dirs["image"]).name
    from_url, from_file = cli.load_image(f"{image_server}/{name}"), cli.load_image(dirs["image"])
    assert from_url.size == from_file.size and from_url.tobytes() == from_file.tobytes()
    with pytest.raises(ValueError, match=rf"--image-file {image_server}/nothing.png: the server answered 404"):
        cli.load_image(f"{image_server}/nothing.png")
    closed = image_server.rsplit(":", 1)[0] + ":9"  # the discard port: nothing listens
    with pytest.raises(ValueError, match=rf"--image-file {closed}/{name} cannot be downloaded"):
        cli.load_image(f"{closed}/{name}")
    (dirs["root"] / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="is not an image file that PIL can read"):
        cli.load_image(f"{image_server}/notes.txt")


def test_cli_4bit_and_8bit_say_what_they_need(dirs):
    for flag in ("--load-4bit", "--load-8bit"):
        with pytest.raises(ValueError, match="needs bitsandbytes and a CUDA GPU"):
            cli.main(["--model-path", dirs["llava"], "--image-file", dirs["image"], "--query", "hi", flag])
    # The image is checked first, before anything about the model.
    with pytest.raises(ValueError, match="no such file"):
        cli.main(["--model-path", dirs["llava"], "--image-file", "missing.png", "--query", "hi", "--load-4bit"])
