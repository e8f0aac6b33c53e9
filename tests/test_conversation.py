"""Templates render the original MoE-LLaVA prompt strings (spec 2.5), plus our fixes."""

import pytest

from moellava import conversation as conversation_lib
from moellava.conversation import SYSTEM_HUMAN, SYSTEM_USER, SeparatorStyle, conv_templates, get_conv_template

U1, A1, U2, A2 = "<image>\nWhat is in the image?", "A cat.", "What color is it?", "Black."


def render(version, messages):
    conv = get_conv_template(version)
    conv.messages = []
    for i, message in enumerate(messages):
        conv.append_message(conv.roles[i % 2], message)
    return conv


@pytest.mark.parametrize("version,end", [
    ("phi", "<|endoftext|>"), ("qwen", "<|endoftext|>"), ("stablelm", "<|endoftext|>"),
    ("v1", "</s>"), ("vicuna_v1", "</s>"), ("mistral", "</s>"), ("openchat", "<|end_of_turn|>"),
])
def test_two_separator_templates(version, end):
    expected = (
        SYSTEM_USER + f" USER: {U1} ASSISTANT: {A1}{end}USER: {U2} ASSISTANT: {A2}{end}"
    )
    assert render(version, [U1, A1, U2, A2]).get_prompt() == expected
    gen = render(version, [U1, None])
    assert gen.get_prompt() == SYSTEM_USER + f" USER: {U1} ASSISTANT:"
    assert gen.stop_str == end


def test_llava_v1_uses_human_system_prompt():
    assert render("llava_v1", [U1, A1, U2, A2]).get_prompt() == (
        SYSTEM_HUMAN + f" USER: {U1} ASSISTANT: {A1}</s>USER: {U2} ASSISTANT: {A2}</s>"
    )


def test_llava_llama_2():
    system = conv_templates["llava_llama_2"].system
    conv = render("llava_llama_2", [U1, A1, U2, A2])
    assert conv.get_prompt() == (
        f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{U1} [/INST] {A1} </s><s>[INST] {U2} [/INST] {A2} </s>"
    )
    assert render("llava_llama_2", [U1, None]).get_prompt() == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{U1} [/INST]"


def test_mpt():
    assert render("mpt", [U1, A1, U2, A2]).get_prompt() == (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
        "helpful and honest answers.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nWhat color is it?<|im_end|>"
        "<|im_start|>assistant\nBlack.<|im_end|>"
    )


def test_v0():
    assert render("llava_v0", [U1, A1, U2, A2]).get_prompt() == (
        SYSTEM_HUMAN + f"###Human: {U1}###Assistant: {A1}###Human: {U2}###Assistant: {A2}###"
    )


def test_plain_renders_an_assistant_turn():
    # The original raised TypeError here (sep2 was None); spec 12.20.
    assert render("plain", [U1, A1]).get_prompt() == f"{U1}\n{A1}\n"
    assert render("plain", [U1, None]).get_prompt() == f"{U1}\n"


def test_qwen_is_its_own_template():
    assert conv_templates["qwen"] is not conv_templates["phi"]
    assert conv_templates["qwen"].version == "qwen"


def test_render_pieces_concatenate_to_prompt_and_mark_answers():
    conv = render("v1", [U1, A1, U2, A2])
    pieces = conv.render()
    assert "".join(text for text, _ in pieces) == conv.get_prompt()
    # An answer piece is what follows the inference prompt "... ASSISTANT:", separator included.
    assert [text for text, is_answer in pieces if is_answer] == [" " + A1 + "</s>", " " + A2 + "</s>"]
    llama = render("llava_llama_2", [U1, A1, U2, A2]).render()
    assert [text for text, is_answer in llama if is_answer] == [" " + A1 + " </s>", " " + A2 + " </s>"]
    mpt = render("mpt", [U1, A1]).render()
    assert [text for text, is_answer in mpt if is_answer] == [A1 + "<|im_end|>"]


@pytest.mark.parametrize("version", sorted(v for v, c in conv_templates.items() if c.sep_style != SeparatorStyle.PLAIN))
def test_answer_pieces_follow_the_generation_prompt(version):
    # Stage 1 (plain) trains on "<image>" + caption instead of the rendered question (preprocess_plain).
    conv = render(version, [U1, A1])
    gen = render(version, [U1, None]).get_prompt()
    prompt = "".join(text for text, is_answer in conv.render() if not is_answer)
    assert prompt == gen


def test_empty_answer_keeps_its_end_token():
    conv = render("phi", [U1, ""])
    assert conv.get_prompt().endswith("ASSISTANT: <|endoftext|>")
    assert [text for text, is_answer in conv.render() if is_answer] == [" <|endoftext|>"]


def test_unknown_version_lists_choices():
    with pytest.raises(KeyError, match="Choose one of"):
        get_conv_template("no-such-template")


def test_set_default_conversation_returns_a_copy():
    try:
        conv = conversation_lib.set_default_conversation("qwen")
        assert conversation_lib.default_conversation is conv
        conv.messages.append(["USER", "x"])
        assert conv_templates["qwen"].messages == []
    finally:
        conversation_lib.set_default_conversation("v1")
