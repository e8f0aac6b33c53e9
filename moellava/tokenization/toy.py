"""Tiny tokenizer folders for each family, built on the fly (tests, the demo, experiments without downloads).

`build_toy_tokenizer(family, out_dir)` writes a folder in the layout the real family ships, so
`AutoTokenizer.from_pretrained(out_dir)` / `load_tokenizer(out_dir)` behave as on the real folder:
  llama, mistral: SentencePiece BPE `tokenizer.model` (byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2, dummy prefix)
                  + tokenizer_config.json for LlamaTokenizer (Llama-2/Vicuna-v1.5 style; Mistral-7B-v0.1 style)
  phi:            GPT-2/CodeGen byte-level BPE `vocab.json` + `merges.txt` (`<|endoftext|>` last in the vocab)
                  + added whitespace tokens, like microsoft/phi-2
  qwen:           `qwen.tiktoken` ranks (256 single bytes, then learned merges in merge order)
                  + tokenizer_config.json naming QWenTokenizer with the official `auto_map`
  stablelm:       the same kind of ranks as `arcade100k.tiktoken` for Arcade100kTokenizer
The training corpus is generated here, deterministically; each build takes well under a second.
"""

import io
import json
import os
import random
from typing import Dict, List, Optional

from .qwen import QWEN_PATTERN, write_tiktoken_ranks

TOY_FAMILIES = ("llama", "mistral", "qwen", "phi", "stablelm")
DEFAULT_VOCAB_SIZE = 512

_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_WORDS = (
    "the a an is are was of to in on at for with and or not this that what which who how many color "
    "image picture photo cat dog man woman child car bus tree sky water table chair street house window "
    "red blue green black white yellow small large big old new left right top bottom near behind front "
    "there here it they he she we you see show describe count answer question sitting standing holding "
    "looking wearing playing running eating two three four five people animal food plate room light"
).split()
_UNICODE = ("café", "naïve", "über", "señor", "straße", "你好", "世界", "日本語", "привет", "ελληνικά", "🙂", "→")
_PUNCT = (".", ",", "?", "!", ":", ";", "(", ")", "'", '"', "-", "/")


def toy_corpus(num_lines: int = 600, seed: int = 0) -> List[str]:
    """Chat-like lines: the system prompt, USER/ASSISTANT turns, words, digits, punctuation, some unicode."""
    rng = random.Random(seed)
    lines = [_SYSTEM, "USER: <image>\nWhat is in the image? ASSISTANT: A cat."]
    for line in range(num_lines):
        if line % 20 == 0:
            lines.append(_SYSTEM)  # frequent enough to become few tokens, as in a real chat-tuned vocabulary
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 2024)))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_UNICODE))
        sentence = " ".join(words).capitalize() + rng.choice(_PUNCT[:4])
        roll = rng.random()
        if roll < 0.4:
            sentence = f"USER: {sentence} ASSISTANT: {' '.join(rng.choice(_WORDS) for _ in range(4))}."
            if roll < 0.15:
                # Rounds after the first follow the end-of-turn token with no space: "...</s>USER: ...".
                sentence += f"USER: {rng.choice(_WORDS)}? ASSISTANT: {rng.choice(_WORDS)}."
        elif roll < 0.5:
            sentence = sentence + "\n" + " " * rng.randint(1, 4) + rng.choice(_WORDS) + rng.choice(_PUNCT)
        lines.append(sentence)
    return lines


def build_toy_tokenizer(family: str, out_dir: str, *, vocab_size: Optional[int] = None) -> str:
    """Write a tiny tokenizer folder for `family` into `out_dir` (created if needed); returns `out_dir`.

    vocab_size: SentencePiece pieces (llama/mistral) or BPE tokens before special/added tokens (others).
    """
    if family not in TOY_FAMILIES:
        raise ValueError(f"no toy tokenizer for family {family!r}; choose one of {', '.join(TOY_FAMILIES)}")
    size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    if size < 300:
        raise ValueError(f"vocab_size={size} is too small: the byte alphabet alone takes 256 tokens; use >= 300")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if family in ("llama", "mistral"):
        _build_sentencepiece(family, out_dir, size)
    elif family == "phi":
        _build_codegen(out_dir, size)
    else:
        _build_tiktoken(family, out_dir, size)
    return out_dir


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --- llama / mistral: SentencePiece ----------------------------------------------------------------------
def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _build_sentencepiece(family: str, out_dir: str, size: int) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    # Llama's trainer settings, scaled down: BPE, byte fallback, digits split, whitespace kept as written.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(toy_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    if family == "llama":
        # As lmsys/vicuna-7b-v1.5 and meta-llama/Llama-2-7b-hf ship it.
        specials = {"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"),
                    "unk_token": _added_token("<unk>")}
        config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "legacy": False, "model_max_length": 4096, "pad_token": None, "padding_side": "right",
                  "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", **specials}
        special_map = {k: {key: v for key, v in tok.items() if key != "__type"} for k, tok in specials.items()}
    else:
        # As mistralai/Mistral-7B-v0.1 shipped it (legacy tokenization, plain-string special tokens).
        special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "legacy": True, "model_max_length": 32768, "pad_token": None, "sp_model_kwargs": {},
                  "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer", **special_map}
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special_map)


# --- byte-level BPE (phi, qwen, stablelm) ----------------------------------------------------------------
def _train_byte_bpe(size: int, pattern: Optional[str]):
    """Byte-level BPE trained with `tokenizers`; pre-split with `pattern` (tiktoken style) or GPT-2's regex."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if pattern is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    trainer = trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(toy_corpus(), trainer=trainer)
    return tokenizer


def _gpt2_unicode_to_byte() -> Dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table used by byte-level BPE files."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _merges(tokenizer) -> List[str]:
    return json.loads(tokenizer.to_str())["model"]["merges"]


def _build_codegen(out_dir: str, size: int) -> None:
    tokenizer = _train_byte_bpe(size, pattern=None)
    vocab = json.loads(tokenizer.to_str())["model"]["vocab"]
    vocab["<|endoftext|>"] = len(vocab)  # last regular id, as in GPT-2 (50256)
    _write_json(os.path.join(out_dir, "vocab.json"), vocab)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("".join(merge + "\n" for merge in _merges(tokenizer)))
    # phi-2 appends whitespace runs as added tokens: 31 down to 2 spaces, then 9 down to 2 tabs.
    runs = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
    _write_json(os.path.join(out_dir, "added_tokens.json"), {run: len(vocab) + i for i, run in enumerate(runs)})
    special_map = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special_map)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_prefix_space": False, "clean_up_tokenization_spaces": True, "model_max_length": 2048,
        "tokenizer_class": "CodeGenTokenizer", **special_map,
    })


def _tiktoken_ranks(size: int) -> Dict[bytes, int]:
    """Ranks in tiktoken's convention: every single byte, then each merge's bytes in merge order."""
    tokenizer = _train_byte_bpe(size, pattern=QWEN_PATTERN)
    to_byte = _gpt2_unicode_to_byte()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in _merges(tokenizer):
        left, right = merge.split(" ")
        token = bytes(to_byte[c] for c in left + right)
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


def _build_tiktoken(family: str, out_dir: str, size: int) -> None:
    ranks = _tiktoken_ranks(size)
    if family == "qwen":
        write_tiktoken_ranks(ranks, os.path.join(out_dir, "qwen.tiktoken"))
        # As Qwen/Qwen-1_8B ships it.
        config = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                  "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    else:
        write_tiktoken_ranks(ranks, os.path.join(out_dir, "arcade100k.tiktoken"))
        # As stabilityai/stablelm-2-1_6b ships it.
        config = {"model_max_length": 4096, "tokenizer_class": "Arcade100kTokenizer", "errors": "replace",
                  "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                  "auto_map": {"AutoTokenizer": ["tokenization_arcade100k.Arcade100kTokenizer", None]}}
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
