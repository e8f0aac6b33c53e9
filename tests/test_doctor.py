"""The tokenizer doctor: its report on every family (tiny and real tokenizers) and its data scan."""

import json
import re

import pytest
from PIL import Image

from moellava.tokenization import doctor

FAMILY_VERSION = {"llama": "v1", "mistral": "mistral", "qwen": "qwen", "phi": "phi", "stablelm": "stablelm"}
END_TOKEN = {"llama": "</s>", "mistral": "</s>", "qwen": "<|endoftext|>", "phi": "<|endoftext|>",
             "stablelm": "<|endoftext|>"}


def run_doctor(capsys, *argv):
    code = doctor.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def trained_texts(report):
    # Whether the space before an answer is trained depends on how the vocabulary merges it.
    return [text.lstrip() for text in re.findall(r"^  trained \[\d+:\d+\]: '(.*)'$", report, flags=re.M)]


@pytest.mark.parametrize("family", list(FAMILY_VERSION))
def test_doctor_on_toy_families(capsys, toy_tokenizer_dir, toy_tokenizers, family):
    code, out, _ = run_doctor(capsys, "--model-path", toy_tokenizer_dir(family), "--version", FAMILY_VERSION[family])
    assert code == 0, out
    tokenizer = toy_tokenizers[family]
    end = END_TOKEN[family]
    assert f"eos_token  {end!r} id {tokenizer.eos_token_id}" in out
    assert f"pad_token  {tokenizer.pad_token!r} id {tokenizer.pad_token_id}" in out
    adds_bos = family in ("llama", "mistral")
    assert ("adds in front: <s>(1)" in out) == adds_bos
    assert "adds at the end: (none)" in out
    assert f"sep2    {end!r}" in out
    # The example's two answers, each with its end token, are exactly the trained spans.
    assert trained_texts(out) == [f"A cat.{end}", f"Black.{end}"]
    assert out.rstrip().endswith("OK")
    can_add = {"llama": "yes", "mistral": "yes", "qwen": "no: QWenTokenizer cannot use",
               "stablelm": "no: Arcade100kTokenizer cannot add tokens",
               "phi": "no: add_special_tokens({'additional_special_tokens'"}[family]
    assert f"can add special tokens: {can_add}" in out


@pytest.mark.parametrize("name, version, facts", [
    ("qwen", "qwen", ["unk_token  '<|extra_0|>' id 151646", "eos_token  '<|endoftext|>' id 151643",
                      "pad_token  '<|extra_0|>' id 151646", "bos_token  not set", "adds in front: (none)"]),
    ("llama2", "v1", ["unk_token  '<unk>' id 0", "eos_token  '</s>' id 2", "adds in front: <s>(1)",
                      "sep2    '</s>'                         -> </s>(2)"]),
    ("phi2", "phi", ["unk_token  '<|extra_0|>' id 50295", "eos_token  '<|endoftext|>' id 50256",
                     "class: CodeGenTokenizer   family: phi (detected)   ids: 50296"]),
    ("arcade100k", "stablelm", ["unk_token  '<|reg0|>' id 100280", "pad_token  '<|reg0|>' id 100280",
                                "eos_token  '<|endoftext|>' id 100257"]),
])
def test_doctor_on_real_vocabularies(capsys, real_tokenizer_dir, name, version, facts):
    code, out, _ = run_doctor(capsys, "--model-path", real_tokenizer_dir(name), "--version", version)
    assert code == 0, out
    for fact in facts:
        assert fact in out
    end = "</s>" if version == "v1" else "<|endoftext|>"
    assert trained_texts(out) == [f"A cat.{end}", f"Black.{end}"]


def sample(sample_id, *turns, image=True):
    data = {"id": sample_id, "conversations": [{"from": who, "value": text} for who, text in turns]}
    if image:
        data["image"] = f"{sample_id}.jpg"
    return data


def write_data(folder, samples, missing=()):
    """The data file, with an image file for every image sample (except the `missing` ids)."""
    for item in samples:
        if "image" in item and item["id"] not in missing:
            Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / item["image"])
    path = folder / "data.json"
    path.write_text(json.dumps(samples))
    return path


def test_doctor_data_scan_reports_bad_samples_by_id(capsys, toy_tokenizer_dir, tmp_path):
    long_question = "<image>\n" + " ".join(["describe the picture"] * 80)
    samples = [
        sample("good-1", ("human", "<image>\nWhat is this?"), ("gpt", "A dog.")),
        sample("swapped-turns", ("human", "<image>\nHi"), ("human", "Hello?"), ("gpt", "Yes.")),
        sample("good-2", ("human", "Count them."), ("gpt", "Two."), ("human", "Colors?"), ("gpt", "Red."),
               image=False),
        sample("too-long", ("human", long_question), ("gpt", "A cat.")),
        sample("no-answer", ("human", "<image>\nWhat is this?")),
        sample("missing-placeholder", ("human", "What is this?"), ("gpt", "A bus.")),
    ]
    data = write_data(tmp_path, samples)
    code, out, _ = run_doctor(capsys, "--model-path", toy_tokenizer_dir("qwen"), "--version", "qwen",
                              "--data", data, "--model-max-length", 128, "--image-folder", tmp_path,
                              "--tokens-per-image", 4)
    assert code == 1
    assert "samples: 6   ok: 2   bad: 4" in out
    assert "bad conversation format: 1   ids: 'swapped-turns'" in out
    assert "cut by model_max_length: 1   ids: 'too-long'" in out
    assert "fully masked (nothing to train on): 1   ids: 'no-answer'" in out
    assert "image files and <image> placeholders disagree: 1   ids: 'missing-placeholder'" in out
    assert "id 'swapped-turns' (#1): turn 1 is from 'human' but 'gpt' was expected" in out
    assert "good-1'" not in out.split("== Data")[1].split("samples:")[1]
    # The first sample of the data is the one shown, with its answer trained.
    assert "== First sample of --data (id 'good-1')" in out
    assert trained_texts(out) == ["A dog.<|endoftext|>"]
    assert "PROBLEM: bad samples in the data" in out


def test_doctor_data_scan_clean_data_and_limit(capsys, toy_tokenizer_dir, tmp_path):
    samples = [sample(f"s{i}", ("human", "<image>\nWhat is it?"), ("gpt", f"Thing {i}.")) for i in range(3)]
    samples.append(sample("bad", ("gpt", "Orphan answer."), ("gpt", "Another.")))
    data = write_data(tmp_path, samples)
    images = ["--image-folder", tmp_path, "--tokens-per-image", 4]
    code, out, _ = run_doctor(capsys, "--model-path", toy_tokenizer_dir("phi"), "--version", "phi",
                              "--data", data, "--limit", 3, *images)
    assert code == 0, out
    assert "samples: 3   ok: 3   bad: 0" in out
    code, out, _ = run_doctor(capsys, "--model-path", toy_tokenizer_dir("phi"), "--version", "phi", "--data", data,
                              *images)
    assert code == 1 and "ids: 'bad'" in out


def test_doctor_reports_answers_it_cannot_locate(capsys, toy_tokenizer_dir, toy_tokenizers, tmp_path):
    # transformers 4.31 with legacy=false (Vicuna-v1.5's setting) drops the dummy-prefix space of the first
    # piece after a special token; when that bare piece is not in the vocabulary, the text becomes <unk>.
    tokenizer = toy_tokenizers["llama"]
    word = next(w for w in ("answers", "questions", "picture", "animal", "standing", "holding", "color")
                if tokenizer.unk_token_id in tokenizer("</s>" + w, add_special_tokens=False).input_ids)
    data = write_data(tmp_path, [
        sample("ok", ("human", "<image>\nWhat is it?"), ("gpt", "A cat.")),
        sample("eos-in-text", ("human", "<image>\nWhat is it?"), ("gpt", f"A cat.</s>{word}")),
    ])
    code, out, _ = run_doctor(capsys, "--model-path", toy_tokenizer_dir("llama"), "--version", "v1", "--data", data,
                              "--image-folder", tmp_path, "--tokens-per-image", 4)
    assert code == 1
    assert "answer spans not located exactly: 1   ids: 'eos-in-text'" in out
    assert "id 'eos-in-text' (#1): the tokens located for the answer decode to" in out


def test_doctor_wrong_template_for_the_tokenizer(capsys, toy_tokenizer_dir):
    code, out, _ = run_doctor(capsys, "--model-path", toy_tokenizer_dir("qwen"), "--version", "v1")
    assert code == 1
    assert "PROBLEM: the tokenizer does not fit --version v1" in out
    assert "ends answers with '</s>'" in out


def test_doctor_bad_arguments(capsys, toy_tokenizer_dir, tmp_path):
    code, _, err = run_doctor(capsys, "--model-path", toy_tokenizer_dir("qwen"), "--version", "nope")
    assert code == 2 and "Unknown conversation template --version 'nope'" in err
    code, _, err = run_doctor(capsys, "--model-path", toy_tokenizer_dir("qwen"), "--version", "qwen",
                              "--family", "gpt")
    assert code == 2 and "unknown tokenizer family 'gpt'" in err
    (tmp_path / "data.json").write_text(json.dumps({"id": 1}))
    code, _, err = run_doctor(capsys, "--model-path", toy_tokenizer_dir("qwen"), "--version", "qwen",
                              "--data", tmp_path / "data.json")
    assert code == 2 and "expected a list of samples" in err


def test_doctor_agrees_with_training_on_images_and_expanded_length(capsys, toy_tokenizer_dir, tmp_path):
    """Missing and corrupt images, and an answer cut only once the image becomes 576 tokens: what training
    refuses, the doctor reports."""
    samples = [
        sample("fine", ("human", "<image>\nWhat is it?"), ("gpt", "A cat.")),
        sample("gone", ("human", "<image>\nWhat is it?"), ("gpt", "A dog.")),
        sample("broken", ("human", "<image>\nWhat is it?"), ("gpt", "A bird.")),
        sample("long", ("human", "<image>\n" + "word " * 60), ("gpt", "A fish.")),
    ]
    data = write_data(tmp_path, samples, missing=("gone",))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    args = ["--model-path", toy_tokenizer_dir("qwen"), "--version", "qwen", "--data", data,
            "--image-folder", tmp_path, "--model-max-length", 700]
    code, _, err = run_doctor(capsys, *args)
    assert code == 2 and "pass --image-tower (the tower training uses) or --tokens-per-image N" in err
    code, out, _ = run_doctor(capsys, *args, "--tokens-per-image", 576)
    assert code == 1
    assert "samples: 4   ok: 1   bad: 3" in out
    assert "image file missing: 1   ids: 'gone'" in out
    assert "image file cannot be decoded: 1   ids: 'broken'" in out
    assert "cut by model_max_length: 1   ids: 'long'" in out
    assert "each of its 1 image(s) counted as 576 tokens" in out
    # With the image counted as one token, the same sample would (wrongly) fit.
    code, out, _ = run_doctor(capsys, *args, "--tokens-per-image", 1)
    assert "cut by model_max_length" not in out


def test_doctor_counts_image_tokens_from_the_tower_config(capsys, toy_tokenizer_dir, tmp_path):
    from moellava.demo import models

    tower = models.build_tower(str(tmp_path / "tower"), models.TowerSize(image_size=32, patch_size=8))
    data = write_data(tmp_path, [sample("one", ("human", "<image>\nWhat is it?"), ("gpt", "A cat."))])
    code, out, _ = run_doctor(capsys, "--model-path", toy_tokenizer_dir("qwen"), "--version", "qwen", "--data",
                              data, "--image-folder", tmp_path, "--image-tower", tower)
    assert code == 0, out
    text_tokens = int(re.search(r"rendered \((\d+) tokens\)", out).group(1))
    assert f"max {text_tokens - 1 + 16}," in out  # a 4x4 patch grid: 16 tokens
