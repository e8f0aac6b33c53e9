"""QWenTokenizer and Arcade100kTokenizer: official ids and algorithm, special tokens, round trips, AutoTokenizer."""

import base64
import json
import pickle
import random
import unicodedata

import pytest
import tiktoken
from transformers import AutoTokenizer

from moellava.tokenization import Arcade100kTokenizer, QWenTokenizer
from moellava.tokenization.arcade100k import ARCADE100K_SPECIAL_TOKENS
from moellava.tokenization.toy import build_toy_tokenizer

# Written out here, not imported, so the reference below is independent of the code under test.
OFFICIAL_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
OFFICIAL_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def official_qwen_encoding(rank_file):
    """The official Qwen algorithm: tiktoken over the rank file, specials numbered after the ranks."""
    ranks = {}
    for line in open(rank_file, "rb").read().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    specials = {token: len(ranks) + i for i, token in enumerate(OFFICIAL_QWEN_SPECIALS)}
    return tiktoken.Encoding("qwen-reference", pat_str=OFFICIAL_QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def official_qwen_ids(encoding, text):
    return encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")


_PIECES = [
    "Hello", "world", "USER:", "ASSISTANT:", " the", "cat's", "I'LL", "we're", "don't", "A.I.", "e-mail",
    "12", "2024", "3.14159", "1,000,000", "007", "你好", "世界", "日本語のテキスト", "한국어", "Привет", "Ελλάδα",
    "مرحبا", "🙂", "👍🏽", "→", "∑x²", "café", "cafe\u0301", "Å", "A\u030a", "ﬁ", "\t", "\n", "\r\n", "  ", "    ",
    "\n\n", " \n ", "<image>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>",
    "<|extra_205|>", "<|endoftext", "|>", "<s>", "</s>", "(", ")", "[", "]", "{", "}", "!!", "??", "...", "#", "@",
    "$", "%", "`code`", "x=1;y=2", "def f():", "\u00a0", "\u200b", "\u3000", "Ω", "ǅ", "ß", "İstanbul",
]


def varied_strings(n, seed=0):
    """Seeded mixtures of words, digits, unicode (incl. non-NFC forms), whitespace runs, newlines, specials."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            roll = rng.random()
            if roll < 0.55:
                parts.append(rng.choice(_PIECES))
            elif roll < 0.7:
                parts.append(str(rng.randint(0, 10**rng.randint(1, 9))))
            elif roll < 0.85:
                parts.append(rng.choice([" ", "  ", "\n", "\t", " \n", "\n\n\n", "   \t"]))
            else:
                parts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 4))))
        out.append(rng.choice(["", " "]).join(parts))
    return out


# --- QWen on the real vocabulary ------------------------------------------------------------------------
def test_qwen_real_vocab_special_ids(real_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir("qwen"), use_fast=False)
    assert type(tokenizer) is QWenTokenizer
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>",
                                           "<|extra_1|>", "<|extra_204|>"])
    assert ids == [151643, 151644, 151645, 151646, 151647, 151850]
    assert len(tokenizer) == 151851
    # No bos/eos/unk/pad until the family rules set them; nothing is added around the text.
    assert tokenizer.special_tokens_map == {}
    assert tokenizer("Hello world").input_ids == tokenizer.encode("Hello world", add_special_tokens=True)


def test_qwen_real_vocab_matches_official_algorithm(real_tokenizer_dir, real_qwen_tokenizer):
    reference = official_qwen_encoding(real_tokenizer_dir("qwen") / "qwen.tiktoken")
    tokenizer = real_qwen_tokenizer
    texts = varied_strings(400)
    mismatches = [t for t in texts if tokenizer(t).input_ids != official_qwen_ids(reference, t)]
    assert mismatches == []
    # Known ids of the official vocabulary (Qwen chat markup and common words).
    assert tokenizer("<|im_start|>system\nHello world<|im_end|>").input_ids == [151644, 8948, 198, 9707, 1879, 151645]
    assert tokenizer("user").input_ids == [872]
    assert tokenizer("assistant").input_ids == [77091]
    assert tokenizer("你好").input_ids == [108386]
    # Digits are split one by one; specials written in text are special.
    assert tokenizer("2024").input_ids == [17, 15, 17, 19]
    assert tokenizer("A cat.<|endoftext|>USER").input_ids[-3:-1] == [13, 151643]
    # NFC: a decomposed "é" encodes like the composed one.
    assert tokenizer("cafe\u0301").input_ids == tokenizer("café").input_ids


def test_qwen_real_vocab_decode(real_qwen_tokenizer):
    tokenizer = real_qwen_tokenizer
    for text in varied_strings(100, seed=1):
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
        assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids)) == tokenizer.decode(ids)
    ids = tokenizer("你好<|endoftext|>").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "你好"
    # A byte token that holds part of a UTF-8 character decodes with replacement, like the official tokenizer.
    partial = tokenizer.convert_tokens_to_ids("你".encode("utf-8")[:2])
    assert tokenizer.decode([partial]) == "\ufffd"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.decode([len(tokenizer)])


# --- QWen on the toy vocabulary -------------------------------------------------------------------------
@pytest.fixture()
def toy_qwen(toy_tokenizer_dir):
    return AutoTokenizer.from_pretrained(toy_tokenizer_dir("qwen"), use_fast=False)


def test_qwen_toy_matches_official_algorithm(toy_tokenizer_dir, toy_qwen):
    reference = official_qwen_encoding(toy_tokenizer_dir("qwen") / "qwen.tiktoken")
    for text in varied_strings(200, seed=2):
        assert toy_qwen(text).input_ids == official_qwen_ids(reference, text), text
        assert toy_qwen.decode(toy_qwen(text).input_ids) == unicodedata.normalize("NFC", text)
    num_ranks = len((toy_tokenizer_dir("qwen") / "qwen.tiktoken").read_text().splitlines())
    assert toy_qwen.convert_tokens_to_ids("<|endoftext|>") == num_ranks
    assert toy_qwen.convert_tokens_to_ids("<|extra_0|>") == num_ranks + 3
    assert len(toy_qwen) == num_ranks + 208


def test_qwen_add_special_tokens_accepts_only_its_own(toy_qwen):
    size = len(toy_qwen)
    assert toy_qwen.add_special_tokens({"unk_token": "<|extra_0|>", "eos_token": "<|endoftext|>"}) == 0
    assert len(toy_qwen) == size
    assert toy_qwen.unk_token_id == toy_qwen.convert_tokens_to_ids("<|extra_0|>")
    with pytest.raises(ValueError, match=r"cannot use '<pad>' as a special token.*<\|extra_0\|>"):
        toy_qwen.add_special_tokens({"pad_token": "<pad>"})
    assert toy_qwen.pad_token is None  # a refused call changes nothing
    with pytest.raises(ValueError, match="cannot use '<im_patch>'"):
        toy_qwen.add_special_tokens({"additional_special_tokens": ["<|extra_1|>", "<im_patch>"]})
    with pytest.raises(ValueError, match="cannot use 'hello'"):
        toy_qwen.add_tokens(["hello"])
    assert len(toy_qwen) == size


def test_qwen_save_pretrained_round_trip(toy_tokenizer_dir, toy_qwen, tmp_path):
    toy_qwen.add_special_tokens({"unk_token": "<|extra_0|>", "eos_token": "<|endoftext|>"})
    toy_qwen.pad_token = toy_qwen.unk_token
    toy_qwen.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "QWenTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
    assert (tmp_path / "qwen.tiktoken").read_bytes() == (toy_tokenizer_dir("qwen") / "qwen.tiktoken").read_bytes()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is QWenTokenizer
    assert (reloaded.unk_token, reloaded.eos_token, reloaded.pad_token) == ("<|extra_0|>", "<|endoftext|>",
                                                                             "<|extra_0|>")
    for text in varied_strings(50, seed=3):
        assert reloaded(text).input_ids == toy_qwen(text).input_ids


@pytest.mark.parametrize("family, cls", [("qwen", QWenTokenizer), ("stablelm", Arcade100kTokenizer)])
@pytest.mark.parametrize("use_fast", [True, False])
def test_autotokenizer_resolves_official_class_names_without_remote_code(toy_tokenizer_dir, family, cls, use_fast):
    folder = toy_tokenizer_dir(family)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "auto_map" in config  # the official entry pointing at remote code that is not in the folder
    assert not list(folder.glob("*.py"))
    assert type(AutoTokenizer.from_pretrained(folder, use_fast=use_fast)) is cls


def test_tiktoken_rank_file_errors(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text(
        f"{base64.b64encode(b'a').decode()} 0\n{base64.b64encode(b'b').decode()} 2\n")
    with pytest.raises(ValueError, match=r"ranks must be the integers 0\.\.1"):
        QWenTokenizer(str(tmp_path / "qwen.tiktoken"))
    (tmp_path / "qwen.tiktoken").write_text("YQ== 0 extra\n")
    with pytest.raises(ValueError, match=r"qwen.tiktoken:1: expected 'base64\(token\) rank'"):
        QWenTokenizer(str(tmp_path / "qwen.tiktoken"))


# --- Arcade100k -------------------------------------------------------------------------------------------
def test_arcade100k_special_ids_on_cl100k_stand_in(real_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir("arcade100k"), use_fast=False)
    assert type(tokenizer) is Arcade100kTokenizer
    expected = {token: 100257 + i for i, token in enumerate(ARCADE100K_SPECIAL_TOKENS)}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in ARCADE100K_SPECIAL_TOKENS} == expected
    assert (expected["<|endoftext|>"], expected["<|reg0|>"], expected["<|extra0|>"]) == (100257, 100280, 100288)
    assert len(tokenizer) == 100289
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == 100257
    for text in varied_strings(100, seed=4):
        assert tokenizer.decode(tokenizer(text).input_ids) == unicodedata.normalize("NFC", text)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.decode([100256])  # the unused id between the ranks and the specials


def test_arcade100k_refuses_to_add_tokens(toy_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(toy_tokenizer_dir("stablelm"))
    size = len(tokenizer)
    message = (r"Arcade100kTokenizer cannot add tokens; choose one of its own special tokens, "
               r"e\.g\. unk_token='<\|reg0\|>'")
    with pytest.raises(ValueError, match=message):
        tokenizer.add_special_tokens({"unk_token": "<|reg0|>"})
    with pytest.raises(ValueError, match=message):
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    with pytest.raises(ValueError, match=message):
        tokenizer.add_tokens(["hello"], special_tokens=True)
    assert tokenizer.unk_token is None and tokenizer.pad_token == "<|endoftext|>" and len(tokenizer) == size
    tokenizer.unk_token = "<|reg0|>"  # assigning one of its own special tokens works
    assert tokenizer.unk_token_id == tokenizer.convert_tokens_to_ids("<|reg0|>")
    tokenizer.unk_token = "<|not_a_token|>"
    with pytest.raises(ValueError, match=r"'<\|not_a_token\|>' is not a token of Arcade100kTokenizer"):
        tokenizer.unk_token_id


def test_arcade100k_toy_ids_digits_and_round_trip(toy_tokenizer_dir, tmp_path):
    folder = toy_tokenizer_dir("stablelm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    num_ranks = len((folder / "arcade100k.tiktoken").read_text().splitlines())
    assert tokenizer.eos_token_id == num_ranks + 1  # "specials start at len(ranks) + 1"
    assert tokenizer.convert_tokens_to_ids("<|reg0|>") == num_ranks + 24
    assert len(tokenizer) == num_ranks + 33
    digits = tokenizer("x 31415 y").input_ids
    assert tokenizer.convert_ids_to_tokens(digits)[1:-1] == [b" ", b"3", b"1", b"4", b"1", b"5"]
    tokenizer.unk_token = "<|reg0|>"
    tokenizer.pad_token = "<|reg0|>"
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "Arcade100kTokenizer"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is Arcade100kTokenizer
    assert (reloaded.unk_token, reloaded.pad_token, reloaded.eos_token) == ("<|reg0|>", "<|reg0|>", "<|endoftext|>")
    for text in varied_strings(50, seed=5):
        assert reloaded(text).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize("family", ["qwen", "stablelm"])
def test_tiktoken_tokenizers_pickle(toy_tokenizers, family):
    # DataLoader workers started with spawn receive the tokenizer pickled.
    tokenizer = toy_tokenizers[family]
    copy = pickle.loads(pickle.dumps(tokenizer))
    text = "USER: <image>\nWhat is it?<|endoftext|>"
    assert copy(text).input_ids == tokenizer(text).input_ids
    assert (copy.unk_token_id, copy.pad_token_id) == (tokenizer.unk_token_id, tokenizer.pad_token_id)


# --- toy builders -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, cls_name", [("llama", "LlamaTokenizer"), ("mistral", "LlamaTokenizer"),
                                              ("phi", "CodeGenTokenizer"), ("qwen", "QWenTokenizer"),
                                              ("stablelm", "Arcade100kTokenizer")])
def test_toy_tokenizer_builds_deterministically_and_loads(toy_tokenizer_dir, tmp_path, family, cls_name):
    first = toy_tokenizer_dir(family)
    second = build_toy_tokenizer(family, tmp_path / "again")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(second, use_fast=False)
    assert type(tokenizer).__name__ == cls_name
    assert 300 <= len(tokenizer) <= 1000
    text = "USER: <image>\nWhat is in the image? ASSISTANT: 2 cats, café 你好 🙂."
    assert unicodedata.normalize("NFC", text) in tokenizer.decode(tokenizer(text).input_ids)


def test_toy_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no toy tokenizer for family 'gpt2'; choose one of llama, mistral"):
        build_toy_tokenizer("gpt2", tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_toy_tokenizer("qwen", tmp_path, vocab_size=100)
