"""From a LLaVA-format conversation to `(input_ids, labels)`, exact for every tokenizer family.

How the labels are found (DESIGN decision 1). The template renders the conversation as consecutive pieces,
each marked as answer or not (`Conversation.render`); an answer piece is exactly what the model must generate
after the inference prompt "... ASSISTANT:": the separator after the role, the assistant message and its
end-of-turn string. The whole prompt is tokenized once. The token index where an answer starts (or ends) is
the length of the longest common prefix of the ids of the whole prompt and the ids of the text before that
point: the tokens both tokenizations agree on belong to the text before, so a merge across the boundary
lands on the answer side. No per-tokenizer `+1/-1` arithmetic is involved, so nothing can drift.
The ids of the text before a boundary are not recomputed from the start of the prompt: tokenizers restart
at every special token written in the text (the end token that closes each answer), so they are the
prompt's own ids up to the last special token, then that round's text re-tokenized (`PrefixTokenizer`):
linear in the length of the conversation. A span whose boundaries are not clean token boundaries, or that
holds an unknown token, is decoded and compared with the answer text; a sample that does not match, or that
truncation leaves without labels, raises `LabelAlignmentError` with its id and the reason (the dataset
counts these; nothing is silently zeroed).

The per-template `preprocess_*` functions keep the names researchers know from LLaVA / MoE-LLaVA; they share
the engine below and differ in the checks their tokenizer family needs.
"""

import bisect
import re
import unicodedata
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from moellava import conversation as conversation_lib
from moellava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    MAX_IMAGE_LENGTH,
)
from moellava.conversation import Conversation, SeparatorStyle
from moellava.mm_utils import tokenizer_image_token

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class PreprocessError(ValueError):
    """A sample that cannot become training data. `kind` says why; the dataset counts these by kind."""

    kind = "error"

    def __init__(self, sample_id, reason: str):
        self.sample_id = sample_id
        self.reason = reason
        super().__init__(f"sample {sample_id!r}: {reason}")


class ConversationFormatError(PreprocessError):
    """Turns that do not alternate human/gpt, unknown roles, non-string values."""

    kind = "format"


class LabelAlignmentError(PreprocessError):
    """Answer spans that cannot be located exactly, or that truncation removed (`kind` tells which)."""

    def __init__(self, sample_id, reason: str, kind: str = "mismatch"):
        super().__init__(sample_id, reason)
        self.kind = kind


class TokenizerTemplateError(ValueError):
    """The tokenizer and the conversation template do not fit together (wrong `--version`, or a tokenizer
    that was not loaded with its family's special-token rules)."""


# ----------------------------------------------------------------------------------------------------------
# The engine


def find_trained_spans(labels: Sequence[int]) -> List[Tuple[int, int]]:
    """Half-open `(start, end)` ranges of consecutive positions whose label is not IGNORE_INDEX."""
    spans, start = [], None
    for i, label in enumerate(list(labels) + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _comparable(text: str) -> str:
    # Decoders differ in the spaces they put around special tokens and at the start of a sequence
    # (SentencePiece drops a leading space); compare content without whitespace, in NFC form.
    return "".join(unicodedata.normalize("NFC", text).split())


def _decode_span(tokenizer, ids: Sequence[int]) -> str:
    parts, current = [], []
    for token_id in ids:
        if token_id == IMAGE_TOKEN_INDEX:
            parts.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
        else:
            current.append(token_id)
    parts.append(tokenizer.decode(current, skip_special_tokens=False))
    return DEFAULT_IMAGE_TOKEN.join(parts)


class PrefixTokenizer:
    """Answer boundaries from one tokenization of the whole text, in linear time.

    `common_prefix(end)` is the length of the longest common prefix of `input_ids` (the ids of `text`) and
    the ids of `text[:end]`, computed without tokenizing the whole of `text[:end]`: every tokenizer splits
    its input at the special tokens written in it (transformers' slow tokenizers on their special tokens,
    tiktoken on its specials) and `tokenizer_image_token` at `<image>`, and tokenizes the text between them
    independently. So the ids of `text[:end]` are those of the whole text up to the last special token that
    ends by `end`, then the ids of the rest tokenized from that special token on: a re-tokenization bounded
    by one round of the conversation, not by the length of the text before it.

    Where that special token sits in `input_ids` is read off the ids themselves: the special tokens written
    in the text (all of the tokenizer's `all_special_tokens` except unk, which ordinary text may produce)
    must appear as their own ids, one each, in order; otherwise (a tokenizer that does not treat them as
    special) every prefix is tokenized whole. `clean` says that the re-tokenized rest matched `input_ids`
    to its last id: the boundary is then a token boundary of `input_ids`, whose ids before it are exactly
    those of the text before it.
    """

    def __init__(self, text: str, input_ids: Sequence[int], tokenizer, has_image: bool):
        self.text, self.input_ids, self.tokenizer, self.has_image = text, input_ids, tokenizer, has_image
        self.leading = tokenizer("").input_ids  # what the tokenizer puts before any text (BOS)
        self._rests: Dict[Tuple[int, int], Optional[List[int]]] = {}
        self.specials, self.positions = self._special_tokens()
        self.special_ends = [stop for _, stop in self.specials]

    def _special_tokens(self) -> Tuple[List[Tuple[int, int]], List[int]]:
        """Character spans of the special tokens in the text and their indices in `input_ids` ([] if the
        ids do not hold them one to one)."""
        tokenizer = self.tokenizer
        ids_of = {token: tokenizer.convert_tokens_to_ids(token)
                  for token in tokenizer.all_special_tokens if token and token != tokenizer.unk_token}
        if not ids_of:
            return [], []
        pattern = re.compile("|".join(re.escape(token) for token in sorted(ids_of, key=len, reverse=True)))
        matches = list(pattern.finditer(self.text))
        special_ids = set(ids_of.values())
        lead = len(self.leading)
        positions = [i for i in range(lead, len(self.input_ids)) if self.input_ids[i] in special_ids]
        if [self.input_ids[i] for i in positions] != [ids_of[match.group()] for match in matches]:
            return [], []
        return [match.span() for match in matches], positions

    def _rest_ids(self, start: int, end: int) -> Optional[List[int]]:
        """Ids of `text[start:end]` as they continue a tokenization (without the leading ids), split at
        `<image>` like `tokenizer_image_token`; None if a part lacks the leading ids."""
        key = (start, end)
        if key not in self._rests:
            text = self.text[start:end]
            parts = text.split(DEFAULT_IMAGE_TOKEN) if self.has_image else [text]
            ids: Optional[List[int]] = []
            for index, part in enumerate(parts):
                part_ids = self.tokenizer(part).input_ids
                if part_ids[: len(self.leading)] != self.leading:
                    ids = None
                    break
                ids += ([IMAGE_TOKEN_INDEX] if index else []) + part_ids[len(self.leading):]
            self._rests[key] = ids
        return self._rests[key]

    def _whole_prefix(self, end: int) -> List[int]:
        text = self.text[:end]
        return tokenizer_image_token(text, self.tokenizer) if self.has_image else self.tokenizer(text).input_ids

    def common_prefix(self, end: int) -> Tuple[int, bool]:
        """`(length, clean)`: the common prefix of `input_ids` and the ids of `text[:end]`, and whether the
        ids of `text[:end]` are all of it."""
        last = bisect.bisect_right(self.special_ends, end) - 1  # the last special token ending by `end`
        rest = self._rest_ids(self.specials[last][0], end) if last >= 0 else None
        if rest is None:
            ids = self._whole_prefix(end)
            length = _common_prefix_len(ids, self.input_ids)
            return length, length == len(ids)
        base = self.positions[last]
        length = _common_prefix_len(rest, self.input_ids[base : base + len(rest)])
        return base + length, length == len(rest)


def locate_answer_spans(
    pieces: Sequence[Tuple[str, bool]], tokenizer, input_ids: List[int], *, has_image: bool, sample_id=None
) -> List[Tuple[int, int]]:
    """Half-open token ranges of the answer pieces in `input_ids` (the ids of the concatenated pieces).

    An answer starts (ends) at the longest common prefix of `input_ids` and the ids of the text before its
    start (end), so a merge across a boundary lands on the answer side. Where a boundary is not a clean
    token boundary (such a merge) or the span holds an unknown token, the span is decoded and must read
    as its answer, or `LabelAlignmentError` names the sample.
    """
    text = "".join(piece for piece, _ in pieces)
    prefixes = PrefixTokenizer(text, input_ids, tokenizer, has_image)
    spans, position = [], 0
    for piece, is_answer in pieces:
        piece_start, position = position, position + len(piece)
        if not is_answer:
            continue
        (start, clean_start), (end, clean_end) = prefixes.common_prefix(piece_start), prefixes.common_prefix(position)
        exact = clean_start and clean_end and tokenizer.unk_token_id not in input_ids[start:end]
        if not exact:
            decoded = _decode_span(tokenizer, input_ids[start:end])
            if _comparable(decoded) != _comparable(piece):
                raise LabelAlignmentError(
                    sample_id,
                    f"the tokens located for the answer decode to {decoded!r}, expected {piece!r}. The answer's "
                    "boundary merges with its neighbours in this tokenizer, or the tokenizer maps some of its "
                    "characters to unknown tokens; run `python -m moellava.tokenization.doctor` on this sample.",
                )
        spans.append((start, end))
    return spans


def tokenize_pieces(
    pieces: Sequence[Tuple[str, bool]],
    tokenizer,
    *,
    has_image: bool,
    sample_id=None,
) -> Tuple[List[int], List[int]]:
    """Token ids of the concatenated pieces and labels that keep exactly the answer pieces."""
    if has_image:
        def tokenize(text: str) -> List[int]:
            return tokenizer_image_token(text, tokenizer)
    else:
        def tokenize(text: str) -> List[int]:
            return tokenizer(text).input_ids

    input_ids = tokenize("".join(piece for piece, _ in pieces))
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in locate_answer_spans(pieces, tokenizer, input_ids, has_image=has_image, sample_id=sample_id):
        for i in range(start, end):
            if input_ids[i] != IMAGE_TOKEN_INDEX:
                labels[i] = input_ids[i]

    if not any(label != IGNORE_INDEX for label in labels):
        raise LabelAlignmentError(sample_id, "the conversation has no assistant answer to train on", "no_labels")
    return input_ids, labels


def fit_to_length(input_ids: torch.Tensor, labels: torch.Tensor, max_length: int, image_tokens: int,
                  sample_id=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cut a sample to `max_length` positions of the model's sequence, where each image placeholder becomes
    `image_tokens` positions (the tower's tokens per image). A cut that would lose answer tokens (so a whole
    answer, or an answer's end token) or split an image is refused with `LabelAlignmentError` ("truncated"):
    what is trained is always each answer whole with its end token."""
    is_image = input_ids == IMAGE_TOKEN_INDEX
    ends = torch.where(is_image, image_tokens, 1).cumsum(0)
    length = int(ends[-1]) if ends.numel() else 0
    if length <= max_length:
        return input_ids, labels
    keep = int((ends <= max_length).sum())
    cut_images = int(is_image[keep:].sum())
    cut_labels = int((labels[keep:] != IGNORE_INDEX).sum())
    if cut_images or cut_labels:
        what = [f"{cut_images} of its {int(is_image.sum())} image(s)"] if cut_images else []
        if cut_labels:
            what.append(f"{cut_labels} of its {int((labels != IGNORE_INDEX).sum())} answer tokens")
        images = f", each of its {int(is_image.sum())} image(s) counted as {image_tokens} tokens" if is_image.any() else ""
        raise LabelAlignmentError(
            sample_id,
            f"it is {length} tokens long{images}, more than --model_max_length {max_length}: truncation would cut "
            f"{' and '.join(what)}. Raise --model_max_length or shorten the sample",
            "truncated",
        )
    return input_ids[:keep], labels[:keep]


def _messages(source, conv: Conversation, sample_id) -> List[Tuple[str, str]]:
    """`(role, text)` turns in template roles; a leading assistant turn is dropped, as in LLaVA."""
    turns = list(source)
    if turns and _speaker(turns[0], sample_id) == 1:
        turns = turns[1:]
    messages = []
    for j, turn in enumerate(turns):
        speaker = _speaker(turn, sample_id)
        if speaker != j % 2:
            expected = "human" if j % 2 == 0 else "gpt"
            raise ConversationFormatError(
                sample_id,
                f"turn {j} is from {turn.get('from')!r} but {expected!r} was expected: turns must alternate "
                "human, gpt, human, gpt... Fix the conversation in the data file.",
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise ConversationFormatError(sample_id, f"turn {j} has a non-string 'value': {value!r}")
        messages.append((conv.roles[speaker], value))
    return messages


def _speaker(turn, sample_id) -> int:
    role = str(turn.get("from", "")).lower() if isinstance(turn, dict) else None
    if role in HUMAN_ROLES:
        return 0
    if role in ASSISTANT_ROLES:
        return 1
    raise ConversationFormatError(
        sample_id, f"unknown speaker in turn {turn!r}: 'from' must be one of {HUMAN_ROLES + ASSISTANT_ROLES}"
    )


def _end_token(conv: Conversation) -> Optional[str]:
    """The end-of-turn marker that must be one special token for this template style, if any."""
    if conv.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2):
        return conv.sep2
    if conv.sep_style == SeparatorStyle.MPT:
        return conv.sep
    return None


def check_tokenizer_fits_template(tokenizer, conv: Conversation) -> None:
    """Fail early, for the whole dataset, when the template's end token is not a token of this tokenizer,
    or when padding would hide it."""
    if tokenizer.pad_token_id is None:
        raise TokenizerTemplateError(
            f"{type(tokenizer).__name__} has no pad token. Load it with moellava.tokenization.load_tokenizer, "
            "which applies the family rules (pad = unk)."
        )
    end_token = _end_token(conv)
    if end_token is None:
        return
    ids = tokenizer(end_token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise TokenizerTemplateError(
            f"Template --version {conv.version!r} ends answers with {end_token!r}, but "
            f"{type(tokenizer).__name__} splits it into {len(ids)} tokens {ids}: it is not a special token of "
            "this tokenizer. Use the template of your model family (see CUSTOM.md), or load the tokenizer from "
            "its folder with moellava.tokenization.load_tokenizer so its special tokens are registered."
        )
    if ids[0] == tokenizer.pad_token_id:
        raise TokenizerTemplateError(
            f"The pad token {tokenizer.pad_token!r} is the template's end token {end_token!r}: padding masks "
            "would hide every end of answer. Set pad to a different token (load_tokenizer sets pad = unk)."
        )


def _preprocess_conversations(
    sources, tokenizer, has_image: bool, sample_ids, check: Callable[[object, Conversation], None]
) -> Dict[str, List[torch.Tensor]]:
    template = conversation_lib.default_conversation
    check(tokenizer, template)
    input_ids, targets = [], []
    for index, source in enumerate(sources):
        sample_id = sample_ids[index] if sample_ids is not None else index
        conv = template.copy()
        conv.messages = []
        for role, text in _messages(source, conv, sample_id):
            conv.append_message(role, text)
        ids, labels = tokenize_pieces(conv.render(), tokenizer, has_image=has_image, sample_id=sample_id)
        input_ids.append(torch.tensor(ids, dtype=torch.long))
        targets.append(torch.tensor(labels, dtype=torch.long))
    return dict(input_ids=input_ids, labels=targets)


def _max_length(tokenizer) -> Optional[int]:
    # transformers uses a huge sentinel when no length was configured.
    length = getattr(tokenizer, "model_max_length", None)
    return length if length is not None and length < 10**9 else None


# ----------------------------------------------------------------------------------------------------------
# Per-template entry points (names as in LLaVA / MoE-LLaVA, so researchers find them)


def preprocess_plain(sources, tokenizer, *, sample_ids=None) -> Dict[str, List[torch.Tensor]]:
    """Stage 1 (`--version plain`): `<image>` placeholders then the caption and the template's separator;
    the caption and separator are trained. The question text is dropped (as in LLaVA); every `<image>` of
    the human turn is kept, so multi-image samples stay aligned with their images."""
    sep = conversation_lib.default_conversation.sep
    input_ids, targets = [], []
    for index, source in enumerate(sources):
        sample_id = sample_ids[index] if sample_ids is not None else index
        if len(source) != 2 or _speaker(source[0], sample_id) != 0 or _speaker(source[1], sample_id) != 1:
            raise ConversationFormatError(
                sample_id, "plain (stage-1) samples need exactly one human turn followed by one gpt turn"
            )
        num_images = source[0]["value"].count(DEFAULT_IMAGE_TOKEN)
        if num_images == 0:
            raise ConversationFormatError(
                sample_id, "plain (stage-1) samples need <image> in the human turn: stage 1 trains on captions"
            )
        pieces = [(DEFAULT_IMAGE_TOKEN * num_images, False), (source[1]["value"] + sep, True)]
        ids, labels = tokenize_pieces(pieces, tokenizer, has_image=True, sample_id=sample_id)
        input_ids.append(torch.tensor(ids, dtype=torch.long))
        targets.append(torch.tensor(labels, dtype=torch.long))
    return dict(input_ids=input_ids, labels=targets)


def preprocess_v1(sources, tokenizer, has_image=False, *, sample_ids=None):
    """Vicuna v1 / llava_v1 (`--version v1`): Llama tokenizer (adds BOS), answers end with `</s>`."""
    return _preprocess_conversations(sources, tokenizer, has_image, sample_ids, check_tokenizer_fits_template)


def preprocess_mistral(sources, tokenizer, has_image=False, *, sample_ids=None):
    """Mistral / OpenChat (`--version mistral`, `openchat`): Llama-style tokenizer; `</s>` or
    `<|end_of_turn|>` must be one of its special tokens."""
    return _preprocess_conversations(sources, tokenizer, has_image, sample_ids, check_tokenizer_fits_template)


def preprocess_llama_2(sources, tokenizer, has_image=False, *, sample_ids=None):
    """Llama-2 chat (`--version llama_2`, `llava_llama_2`): `[INST] ... [/INST] answer </s><s>[INST] ...`."""
    return _preprocess_conversations(sources, tokenizer, has_image, sample_ids, check_tokenizer_fits_template)


def preprocess_mpt(sources, tokenizer, has_image=False, *, sample_ids=None):
    """MPT / ChatML (`--version mpt`): answers end with `<|im_end|>`, which must be a special token."""
    return _preprocess_conversations(sources, tokenizer, has_image, sample_ids, check_tokenizer_fits_template)


def _check_eos_ends_answers(tokenizer, conv: Conversation) -> None:
    """Qwen, Phi and StableLM end answers with their eos `<|endoftext|>`; generation stops on eos."""
    check_tokenizer_fits_template(tokenizer, conv)
    if tokenizer.eos_token != conv.sep2:
        raise TokenizerTemplateError(
            f"Template --version {conv.version!r} ends answers with {conv.sep2!r} but the tokenizer's eos is "
            f"{tokenizer.eos_token!r}. Load the tokenizer with moellava.tokenization.load_tokenizer "
            "(the family rules set eos), or pick the template of your model family."
        )


def preprocess_qwen(sources, tokenizer, has_image=False, *, sample_ids=None):
    """Qwen (`--version qwen`): QWenTokenizer with unk `<|extra_0|>`, eos `<|endoftext|>` (no BOS)."""
    return _preprocess_conversations(sources, tokenizer, has_image, sample_ids, _check_eos_ends_answers)


def preprocess_phi(sources, tokenizer, has_image=False, *, sample_ids=None):
    """Phi-2 (`--version phi`): CodeGen BPE, eos `<|endoftext|>`, unk `<|extra_0|>` added (no BOS)."""
    return _preprocess_conversations(sources, tokenizer, has_image, sample_ids, _check_eos_ends_answers)


def preprocess_stablelm(sources, tokenizer, has_image=False, *, sample_ids=None):
    """StableLM-2 (`--version stablelm`): Arcade100k, eos `<|endoftext|>`, unk/pad `<|reg0|>`. Its own pad
    is eos, which would hide every end of answer; the family rules move pad to `<|reg0|>`."""
    return _preprocess_conversations(sources, tokenizer, has_image, sample_ids, _check_eos_ends_answers)


def preprocess_v0(sources, tokenizer, has_image=False, *, sample_ids=None):
    """`###`-separated templates (`--version v0`, `llava_v0`, `v0_mmtag`): no special end token."""
    return _preprocess_conversations(sources, tokenizer, has_image, sample_ids, check_tokenizer_fits_template)


def preprocess(sources, tokenizer, has_image: bool = False, *, sample_ids=None,
               image_tokens: int = 1) -> Dict[str, List[torch.Tensor]]:
    """Dispatch on the selected template (`conversation.set_default_conversation(--version)`), then fit each
    sample to `tokenizer.model_max_length` (`fit_to_length`, each image counted as `image_tokens`).

    `sources` is a list of conversations (`[{"from": "human"|"gpt", "value": str}, ...]`); returns
    `dict(input_ids=[LongTensor], labels=[LongTensor])`, one entry per conversation.
    """
    data = _preprocess_by_template(sources, tokenizer, has_image, sample_ids)
    max_length = _max_length(tokenizer)
    if max_length is not None:
        for index, (ids, labels) in enumerate(zip(data["input_ids"], data["labels"])):
            sample_id = sample_ids[index] if sample_ids is not None else index
            data["input_ids"][index], data["labels"][index] = fit_to_length(ids, labels, max_length, image_tokens,
                                                                            sample_id)
    return data


def _preprocess_by_template(sources, tokenizer, has_image: bool, sample_ids) -> Dict[str, List[torch.Tensor]]:
    conv = conversation_lib.default_conversation
    version = conv.version
    if conv.sep_style == SeparatorStyle.PLAIN:
        return preprocess_plain(sources, tokenizer, sample_ids=sample_ids)
    if conv.sep_style == SeparatorStyle.LLAMA_2:
        function = preprocess_llama_2
    elif version.startswith("qwen"):
        function = preprocess_qwen
    elif version.startswith("phi"):
        function = preprocess_phi
    elif version.startswith("stablelm"):
        function = preprocess_stablelm
    elif version.startswith(("mistral", "openchat")):
        function = preprocess_mistral
    elif version.startswith("v1"):
        function = preprocess_v1
    elif version == "mpt":
        function = preprocess_mpt
    else:
        function = preprocess_v0
    return function(sources, tokenizer, has_image, sample_ids=sample_ids)


def preprocess_multimodal(sources, *, mm_use_im_start_end: bool = False, sample_ids=None):
    """Rewrite `<image>` placeholders for the model's image-token style, in place.

    Placeholders stay where the data put them (as in MoE-LLaVA). More than MAX_IMAGE_LENGTH images in a
    sample is an error, not a silent cut.
    """
    mmtag = "mmtag" in conversation_lib.default_conversation.version
    for index, source in enumerate(sources):
        sample_id = sample_ids[index] if sample_ids is not None else index
        count = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in source)
        if count > MAX_IMAGE_LENGTH:
            raise ConversationFormatError(
                sample_id, f"{count} <image> placeholders; at most {MAX_IMAGE_LENGTH} images per sample are supported"
            )
        for turn in source:
            value = turn["value"]
            if mmtag:
                value = value.replace(DEFAULT_IMAGE_TOKEN, "<Image>" + DEFAULT_IMAGE_TOKEN + "</Image>")
            if mm_use_im_start_end:
                value = value.replace(
                    DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
                )
            turn["value"] = value
    return sources
