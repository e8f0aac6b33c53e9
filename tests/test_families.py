"""Tokenizer family rules: the table, detection, load_tokenizer on tiny and real tokenizers, errors."""

import json
import shutil

import pytest
from transformers import AutoTokenizer, LlamaTokenizer, PretrainedConfig

from moellava.tokenization import (
    FAMILIES,
    apply_family_rules,
    detect_family,
    family_for_model_type,
    load_tokenizer,
)


def test_family_table():
    assert {name: (f.version, f.train_modules) for name, f in FAMILIES.items()} == {
        "llama": ("v1", ("gate_proj", "up_proj", "down_proj", "wg")),
        "mistral": ("mistral", ("gate_proj", "up_proj", "down_proj", "wg")),
        "qwen": ("qwen", ("mlp.w1", "mlp.w2", "mlp.c_proj", "wg")),
        "phi": ("phi", ("fc1", "fc2", "wg")),
        "stablelm": ("stablelm", ("gate_proj", "up_proj", "down_proj", "wg")),
    }
    assert FAMILIES["qwen"].add_special_tokens == {"unk_token": "<|extra_0|>", "eos_token": "<|endoftext|>"}
    assert FAMILIES["phi"].add_special_tokens == {"unk_token": "<|extra_0|>"}
    assert FAMILIES["stablelm"].assign_special_tokens == {"unk_token": "<|reg0|>"}
    assert not FAMILIES["stablelm"].add_special_tokens
    for name in ("llama", "mistral"):
        assert not FAMILIES[name].add_special_tokens and not FAMILIES[name].assign_special_tokens


@pytest.mark.parametrize("model_type, family", [
    ("llama", "llama"), ("llava_llama", "llama"), ("moe_llava_llama", "llama"),
    ("mistral", "mistral"), ("llava_mistral", "mistral"), ("moe_llava_mistral", "mistral"),
    ("qwen", "qwen"), ("llava_qwen", "qwen"), ("moe_llava_qwen", "qwen"),
    ("phi", "phi"), ("llava_phi", "phi"), ("moe_llava_phi", "phi"),
    ("stablelm", "stablelm"), ("stablelm_epoch", "stablelm"), ("llava_stablelm", "stablelm"),
    ("moe_llava_stablelm", "stablelm"),
])
def test_family_for_model_type(model_type, family):
    assert family_for_model_type(model_type) == family


def test_unknown_model_type_names_families_and_override():
    with pytest.raises(ValueError, match=r"model_type 'gpt2' does not belong to a known tokenizer family; "
                                         r"pass family=<one of llama, mistral, qwen, phi, stablelm>"):
        family_for_model_type("gpt2")


def _copy_with_config(src, dst, **config):
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_detect_family_sources(toy_tokenizer_dir, toy_tokenizers, tmp_path):
    # The tokenizer class (folder's tokenizer_config.json, or the loaded tokenizer) when there is no config.json.
    assert detect_family(toy_tokenizer_dir("qwen")) == "qwen"
    assert detect_family(toy_tokenizer_dir("phi")) == "phi"
    assert detect_family(toy_tokenizer_dir("stablelm")) == "stablelm"
    assert detect_family(toy_tokenizer_dir("mistral")) == "llama"  # a LlamaTokenizer alone says llama
    assert detect_family(tokenizer=toy_tokenizers["qwen"]) == "qwen"
    # config.json's model_type wins over the tokenizer class, whatever the folder is called.
    folder = _copy_with_config(toy_tokenizer_dir("mistral"), tmp_path / "llama-7b-qwen-phi", model_type="mistral")
    assert detect_family(folder, toy_tokenizers["llama"]) == "mistral"
    config = PretrainedConfig()
    config.model_type = "moe_llava_phi"
    assert detect_family(config) == "phi"


def test_detect_family_errors(toy_tokenizer_dir, tmp_path):
    folder = _copy_with_config(toy_tokenizer_dir("llama"), tmp_path / "odd", model_type="opt")
    with pytest.raises(ValueError, match=r"odd/config.json: model_type 'opt' does not belong .* pass family="):
        detect_family(folder)
    with pytest.raises(ValueError, match=r"cannot tell the tokenizer family of .* pass family="):
        detect_family(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"tokenizer class 'GPT2Tokenizer' does not belong .* pass family="):
        detect_family(tokenizer=AutoTokenizer.from_pretrained(toy_tokenizer_dir("phi"), tokenizer_type="gpt2",
                                                              use_fast=False))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_llama_and_mistral_as_loaded(toy_tokenizers, family):
    tokenizer = toy_tokenizers[family]
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0
    ids = tokenizer("A cat.</s>").input_ids
    assert ids[0] == 1 and ids[-1] == 2  # bos added, and </s> written in text is the eos token
    assert tokenizer("A cat.", add_special_tokens=False).input_ids[-1] != 2


def test_legacy_setting_of_llama_and_mistral_folders(toy_tokenizers):
    # Vicuna-v1.5 style (legacy false): no dummy-prefix space after a special token; Mistral-v0.1 (legacy true): one.
    llama = toy_tokenizers["llama"].tokenize("a.</s>USER")
    mistral = toy_tokenizers["mistral"].tokenize("a.</s>USER")
    assert llama[llama.index("</s>") + 1].startswith("▁") is False
    assert mistral[mistral.index("</s>") + 1].startswith("▁")


def test_rules_need_a_tokenizer_loaded_from_its_folder(toy_tokenizer_dir):
    # transformers 4.31: a LlamaTokenizer built from tokenizer.model alone does not read "</s>" in text as eos.
    bare = LlamaTokenizer(vocab_file=str(toy_tokenizer_dir("llama") / "tokenizer.model"))
    with pytest.raises(ValueError, match=r"does not read '</s>' in text as the eos token .*\(from_pretrained\)"):
        apply_family_rules(bare, "llama")


def test_qwen_rules_on_toy(toy_tokenizers, toy_tokenizer_dir):
    tokenizer = toy_tokenizers["qwen"]
    raw = AutoTokenizer.from_pretrained(toy_tokenizer_dir("qwen"))
    assert len(tokenizer) == len(raw)  # nothing added: both tokens already exist
    assert tokenizer.unk_token_id == tokenizer.pad_token_id == raw.convert_tokens_to_ids("<|extra_0|>")
    assert tokenizer.eos_token_id == raw.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.bos_token is None
    assert tokenizer("A cat.").input_ids == raw("A cat.").input_ids  # adds no bos/eos


def test_phi_rules_on_toy(toy_tokenizers, toy_tokenizer_dir):
    raw = AutoTokenizer.from_pretrained(toy_tokenizer_dir("phi"), use_fast=False)
    tokenizer = toy_tokenizers["phi"]
    assert len(tokenizer) == len(raw) + 1
    assert tokenizer.unk_token_id == tokenizer.pad_token_id == len(raw)
    assert tokenizer("x<|extra_0|>", add_special_tokens=False).input_ids[-1] == len(raw)


def test_stablelm_rules_on_toy(toy_tokenizers, toy_tokenizer_dir):
    raw = AutoTokenizer.from_pretrained(toy_tokenizer_dir("stablelm"))
    tokenizer = toy_tokenizers["stablelm"]
    assert len(tokenizer) == len(raw)
    assert tokenizer.unk_token == tokenizer.pad_token == "<|reg0|>"
    assert tokenizer.pad_token_id == raw.convert_tokens_to_ids("<|reg0|>")
    assert tokenizer.eos_token_id == raw.eos_token_id
    with pytest.raises(ValueError, match="Arcade100kTokenizer cannot add tokens"):
        tokenizer.add_special_tokens({"unk_token": "<|reg1|>"})


def test_qwen_rules_on_real_vocab(real_qwen_tokenizer):
    tokenizer = real_qwen_tokenizer
    assert (tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (151646, 151643, 151646)
    assert tokenizer.bos_token is None and len(tokenizer) == 151851


def test_phi_rules_on_real_phi2(real_tokenizer_dir, real_phi2_tokenizer):
    raw = AutoTokenizer.from_pretrained(real_tokenizer_dir("phi2"), use_fast=False)
    assert len(raw) == 50295  # 50257 BPE entries + 38 added whitespace tokens
    assert raw.unk_token == raw.eos_token == "<|endoftext|>"
    tokenizer = real_phi2_tokenizer
    assert tokenizer.unk_token == "<|extra_0|>"
    assert tokenizer.unk_token_id == tokenizer.pad_token_id == 50295
    assert tokenizer.eos_token_id == 50256 and len(tokenizer) == 50296
    assert tokenizer("A cat.<|endoftext|>").input_ids == [32, 3797, 13, 50256]


def test_stablelm_rules_on_cl100k_stand_in(real_tokenizer_dir):
    tokenizer = load_tokenizer(real_tokenizer_dir("arcade100k"))
    assert (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (100280, 100280, 100257)


def test_llama_rules_on_real_llama2(real_llama2_tokenizer):
    tokenizer = real_llama2_tokenizer
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0
    assert tokenizer("A cat.</s>").input_ids == [1, 319, 6635, 29889, 2]


def test_load_tokenizer_options_and_override(toy_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(toy_tokenizer_dir("qwen"), model_max_length=77, padding_side="left")
    assert tokenizer.model_max_length == 77 and tokenizer.padding_side == "left"
    # family= overrides what the folder says (here a Mistral model folder name and a llama config).
    folder = _copy_with_config(toy_tokenizer_dir("mistral"), tmp_path / "m", model_type="llama")
    assert load_tokenizer(folder).unk_token == "<unk>"
    assert load_tokenizer(folder, family="mistral").pad_token_id == 0
    with pytest.raises(ValueError, match="unknown tokenizer family 'gpt'; known families: llama, mistral, qwen"):
        load_tokenizer(folder, family="gpt")
    # Wrong family for the tokenizer: the rules cannot be applied, and the error says so.
    with pytest.raises(ValueError, match=r"'<\|reg0\|>' is not a token of QWenTokenizer"):
        load_tokenizer(toy_tokenizer_dir("qwen"), family="stablelm")


@pytest.mark.parametrize("source", ["toy", "real"])
def test_phi_tokenizer_saved_after_the_rules_reloads_with_the_same_ids(source, toy_tokenizer_dir, real_tokenizer_dir, tmp_path):
    # transformers 4.31 never re-adds a token equal to the unk token: a checkpoint's tokenizer folder (unk =
    # the added <|extra_0|>) must still reload with <|extra_0|> at its saved id.
    folder = toy_tokenizer_dir("phi") if source == "toy" else real_tokenizer_dir("phi2")
    tokenizer = load_tokenizer(folder)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert len(reloaded) == len(tokenizer)
    assert reloaded.unk_token == reloaded.pad_token == "<|extra_0|>"
    assert reloaded.unk_token_id == tokenizer.unk_token_id
    assert reloaded("a<|extra_0|>b<|endoftext|>").input_ids == tokenizer("a<|extra_0|>b<|endoftext|>").input_ids
