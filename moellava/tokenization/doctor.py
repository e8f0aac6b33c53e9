"""Tokenizer doctor: what a tokenizer does with a conversation template, before a GPU-day is spent.

    python -m moellava.tokenization.doctor --model-path DIR --version V [--family F] [--data FILE.json]
        [--model-max-length N] [--limit N]

Prints: whether the tokenizer adds bos/eos; the ids of bos/eos/unk/pad; whether it can add special tokens;
how the template's separators tokenize; one rendered sample (the first of --data, else a built-in one) with
its trained spans marked. With --data (a LLaVA-format JSON list) it preprocesses every sample exactly as
training does and reports the samples that cannot be trained on (mismatched, truncated, fully masked,
badly formatted), by id. Exit code: 0 when all is well, 1 when a problem was found, 2 on bad arguments.
"""

import argparse
import copy
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from moellava import conversation as conversation_lib
from moellava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moellava.train.preprocess import (
    ConversationFormatError,
    PreprocessError,
    TokenizerTemplateError,
    find_trained_spans,
    preprocess,
    preprocess_multimodal,
)

from .families import detect_family, load_tokenizer

EXAMPLE_SAMPLE = {
    "id": "doctor-example",
    "image": "example.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What color is it?"},
        {"from": "gpt", "value": "Black."},
    ],
}
PROBE_TEXT = "Hello world"
PROBE_TOKEN = "<|doctor_probe|>"
MAX_IDS_LISTED = 20
MAX_REASONS_SHOWN = 5
# Names of PreprocessError kinds in the report.
KIND_NAMES = {
    "mismatch": "answer spans not located exactly",
    "truncated": "truncated by model_max_length",
    "no_labels": "fully masked (nothing to train on)",
    "format": "bad conversation format",
    "images": "image files and <image> placeholders disagree",
}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moellava.tokenization.doctor",
        description="Show what a tokenizer does with a conversation template, and scan a dataset for samples "
                    "that cannot be trained on.",
    )
    parser.add_argument("--model-path", required=True, help="folder with the tokenizer (and config.json)")
    parser.add_argument("--version", required=True, help="conversation template, as --version in training")
    parser.add_argument("--family", default=None, help="tokenizer family rules to apply (default: detected)")
    parser.add_argument("--data", default=None, help="LLaVA-format JSON list to scan")
    parser.add_argument("--model-max-length", type=int, default=None,
                        help="truncation length, as --model_max_length in training (default: the tokenizer's)")
    parser.add_argument("--limit", type=int, default=None, help="scan only the first N samples of --data")
    return parser.parse_args(argv)


# --- presentation helpers ------------------------------------------------------------------------------
def show_token(tokenizer, token_id: int) -> str:
    """A token as its vocabulary piece, escaped so whitespace and partial UTF-8 stay visible."""
    if token_id == IMAGE_TOKEN_INDEX:
        return DEFAULT_IMAGE_TOKEN
    token = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(token, bytes):  # tiktoken: show spaces like SentencePiece's ▁ and GPT-2's Ġ do
        token = token.decode("utf-8", errors="backslashreplace").replace(" ", "␣")
    return repr(str(token))[1:-1]


def show_ids(tokenizer, ids: Sequence[int]) -> str:
    return " ".join(f"{show_token(tokenizer, i)}({i})" for i in ids) or "(none)"


def show_special(tokenizer, name: str) -> str:
    token = tokenizer.special_tokens_map.get(name)
    if token is None:
        return "not set"
    return f"{token!r} id {tokenizer.convert_tokens_to_ids(token)}"


def decode_with_images(tokenizer, ids: Sequence[int]) -> str:
    parts, current = [], []
    for token_id in ids:
        if token_id == IMAGE_TOKEN_INDEX:
            parts.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token_id)
    parts.append(tokenizer.decode(current))
    return DEFAULT_IMAGE_TOKEN.join(parts)


def marked_tokens(tokenizer, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """Tokens separated by spaces, trained spans inside [[ ]]."""
    out = []
    for i, (token_id, label) in enumerate(zip(input_ids, labels)):
        trained = label != IGNORE_INDEX
        before = labels[i - 1] != IGNORE_INDEX if i > 0 else False
        after = labels[i + 1] != IGNORE_INDEX if i + 1 < len(labels) else False
        text = show_token(tokenizer, token_id)
        if trained and not before:
            text = "[[" + text
        if trained and not after:
            text = text + "]]"
        out.append(text)
    return " ".join(out)


# --- report sections -----------------------------------------------------------------------------------
def report_tokenizer(tokenizer, family: str, family_source: str) -> List[str]:
    """Print the tokenizer's behaviour; returns the warnings found."""
    warnings = []
    print("== Tokenizer")
    print(f"class: {type(tokenizer).__name__}   family: {family} ({family_source})   ids: {len(tokenizer)}   "
          f"model_max_length: {tokenizer.model_max_length}   padding_side: {tokenizer.padding_side}")
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        print(f"{name:10s} {show_special(tokenizer, name)}")
    with_special = tokenizer(PROBE_TEXT).input_ids
    plain = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    start = next((k for k in range(len(with_special) - len(plain) + 1)
                  if with_special[k:k + len(plain)] == plain), None)
    if start is None:
        print(f"encoding {PROBE_TEXT!r}: {show_ids(tokenizer, with_special)} (does not contain the plain encoding)")
    else:
        print(f"adds in front: {show_ids(tokenizer, with_special[:start])}   "
              f"adds at the end: {show_ids(tokenizer, with_special[start + len(plain):])}")
    eos = tokenizer.special_tokens_map.get("eos_token")
    if eos is not None:
        in_text = tokenizer(eos, add_special_tokens=False).input_ids
        print(f"eos written in text: {show_ids(tokenizer, in_text)}")
        if in_text != [tokenizer.eos_token_id]:
            warnings.append(f"eos {eos!r} written in text is not the eos token: templates that end answers with "
                            "it will not stop generation")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        warnings.append("pad is eos: padding masks would hide every end of answer")
    print(f"can add special tokens: {probe_add_special_tokens(tokenizer)}")
    return warnings


def probe_add_special_tokens(tokenizer) -> str:
    probe = copy.deepcopy(tokenizer)  # the real tokenizer stays untouched
    try:
        added = probe.add_special_tokens({"additional_special_tokens": [PROBE_TOKEN]})
    except ValueError as err:
        return f"no: {err}"
    probe_id = probe.convert_tokens_to_ids(PROBE_TOKEN)
    in_text = probe(f"a{PROBE_TOKEN}b", add_special_tokens=False).input_ids
    if added != 1 or probe_id is None or probe_id not in in_text:
        return (f"no: add_special_tokens({{'additional_special_tokens': [{PROBE_TOKEN!r}]}}) returned {added} and "
                f"the token got id {probe_id} (transformers 4.31 skips new tokens when unk is itself an added "
                "token); add tokens before setting unk")
    return f"yes (a new token gets id {probe_id})"


def report_template(tokenizer, conv) -> None:
    print(f"\n== Template --version {conv.version}")
    print(f"style: {conv.sep_style.name}   sep: {conv.sep!r}   sep2: {conv.sep2!r}   roles: {conv.roles}   "
          f"stop string: {conv.stop_str!r}")
    pieces = {"sep": conv.sep, "sep2": conv.sep2}
    for i, role in enumerate(conv.roles):
        pieces[f"role {i}"] = role
    for name, text in pieces.items():
        if text:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            print(f"{name:7s} {text!r:30s} -> {show_ids(tokenizer, ids)}")


def report_sample(tokenizer, sample: dict, mm_use_im_start_end: bool, title: str) -> Optional[str]:
    """Print one sample with its trained spans marked; returns the problem if it cannot be trained on."""
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    print(f"\n== {title} (id {sample_id!r})")
    try:
        input_ids, labels = preprocess_sample(tokenizer, sample, sample_id, mm_use_im_start_end)
    except PreprocessError as err:
        print(f"PROBLEM ({err.kind}): {err.reason}")
        return err.reason
    spans = find_trained_spans(labels)
    print(f"rendered ({len(input_ids)} tokens): {decode_with_images(tokenizer, input_ids)!r}")
    print(f"tokens, trained spans in [[ ]] ({len(spans)} spans, {sum(e - s for s, e in spans)} tokens):")
    print("  " + marked_tokens(tokenizer, input_ids, labels))
    for start, end in spans:
        print(f"  trained [{start}:{end}]: {decode_with_images(tokenizer, input_ids[start:end])!r}")
    unk = tokenizer.unk_token_id
    unknown = [i for i, token_id in enumerate(input_ids) if token_id == unk]
    if unknown:
        problem = f"{len(unknown)} unknown token(s) ({tokenizer.unk_token!r}) at positions {unknown[:10]}"
        print(f"PROBLEM: {problem}: the vocabulary cannot spell part of this text")
        return problem
    return None


# --- data scan -----------------------------------------------------------------------------------------
class ImagePlaceholderError(PreprocessError):
    """The sample's image files and its <image> placeholders do not pair up."""

    kind = "images"


def count_images(sample: dict) -> int:
    images = sample.get("image")
    if images is None:
        return 0
    return len(images) if isinstance(images, list) else 1


def preprocess_sample(tokenizer, sample: dict, sample_id, mm_use_im_start_end: bool):
    """`(input_ids, labels)` of one LLaVA-format sample, exactly as training builds them."""
    if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
        raise ConversationFormatError(sample_id, "the sample has no 'conversations' list")
    conversations = copy.deepcopy(sample["conversations"])
    has_image = "image" in sample
    if has_image:
        placeholders = sum(str(turn.get("value", "")).count(DEFAULT_IMAGE_TOKEN) for turn in conversations
                           if isinstance(turn, dict))
        if placeholders != count_images(sample):
            raise ImagePlaceholderError(
                sample_id, f"{count_images(sample)} image file(s) but {placeholders} {DEFAULT_IMAGE_TOKEN} "
                           "placeholder(s) in the conversation; each image needs exactly one placeholder")
        preprocess_multimodal([conversations], mm_use_im_start_end=mm_use_im_start_end, sample_ids=[sample_id])
    result = preprocess([conversations], tokenizer, has_image, sample_ids=[sample_id])
    return result["input_ids"][0].tolist(), result["labels"][0].tolist()


def scan_data(tokenizer, samples: List[dict], mm_use_im_start_end: bool) -> Dict[str, List[tuple]]:
    """Preprocess every sample; print the summary; returns kind -> [(index, id, reason)] of the bad ones."""
    bad: Dict[str, List[tuple]] = {}
    lengths, trained = [], 0
    for index, sample in enumerate(samples):
        sample_id = sample.get("id", index) if isinstance(sample, dict) else index
        try:
            input_ids, labels = preprocess_sample(tokenizer, sample, sample_id, mm_use_im_start_end)
        except PreprocessError as err:
            bad.setdefault(err.kind, []).append((index, sample_id, err.reason))
            continue
        lengths.append(len(input_ids))
        trained += sum(label != IGNORE_INDEX for label in labels)
    print(f"samples: {len(samples)}   ok: {len(lengths)}   bad: {sum(len(v) for v in bad.values())}")
    if lengths:
        print(f"tokens per good sample: max {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}; "
              f"trained tokens: {trained} ({100.0 * trained / sum(lengths):.1f}%)")
    for kind in sorted(bad, key=lambda k: -len(bad[k])):
        entries = bad[kind]
        ids = ", ".join(repr(sample_id) for _, sample_id, _ in entries[:MAX_IDS_LISTED])
        more = f", ... ({len(entries) - MAX_IDS_LISTED} more)" if len(entries) > MAX_IDS_LISTED else ""
        print(f"{KIND_NAMES.get(kind, kind)}: {len(entries)}   ids: {ids}{more}")
        for index, sample_id, reason in entries[:MAX_REASONS_SHOWN]:
            print(f"  id {sample_id!r} (#{index}): {reason}")
    return bad


def load_samples(path: str, limit: Optional[int]) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        samples = json.load(f)
    if not isinstance(samples, list):
        raise ValueError(f"{path}: expected a JSON list of samples (LLaVA format), got {type(samples).__name__}")
    return samples[:limit] if limit is not None else samples


def read_mm_use_im_start_end(model_path: str) -> bool:
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return bool(json.load(f).get("mm_use_im_start_end", False))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        conv = conversation_lib.set_default_conversation(args.version)
        tokenizer = load_tokenizer(args.model_path, args.family, model_max_length=args.model_max_length)
        family = args.family or detect_family(args.model_path, tokenizer)
        samples = load_samples(args.data, args.limit) if args.data else None
    except (KeyError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    family_source = "--family" if args.family else "detected"
    mm_use_im_start_end = read_mm_use_im_start_end(args.model_path)

    problems = report_tokenizer(tokenizer, family, family_source)
    report_template(tokenizer, conv)
    sample = samples[0] if samples else EXAMPLE_SAMPLE
    try:
        sample_problem = report_sample(tokenizer, sample, mm_use_im_start_end,
                                       "First sample of --data" if samples else "Example sample")
    except TokenizerTemplateError as err:
        print(f"\nPROBLEM: the tokenizer does not fit --version {args.version}: {err}")
        return 1
    if sample_problem:
        problems.append(sample_problem)
    if samples is not None:
        print(f"\n== Data {args.data}")
        if scan_data(tokenizer, samples, mm_use_im_start_end):
            problems.append("bad samples in the data")
    print("\n== Verdict")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
