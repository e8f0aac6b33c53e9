"""preprocess(): agreement with the seed's arithmetic where it is valid, the cases where it is not,
stage-1 samples, and the loud errors."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from moellava import conversation as conversation_lib
from moellava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MAX_IMAGE_LENGTH
from moellava.conversation import Conversation, SeparatorStyle
from moellava.mm_utils import tokenizer_image_token
from moellava.train.preprocess import (
    ConversationFormatError,
    LabelAlignmentError,
    TokenizerTemplateError,
    find_trained_spans,
    preprocess,
    preprocess_multimodal,
)


@pytest.fixture
def qwen_copy(toy_tokenizer_dir):
    """A private toy Qwen tokenizer that a test may change."""
    from moellava.tokenization import load_tokenizer

    return load_tokenizer(toy_tokenizer_dir("qwen"))


@pytest.fixture(autouse=True)
def restore_template():
    yield
    conversation_lib.set_default_conversation("v1")


def seed_labels(source, tokenizer, has_image, *, start, round_extra, instruction_offset):
    """The seed's label arithmetic (LLaVA preprocess_v1: start=1, +0, -2; MoE-LLaVA preprocess_phi/qwen:
    start=0, +1, -1), written out here only to compare with: spec 3.6."""
    conv = conversation_lib.default_conversation.copy()
    conv.messages = []
    for i, turn in enumerate(source):
        conv.append_message(conv.roles[i % 2], turn["value"])
    prompt = conv.get_prompt()

    def tok(text):
        return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids

    target = list(tok(prompt))
    total_len = sum(1 for t in target if t != tokenizer.pad_token_id)
    sep = conv.sep + conv.roles[1] + ": "
    cur_len = start
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in prompt.split(conv.sep2):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tok(rou)) + round_extra
        instruction_len = len(tok(parts[0])) + instruction_offset
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    if cur_len != total_len:
        return [IGNORE_INDEX] * len(target)  # the seed's silent "tokenization mismatch"
    return target


SEED_V1 = dict(start=1, round_extra=0, instruction_offset=-2)
SEED_QWEN = dict(start=0, round_extra=1, instruction_offset=-1)

ordinary_words = st.sampled_from(
    ["the", "cat", "sits", "on", "a", "red", "mat", "Yes", "No", "there", "are", "dogs", "in", "picture", "It",
     "3", "12"]
)
ordinary_text = st.lists(ordinary_words, min_size=1, max_size=8).map(" ".join)


@st.composite
def ordinary_conversation(draw):
    turns = []
    for r in range(draw(st.integers(1, 3))):
        question = draw(ordinary_text) + "?"
        if r == 0 and draw(st.booleans()):
            question = "<image>\n" + question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": draw(ordinary_text) + "."}]
    return turns


@pytest.fixture(scope="module")
def llama2_legacy_tokenizer(real_llama2_tokenizer, tmp_path_factory):
    """The real Llama-2 vocabulary with transformers 4.31's default (legacy) SentencePiece handling."""
    folder = tmp_path_factory.mktemp("llama2_legacy")
    shutil.copy(real_llama2_tokenizer.vocab_file, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
    }))
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=ordinary_conversation())
def test_masks_equal_seed_arithmetic_llama2_v1(llama2_legacy_tokenizer, source):
    conversation_lib.set_default_conversation("v1")
    has_image = "<image>" in source[0]["value"]
    ours = preprocess([source], llama2_legacy_tokenizer, has_image=has_image)["labels"][0].tolist()
    seed = seed_labels(source, llama2_legacy_tokenizer, has_image, **SEED_V1)
    assert any(label != IGNORE_INDEX for label in seed)
    assert ours == seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=ordinary_conversation())
def test_masks_equal_seed_arithmetic_qwen(real_qwen_tokenizer, source):
    conversation_lib.set_default_conversation("qwen")
    has_image = "<image>" in source[0]["value"]
    ours = preprocess([source], real_qwen_tokenizer, has_image=has_image)["labels"][0].tolist()
    seed = seed_labels(source, real_qwen_tokenizer, has_image, **SEED_QWEN)
    assert any(label != IGNORE_INDEX for label in seed)
    assert ours == seed


@pytest.mark.parametrize("vocab,version", [("qwen", "qwen"), ("llama2", "v1")])
def test_the_separator_space_is_trained_when_the_tokenizer_keeps_it_apart(request, vocab, version):
    # Both vocabularies keep the space before a digit as its own token (" 5" -> " ", "5"). Inference prompts
    # end at "ASSISTANT:", so that space is the first token the model must produce: it is trained.
    tokenizer = request.getfixturevalue(f"real_{vocab}_tokenizer")
    conversation_lib.set_default_conversation(version)
    source = [{"from": "human", "value": "How many cats?"}, {"from": "gpt", "value": "5 cats."}]
    out = preprocess([source], tokenizer)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    (start, end), = find_trained_spans(labels)
    assert tokenizer.decode(ids[start - 1:start]).endswith(":")
    assert tokenizer.decode(ids[start:start + 1], skip_special_tokens=False).strip() == ""
    assert tokenizer.decode(ids[start + 1:end]).strip() == f"5 cats.{tokenizer.eos_token}"


def test_seed_drops_a_sample_whose_answer_contains_the_role_separator(real_qwen_tokenizer):
    conversation_lib.set_default_conversation("qwen")
    answer = "Type ' ASSISTANT: ' to start a reply."
    source = [{"from": "human", "value": "How do I reply?"}, {"from": "gpt", "value": answer}]
    out = preprocess([source], real_qwen_tokenizer)
    ids, ours = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    (start, end), = find_trained_spans(ours)
    assert real_qwen_tokenizer.decode(ids[start:end]) == " " + answer + "<|endoftext|>"  # " Type" holds the space
    assert all(label == IGNORE_INDEX for label in seed_labels(source, real_qwen_tokenizer, False, **SEED_QWEN))


@pytest.mark.parametrize("answer", ["Write </s> to end a turn.", "It says ' ASSISTANT: hello'."])
def test_seed_v1_drops_a_llama_sample_whose_answer_contains_a_separator(llama2_legacy_tokenizer, answer):
    # The seed splits the rendered text on "</s>" and " ASSISTANT: ", so an answer containing either
    # breaks its round count and the whole sample is silently masked.
    conversation_lib.set_default_conversation("v1")
    source = [
        {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What does the sign say?"}, {"from": "gpt", "value": answer},
    ]
    out = preprocess([source], llama2_legacy_tokenizer)
    ids, ours = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    decoded = [llama2_legacy_tokenizer.decode(ids[s:e]).strip() for s, e in find_trained_spans(ours)]
    assert [text.replace(" ", "") for text in decoded] == ["Acat.</s>", (answer + "</s>").replace(" ", "")]
    assert all(label == IGNORE_INDEX for label in seed_labels(source, llama2_legacy_tokenizer, False, **SEED_V1))


# ----------------------------------------------------------------------------------------------------------
# Stage 1


def test_plain_trains_caption_and_newline_and_keeps_every_image(toy_tokenizers):
    conversation_lib.set_default_conversation("plain")
    tokenizer = toy_tokenizers["llama"]
    source = [{"from": "human", "value": "<image>\n<image>\nDescribe both."}, {"from": "gpt", "value": "Two cats."}]
    out = preprocess([source], tokenizer, has_image=True)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert ids[:3] == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]
    assert labels[:3] == [IGNORE_INDEX] * 3
    assert ids[3:] == labels[3:]
    assert tokenizer.decode(ids[3:]).strip() == "Two cats."
    assert ids[3:] == tokenizer_image_token("<image>Two cats.\n", tokenizer)[2:]


def test_plain_sample_without_image_is_an_error(toy_tokenizers):
    conversation_lib.set_default_conversation("plain")
    source = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}]
    with pytest.raises(ConversationFormatError, match="sample 'pt-7'.*<image>"):
        preprocess([source], toy_tokenizers["llama"], has_image=True, sample_ids=["pt-7"])


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_leading_assistant_turn_is_dropped(toy_tokenizers):
    conversation_lib.set_default_conversation("v1")
    tokenizer = toy_tokenizers["llama"]
    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    with_leading = [{"from": "gpt", "value": "I start."}] + turns
    assert preprocess([with_leading], tokenizer)["input_ids"][0].tolist() == \
        preprocess([turns], tokenizer)["input_ids"][0].tolist()


def test_non_alternating_turns_name_the_sample_and_fix(toy_tokenizers):
    conversation_lib.set_default_conversation("v1")
    source = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    with pytest.raises(ConversationFormatError, match=r"sample 'abc'.*turn 1 is from 'human'.*must alternate"):
        preprocess([source], toy_tokenizers["llama"], sample_ids=["abc"])


def test_unknown_speaker_is_an_error(toy_tokenizers):
    conversation_lib.set_default_conversation("v1")
    with pytest.raises(ConversationFormatError, match="unknown speaker"):
        preprocess([[{"from": "robot", "value": "x"}]], toy_tokenizers["llama"])


def test_conversation_without_answer_is_reported(toy_tokenizers):
    conversation_lib.set_default_conversation("v1")
    with pytest.raises(LabelAlignmentError) as error:
        preprocess([[{"from": "human", "value": "Hello?"}]], toy_tokenizers["llama"], sample_ids=[3])
    assert error.value.kind == "no_labels" and error.value.sample_id == 3


def test_truncation_to_no_labels_is_reported(qwen_copy):
    conversation_lib.set_default_conversation("qwen")
    qwen_copy.model_max_length = 20
    source = [{"from": "human", "value": "word " * 50}, {"from": "gpt", "value": "An answer."}]
    with pytest.raises(LabelAlignmentError, match="--model_max_length 20: truncation would cut 5 of its 5 answer"
                       ) as error:
        preprocess([source], qwen_copy, sample_ids=["long-1"])
    assert error.value.kind == "truncated" and error.value.sample_id == "long-1"


def test_an_answer_cut_partly_is_refused_never_trained_without_its_end_token(qwen_copy):
    conversation_lib.set_default_conversation("qwen")
    short = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "word " * 50}]
    qwen_copy.model_max_length = 10**6
    full = preprocess([short], qwen_copy)
    (answer_start, answer_end), = find_trained_spans(full["labels"][0].tolist())
    qwen_copy.model_max_length = answer_end - 1  # everything but the end token fits
    with pytest.raises(LabelAlignmentError, match="would cut 1 of its") as error:
        preprocess([short], qwen_copy)
    assert error.value.kind == "truncated"
    qwen_copy.model_max_length = answer_end  # exactly fits
    assert torch.equal(preprocess([short], qwen_copy)["labels"][0], full["labels"][0])


def test_truncation_that_cuts_an_image_placeholder_is_reported(qwen_copy):
    conversation_lib.set_default_conversation("qwen")
    qwen_copy.model_max_length = 30
    source = [{"from": "human", "value": "Hi " + "x " * 40 + "<image>"}, {"from": "gpt", "value": "ok"}]
    with pytest.raises(LabelAlignmentError, match="cut 1 of its 1 image") as error:
        preprocess([source], qwen_copy, has_image=True)
    assert error.value.kind == "truncated"


def test_the_length_counts_each_image_as_its_expanded_tokens(qwen_copy):
    """An answer that fits in text tokens but falls past the cut once the image becomes 576 tokens."""
    conversation_lib.set_default_conversation("qwen")
    source = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat on a mat."}]
    qwen_copy.model_max_length = 10**6
    ids = preprocess([source], qwen_copy, has_image=True)["input_ids"][0]
    expanded = len(ids) - 1 + 576
    qwen_copy.model_max_length = expanded - 1
    assert len(ids) < qwen_copy.model_max_length  # fits when the image counts as one token ...
    preprocess([source], qwen_copy, has_image=True, image_tokens=1)
    with pytest.raises(LabelAlignmentError, match=rf"it is {expanded} tokens long, each of its 1 image\(s\) "
                       r"counted as 576 tokens.*would cut 1 of its"):
        preprocess([source], qwen_copy, has_image=True, image_tokens=576)  # ... not as 576
    qwen_copy.model_max_length = expanded
    preprocess([source], qwen_copy, has_image=True, image_tokens=576)
    # Where only text past the last answer is cut, the sample is kept whole up to there.
    trailing = source + [{"from": "human", "value": "And then? " * 20}]
    out = preprocess([trailing], qwen_copy, has_image=True, image_tokens=576)
    assert torch.equal(out["input_ids"][0], ids)


def test_wrong_template_for_tokenizer_fails_early(toy_tokenizers):
    conversation_lib.set_default_conversation("v1")  # "</s>" is no token of Qwen's vocabulary
    source = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    with pytest.raises(TokenizerTemplateError, match="'</s>'.*splits it into"):
        preprocess([source], toy_tokenizers["qwen"])


def test_pad_equal_to_end_token_is_refused(qwen_copy):
    conversation_lib.set_default_conversation("qwen")
    qwen_copy.pad_token = "<|endoftext|>"
    with pytest.raises(TokenizerTemplateError, match="hide every end of answer"):
        preprocess([[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]], qwen_copy)


def test_eos_must_end_answers_for_qwen_phi_stablelm(qwen_copy):
    conversation_lib.set_default_conversation("qwen")
    qwen_copy.eos_token = "<|im_end|>"
    with pytest.raises(TokenizerTemplateError, match="eos"):
        preprocess([[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]], qwen_copy)


def test_an_answer_that_cannot_be_aligned_is_loud(toy_tokenizers):
    # A researcher's template with no separator between the role and the answer: when the role's last
    # letter and the answer's first letters form one token, no token boundary marks where the answer starts.
    tokenizer = toy_tokenizers["qwen"]
    word = next(
        text for text in sorted((tokenizer.decode([i]) for i in range(len(tokenizer))), key=len, reverse=True)
        if text.isalpha() and text.isascii() and len(tokenizer(text).input_ids) == 1
    )
    conversation_lib.default_conversation = Conversation(
        system="", roles=("Q", word[0]), messages=[], offset=0, sep_style=SeparatorStyle.MPT,
        sep="<|im_end|>", version="mpt",
    )
    source = [{"from": "human", "value": "x"}, {"from": "gpt", "value": word[1:]}]
    with pytest.raises(LabelAlignmentError, match="sample 'm-1'.*decode to") as error:
        preprocess([source], tokenizer, sample_ids=["m-1"])
    assert error.value.kind == "mismatch"


def test_too_many_images_is_an_error_not_a_cut():
    source = [{"from": "human", "value": "<image>" * (MAX_IMAGE_LENGTH + 1)}, {"from": "gpt", "value": "x"}]
    with pytest.raises(ConversationFormatError, match=f"at most {MAX_IMAGE_LENGTH}"):
        preprocess_multimodal([source], sample_ids=["many"])


def test_preprocess_multimodal_start_end_tokens_keep_positions():
    source = [{"from": "human", "value": "Look: <image> now"}, {"from": "gpt", "value": "ok"}]
    preprocess_multimodal([source], mm_use_im_start_end=True)
    assert source[0]["value"] == "Look: <im_start><image><im_end> now"
