"""Exact labels for every tokenizer family and template (DESIGN decision 1).

For generated conversations (multi-turn, unicode, digits, newlines, answers containing the template's own
separators and role names, empty answers, with and without images) the unmasked labels are exactly each
answer plus its end-of-turn token: the spans decode to the answers, the text before each span decodes to
the instruction text before the answer, and no whitespace-only instruction token leaks into a span.
They are also exactly the labels of the definition, computed here the slow way (`whole_prefix_labels`):
the linear-time engine re-tokenizes only the text after the last special token before a boundary.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moellava import conversation as conversation_lib
from moellava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moellava.mm_utils import tokenizer_image_token
from moellava.train.preprocess import (
    LabelAlignmentError,
    PrefixTokenizer,
    _comparable,
    _decode_span,
    find_trained_spans,
    preprocess,
    tokenize_pieces,
)

WORDS = ["the", "cat", "is", "black", "Answer", "image", "shows", "two", "dogs", "ASSISTANT", "USER"]
SNIPPETS = [
    "</s>", "<s>", "<|endoftext|>", "<|im_end|>", "USER:", "ASSISTANT:", " ASSISTANT: ", " USER: ", "###",
    "[INST]", "[/INST]", "\n", "  ", "\n\n", " \n", "12345", "3.14", "Human:", "<<SYS>>",
]
CHARS = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()-\n\téüß中文字😀"
fragment = st.one_of(
    st.text(alphabet=CHARS, min_size=1, max_size=10), st.sampled_from(SNIPPETS), st.sampled_from(WORDS)
)
message = st.lists(fragment, max_size=6).map("".join)


@st.composite
def conversations(draw, with_images: bool):
    rounds = draw(st.integers(1, 3))
    turns = []
    for r in range(rounds):
        question = draw(message)
        if r == 0 and with_images:
            images = draw(st.integers(1, 2))
            where = draw(st.sampled_from(["front", "back"]))
            tags = "\n".join([DEFAULT_IMAGE_TOKEN] * images)
            question = f"{tags}\n{question}" if where == "front" else f"{question}\n{tags}"
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": draw(message)})
    if draw(st.booleans()):
        turns.append({"from": "human", "value": draw(message)})  # a trailing question with no answer
    return turns


def rendered_pieces(source):
    conv = conversation_lib.default_conversation.copy()
    conv.messages = []
    for i, turn in enumerate(source):
        conv.append_message(conv.roles[i % 2], turn["value"])
    return conv.render()


def common_prefix_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def whole_prefix_labels(pieces, tokenizer, has_image):
    """`(input_ids, labels)` by the definition (DESIGN decision 1): each answer boundary is the longest common
    prefix of the prompt's ids and the ids of the whole text before it. Quadratic in the number of rounds;
    the oracle for the linear-time engine, and the `prefix` baseline of benchmarks/preprocess.py."""
    def tokenize(text):
        return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids

    text = "".join(piece for piece, _ in pieces)
    ids = tokenize(text)
    labels, position = [IGNORE_INDEX] * len(ids), 0
    for piece, is_answer in pieces:
        piece_start, position = position, position + len(piece)
        if is_answer:
            start = common_prefix_len(tokenize(text[:piece_start]), ids)
            end = common_prefix_len(tokenize(text[:position]), ids)
            labels[start:end] = [IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else i for i in ids[start:end]]
    return ids, labels


def round_trips(tokenizer, text, has_image):
    ids = tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids
    bos = tokenizer.bos_token if ids and ids[0] == tokenizer.bos_token_id else ""
    return _comparable(_decode_span(tokenizer, ids)) == _comparable(bos + text)


def decode_prefix(tokenizer, ids):
    return _decode_span(tokenizer, ids)


def assert_exact_labels(tokenizer, pieces, ids, labels, has_image):
    text = "".join(piece for piece, _ in pieces)
    expected_ids = tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids
    assert ids == expected_ids, "input_ids must be the tokenization of the rendered prompt"
    for i, token_id in enumerate(ids):
        if token_id == IMAGE_TOKEN_INDEX:
            assert labels[i] == IGNORE_INDEX
        elif labels[i] != IGNORE_INDEX:
            assert labels[i] == token_id
    spans = find_trained_spans(labels)
    answers, position, bounds = [], 0, []
    for piece, is_answer in pieces:
        if is_answer:
            answers.append(piece)
            bounds.append((position, position + len(piece)))
        position += len(piece)
    assert len(spans) == len(answers), (spans, answers)
    # Where the tokenizer keeps every character (it may not: see round_trips), the text before each span
    # is exactly the instruction text before the answer.
    lossless = round_trips(tokenizer, text, has_image)
    bos = tokenizer.bos_token if ids and ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None else ""
    for (start, end), answer, (char_start, char_end) in zip(spans, answers, bounds):
        assert _comparable(_decode_span(tokenizer, ids[start:end])) == _comparable(answer)
        if lossless:
            assert _comparable(decode_prefix(tokenizer, ids[:start])) == _comparable(bos + text[:char_start])
            assert _comparable(decode_prefix(tokenizer, ids[:end])) == _comparable(bos + text[:char_end])
        # An instruction ending in whitespace ("ASSISTANT: ") must not lend its whitespace token to the span.
        first = tokenizer.decode([ids[start]], skip_special_tokens=False)
        if first.strip() == "" and text[:char_start][-1:].isspace():
            assert answer[:1].isspace(), f"whitespace-only instruction token {first!r} leaked into the labels"


FAMILY_TEMPLATES = [
    ("llama", "v1"), ("llama", "llava_v1"), ("llama", "llava_llama_2"), ("llama", "llama_2"), ("llama", "llava_v0"),
    ("llama", "plain"), ("mistral", "mistral"), ("mistral", "plain"), ("qwen", "qwen"), ("qwen", "mpt"),
    ("qwen", "plain"), ("phi", "phi"), ("phi", "plain"), ("stablelm", "stablelm"), ("stablelm", "plain"),
]


@pytest.fixture
def template():
    def select(version):
        return conversation_lib.set_default_conversation(version)

    yield select
    conversation_lib.set_default_conversation("v1")


def check_generated(tokenizer, data):
    with_images = conversation_lib.default_conversation.version == "plain" or data.draw(st.booleans())
    source = data.draw(conversations(with_images))
    if conversation_lib.default_conversation.version == "plain":
        source = source[:2]
        pieces = [(DEFAULT_IMAGE_TOKEN * source[0]["value"].count(DEFAULT_IMAGE_TOKEN), False),
                  (source[1]["value"] + "\n", True)]
    else:
        pieces = rendered_pieces(source)
    try:
        out = preprocess([source], tokenizer, has_image=with_images)
    except LabelAlignmentError as error:
        # Refusing is right only when the tokenizer itself loses text (e.g. transformers 4.31's non-legacy
        # Llama path turns a piece after a special token into <unk> when the vocabulary lacks it).
        assert error.kind == "mismatch"
        assert not round_trips(tokenizer, "".join(piece for piece, _ in pieces), with_images), error
        return
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert_exact_labels(tokenizer, pieces, ids, labels, with_images)
    assert (ids, labels) == whole_prefix_labels(pieces, tokenizer, with_images)


@pytest.mark.parametrize("family,version", FAMILY_TEMPLATES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_conversations_toy_tokenizers(toy_tokenizers, template, family, version, data):
    template(version)
    check_generated(toy_tokenizers[family], data)


REAL_TEMPLATES = [("llama2", "v1"), ("llama2", "llava_llama_2"), ("qwen", "qwen"), ("phi2", "phi")]


@pytest.mark.parametrize("vocab,version", REAL_TEMPLATES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_conversations_real_vocabularies(request, template, vocab, version, data):
    tokenizer = request.getfixturevalue(f"real_{vocab}_tokenizer")
    template(version)
    check_generated(tokenizer, data)


# ----------------------------------------------------------------------------------------------- linear time


class CountingTokenizer:
    """Delegates to a tokenizer and counts the characters it is asked to tokenize."""

    def __init__(self, tokenizer):
        self._tokenizer, self.characters = tokenizer, 0

    def __call__(self, text, *args, **kwargs):
        self.characters += len(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def long_conversation(rounds):
    turns = []
    for r in range(rounds):
        question = ("<image>\n" if r == 0 else "") + f"What is shown in part {r} of the picture, and why?"
        turns += [{"from": "human", "value": question},
                  {"from": "gpt", "value": f"Part {r} shows two black cats sitting on a red mat.\nThey rest."}]
    return turns


@pytest.mark.parametrize("vocab,version", REAL_TEMPLATES)
def test_labelling_tokenizes_each_round_a_bounded_number_of_times(request, template, vocab, version):
    tokenizer = CountingTokenizer(request.getfixturevalue(f"real_{vocab}_tokenizer"))
    template(version)
    pieces = rendered_pieces(long_conversation(20))
    text = "".join(piece for piece, _ in pieces)
    ids, labels = tokenize_pieces(pieces, tokenizer, has_image=True)
    # One tokenization of the prompt plus, per answer, the round before it: well under 2x the text, where
    # tokenizing the whole text before every boundary would take about 20x.
    assert tokenizer.characters < 2 * len(text)
    assert (ids, labels) == whole_prefix_labels(pieces, tokenizer, True)
    assert len(PrefixTokenizer(text, ids, tokenizer, True).specials) >= 20


def test_special_tokens_the_tokenizer_does_not_treat_as_special_fall_back_to_whole_prefixes(toy_tokenizer_dir):
    from transformers import LlamaTokenizer

    # Built from tokenizer.model alone, transformers 4.31's Llama tokenizer splits "</s>" written in the text
    # into ordinary pieces: no special token to restart from, so every prefix is tokenized whole.
    tokenizer = LlamaTokenizer(vocab_file=str(toy_tokenizer_dir("llama") / "tokenizer.model"))
    conversation_lib.set_default_conversation("v1")
    pieces = rendered_pieces(long_conversation(3))
    text = "".join(piece for piece, _ in pieces)
    ids, labels = tokenize_pieces(pieces, tokenizer, has_image=True)
    assert "</s>" in text and PrefixTokenizer(text, ids, tokenizer, True).specials == []
    assert (ids, labels) == whole_prefix_labels(pieces, tokenizer, True)
    assert len(find_trained_spans(labels)) == 3


@pytest.mark.parametrize("vocab,version", REAL_TEMPLATES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prefix_lengths_equal_whole_prefix_tokenization(request, template, vocab, version, data):
    """At every piece boundary, the engine's common prefix (and whether it is clean) is that of the whole
    text before the boundary, for generated conversations full of special tokens, images and unicode."""
    tokenizer = request.getfixturevalue(f"real_{vocab}_tokenizer")
    template(version)
    with_images = data.draw(st.booleans())
    pieces = rendered_pieces(data.draw(conversations(with_images)))
    text = "".join(piece for piece, _ in pieces)

    def tokenize(prefix):
        return tokenizer_image_token(prefix, tokenizer) if with_images else tokenizer(prefix).input_ids

    ids = tokenize(text)
    prefixes = PrefixTokenizer(text, ids, tokenizer, with_images)
    assert prefixes.specials  # every text holds the template's end token
    boundary = 0
    for piece, _ in pieces:
        boundary += len(piece)
        whole = tokenize(text[:boundary])
        length = common_prefix_len(whole, ids)
        assert prefixes.common_prefix(boundary) == (length, length == len(whole))
