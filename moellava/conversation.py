"""Conversation templates: the registry researchers edit (`conv_templates`), selected with `--version`.

Prompt strings are those of the original MoE-LLaVA (see the spec, section 2.5), with three deliberate fixes:
- `plain` renders an assistant turn (its `sep2` was None, so any answer raised TypeError);
- `qwen` is a template of its own (version "qwen") instead of an alias of `phi`;
- an empty message ("") is rendered as an empty turn, followed by its separator; only `None` means
  "leave the turn open for generation". The original treated "" like None, which drops the end token
  of an empty answer from the training text.
"""

import dataclasses
from enum import Enum, auto
from typing import List, Optional, Tuple


class SeparatorStyle(Enum):
    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()


@dataclasses.dataclass
class Conversation:
    system: str
    roles: Tuple[str, str]
    messages: List[List[Optional[str]]]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: Optional[str] = None
    version: str = "Unknown"

    def render(self) -> List[Tuple[str, bool]]:
        """The prompt as consecutive pieces `(text, is_answer)`.

        `is_answer` pieces are exactly what training learns: each assistant message plus its end-of-turn
        string, preceded by the separator that follows the role (" " in "ASSISTANT: "). At inference the
        prompt ends at the role ("ASSISTANT:", see `get_prompt` with a `None` message), so that separator is
        the first thing the model must generate. The pieces concatenate to `get_prompt()`, so training and
        inference see the same text.
        """
        style = self.sep_style
        if style == SeparatorStyle.LLAMA_2:
            return self._render_llama_2()
        pieces: List[Tuple[str, bool]] = []
        if style == SeparatorStyle.PLAIN:
            pieces.append((self.system, False))
            for i, (_, message) in enumerate(self.messages):
                if message is not None:
                    sep = self.sep if i % 2 == 0 else self.sep2
                    pieces.append((message + sep, i % 2 == 1))
            return pieces
        pieces.append((self.system + self.sep, False))
        for i, (role, message) in enumerate(self.messages):
            if style == SeparatorStyle.MPT:
                head, gap, end = role, "", self.sep
            elif style == SeparatorStyle.TWO:
                head, gap, end = role + ":", " ", (self.sep, self.sep2)[i % 2]
            elif style == SeparatorStyle.SINGLE:
                head, gap, end = role + ":", " ", self.sep
            else:
                raise ValueError(f"Unknown separator style {style}")
            pieces.append((head, False))
            if message is not None:
                pieces.append((gap + message + end, i % 2 == 1))
        return pieces

    def _render_llama_2(self) -> List[Tuple[str, bool]]:
        def wrap_sys(text: str) -> str:
            return f"<<SYS>>\n{text}\n<</SYS>>\n\n" if text else ""

        pieces: List[Tuple[str, bool]] = []
        for i, (role, message) in enumerate(self.messages):
            if i == 0:
                if message is None or role != self.roles[0]:
                    raise ValueError("A llama_2 conversation must start with a non-empty user message.")
                message = wrap_sys(self.system) + message
            if i % 2 == 0:
                text = f"{self.sep}[INST] {message} [/INST]" if message is not None else ""
                pieces.append((text.removeprefix(self.sep) if i == 0 else text, False))
            elif message is not None:
                pieces.append((f" {message} {self.sep2}", True))
        return pieces

    def get_prompt(self) -> str:
        return "".join(text for text, _ in self.render())

    def append_message(self, role: str, message: Optional[str]) -> None:
        self.messages.append([role, message])

    @property
    def stop_str(self) -> str:
        """The string generation stops at: the end-of-turn marker of an assistant turn."""
        uses_sep2 = (SeparatorStyle.TWO, SeparatorStyle.PLAIN, SeparatorStyle.LLAMA_2)
        return self.sep2 if self.sep_style in uses_sep2 else self.sep

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[[role, message] for role, message in self.messages])

    def dict(self) -> dict:
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": self.messages,
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)


def _two_sep(version: str, end_token: str, system: str = SYSTEM_USER) -> Conversation:
    """The USER/ASSISTANT template most backbones use, ending each answer with `end_token`."""
    return Conversation(
        system=system,
        roles=("USER", "ASSISTANT"),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle.TWO,
        sep=" ",
        sep2=end_token,
        version=version,
    )


conv_vicuna_v0 = Conversation(
    system=SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    messages=[
        ["Human", "What are the key differences between renewable and non-renewable energy sources?"],
        [
            "Assistant",
            "Renewable energy sources are those that can be replenished naturally in a relatively short amount "
            "of time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the "
            "other hand, are finite and will eventually be depleted, such as coal, oil, and natural gas.",
        ],
    ],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_vicuna_v1 = _two_sep("v1", "</s>")
conv_openchat = _two_sep("openchat", "<|end_of_turn|>")
conv_mistral = _two_sep("mistral", "</s>")
conv_phi = _two_sep("phi", "<|endoftext|>")
conv_qwen = _two_sep("qwen", "<|endoftext|>")
conv_stablelm = _two_sep("stablelm", "<|endoftext|>")

def _llama_2(system: str) -> Conversation:
    """Llama-2 chat: `[INST] <<SYS>>...<</SYS>> question [/INST] answer </s><s>[INST] ...`."""
    return Conversation(
        system=system,
        roles=("USER", "ASSISTANT"),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle.LLAMA_2,
        sep="<s>",
        sep2="</s>",
        version="llama_v2",
    )


conv_llama_2 = _llama_2(
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
    "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
    "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
    "instead of answering something not correct. If you don't know the answer to a question, please "
    "don't share false information."
)
conv_llava_llama_2 = _llama_2(
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)

conv_mpt = Conversation(
    system=(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers."
    ),
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
    sep2="\n",
    version="plain",
)

def _single_sep(system: str, version: str = "Unknown") -> Conversation:
    """The `###`-separated Human/Assistant template of LLaVA v0."""
    return Conversation(
        system=system,
        roles=("Human", "Assistant"),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle.SINGLE,
        sep="###",
        version=version,
    )


conv_llava_v0 = _single_sep(SYSTEM_HUMAN)
conv_llava_v0_mmtag = _single_sep(SYSTEM_MMTAG, "v0_mmtag")
conv_llava_v1 = _two_sep("v1", "</s>", system=SYSTEM_HUMAN)
conv_llava_v1_mmtag = _two_sep("v1_mmtag", "</s>", system=SYSTEM_MMTAG)

conv_templates = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "openchat": conv_openchat,
    "mistral": conv_mistral,
    "phi": conv_phi,
    "qwen": conv_qwen,
    "stablelm": conv_stablelm,
    "llama_2": conv_llama_2,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}

default_conversation = conv_vicuna_v1


def get_conv_template(version: str) -> Conversation:
    """A fresh copy of the template registered as `version`; unknown names list the choices."""
    if version not in conv_templates:
        raise KeyError(
            f"Unknown conversation template --version {version!r}. "
            f"Choose one of: {', '.join(sorted(conv_templates))} (or register yours in moellava/conversation.py)."
        )
    return conv_templates[version].copy()


def set_default_conversation(version: str) -> Conversation:
    """Select the template `preprocess()` uses (what `--version` does in training)."""
    global default_conversation
    default_conversation = get_conv_template(version)
    return default_conversation
