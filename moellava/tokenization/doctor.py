"""Tokenizer doctor: what a tokenizer does with a conversation template, before a GPU-day is spent.

    python -m moellava.tokenization.doctor --model-path DIR --version V [--family F] [--data FILE.json]
        [--image-folder DIR] [--tokens-per-image N | --image-tower TOWER] [--model-max-length N] [--limit N]

Prints: whether the tokenizer adds bos/eos; the ids of bos/eos/unk/pad; whether it can add special tokens;
how the template's separators tokenize; one rendered sample (the first of --data, else a built-in one) with
its trained spans marked. With --data (a LLaVA-format JSON list) it runs training's own data check on every
sample (`moellava.train.data_check`: structure, image files that exist and decode, the conversation
tokenized as training does, the length with each image counted as the tokens it becomes) and reports the
samples training would refuse, by id and reason. Exit code: 0 when all is well, 1 when a problem was found,
2 on bad arguments.
"""

import argparse
import copy
import json
import os
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

from moellava import conversation as conversation_lib
from moellava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moellava.train.data_check import (
    BadSampleError,
    SampleChecker,
    load_data_file,
    run_data_check,
    summary,
)
from moellava.train.preprocess import TokenizerTemplateError, find_trained_spans
from moellava.utils import add_local_rank_argument

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
# Names of the data check's reasons in the report.
REASON_NAMES = {
    "preprocess_mismatch": "answer spans not located exactly",
    "preprocess_truncated": "cut by model_max_length",
    "preprocess_no_labels": "fully masked (nothing to train on)",
    "preprocess_format": "bad conversation format",
    "image_count_mismatch": "image files and <image> placeholders disagree",
    "missing_image": "image file missing",
    "corrupt_image": "image file cannot be decoded",
    "malformed_sample": "malformed sample",
    "tokenizer_error": "the tokenizer fails",
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
    parser.add_argument("--image-folder", default=None, help="folder the image paths of --data are relative to")
    parser.add_argument("--tokens-per-image", type=int, default=None,
                        help="tokens one image becomes in the model (default: from --image-tower, else from the "
                             "image tower of --model-path's config)")
    parser.add_argument("--image-tower", default=None, help="the image tower training uses (hub id or folder)")
    parser.add_argument("--mm-vision-select-feature", default="patch", choices=["patch", "cls_patch"],
                        help="with --image-tower: the feature selection training uses")
    parser.add_argument("--model-max-length", type=int, default=None,
                        help="truncation length, as --model_max_length in training (default: the tokenizer's)")
    parser.add_argument("--limit", type=int, default=None, help="scan only the first N samples of --data")
    add_local_rank_argument(parser)
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


def report_sample(checker: SampleChecker, sample: dict, title: str) -> Optional[str]:
    """Print one sample with its trained spans marked; returns the problem if it cannot be trained on."""
    tokenizer = checker.tokenizer
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    print(f"\n== {title} (id {sample_id!r})")
    try:
        checked, _ = checker.structure("sample", 0, sample)
        data = checker.tokenize(checked)
    except BadSampleError as err:
        print(f"PROBLEM ({err.record.reason}): {err.record.detail}")
        return err.record.detail
    input_ids, labels = data["input_ids"][0].tolist(), data["labels"][0].tolist()
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
def scan_data(checker: SampleChecker, path: str, limit: Optional[int] = None) -> bool:
    """Training's data check on `path` (its first `limit` samples); print the summary and the bad samples;
    True when some are bad."""
    result = run_data_check([path], checker, workers=0, progress=False, limit=limit)
    print(f"samples: {result.total}   ok: {len(result.samples)}   bad: {len(result.problems)}")
    print(f"check: {summary(result)}")
    if result.samples:
        lengths = [sample.length for sample in result.samples]
        print(f"tokens per good sample (images expanded): max {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}")
    bad: Dict[str, List] = {}
    for problem in result.problems:
        bad.setdefault(problem.record.reason, []).append(problem.record)
    for reason in sorted(bad, key=lambda r: -len(bad[r])):
        records = bad[reason]
        ids = ", ".join(repr(record.sample_id) for record in records[:MAX_IDS_LISTED])
        more = f", ... ({len(records) - MAX_IDS_LISTED} more)" if len(records) > MAX_IDS_LISTED else ""
        print(f"{REASON_NAMES.get(reason, reason)}: {len(records)}   ids: {ids}{more}")
        for record in records[:MAX_REASONS_SHOWN]:
            print(f"  id {record.sample_id!r} (#{record.index}): {record.detail}")
    return bool(result.problems)


def read_model_config(model_path: str) -> dict:
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        return {}
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def tokens_per_image(args: argparse.Namespace, config: dict) -> int:
    """--tokens-per-image, else counted from --image-tower, else from the checkpoint's tower; 0 if none."""
    from moellava.model.checkpoint_layouts import vision_drop_first_token
    from moellava.model.multimodal_encoder.builder import count_image_tokens

    if args.tokens_per_image is not None:
        return args.tokens_per_image
    if args.image_tower:
        return count_image_tokens(args.image_tower, args.mm_vision_select_feature)
    if config.get("mm_image_tower"):
        return count_image_tokens(config["mm_image_tower"], config.get("mm_vision_select_feature", "patch"),
                                  config.get("mm_image_tower_config"),
                                  vision_drop_first_token(SimpleNamespace(**config)))
    return 0


def needs_image_tokens(path: str) -> bool:
    return any(isinstance(item, dict) and item.get("image") for item in load_data_file(path))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        conv = conversation_lib.set_default_conversation(args.version)
        tokenizer = load_tokenizer(args.model_path, args.family, model_max_length=args.model_max_length)
        family = args.family or detect_family(args.model_path, tokenizer)
        config = read_model_config(args.model_path)
        image_tokens = tokens_per_image(args, config)
        samples = load_data_file(args.data) if args.data else None
        if samples is not None and image_tokens == 0 and needs_image_tokens(args.data):
            raise ValueError(
                f"{args.data} has image samples, and training counts each image as the tokens it becomes: pass "
                "--image-tower (the tower training uses) or --tokens-per-image N (576 for CLIP ViT-L/14-336)."
            )
    except (KeyError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    family_source = "--family" if args.family else "detected"
    checker = SampleChecker(tokenizer, conv, image_folder=args.image_folder, tokens_per_image=image_tokens,
                            mm_use_im_start_end=bool(config.get("mm_use_im_start_end", False)))

    problems = report_tokenizer(tokenizer, family, family_source)
    report_template(tokenizer, conv)
    sample = samples[0] if samples else EXAMPLE_SAMPLE
    if not samples:
        checker.tokens_per_image = max(image_tokens, 1)  # the example has an image
    try:
        sample_problem = report_sample(checker, sample, "First sample of --data" if samples else "Example sample")
    except TokenizerTemplateError as err:
        print(f"\nPROBLEM: the tokenizer does not fit --version {args.version}: {err}")
        return 1
    if sample_problem:
        problems.append(sample_problem)
    if samples is not None:
        print(f"\n== Data {args.data}" + (f" (first {args.limit} samples)" if args.limit is not None else ""))
        if scan_data(checker, args.data, args.limit):
            problems.append("bad samples in the data")
    print("\n== Verdict")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
