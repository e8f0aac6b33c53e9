"""Arcade100kTokenizer: StableLM-2's tiktoken BPE as a transformers 4.31 slow tokenizer, with no remote code.

Vocabulary file `arcade100k.tiktoken` (one `base64(token_bytes) rank` line per token). Pre-tokenisation is
cl100k's regex with digits split one by one, i.e. the same regex as Qwen-v1. Its 32 special tokens follow
the ranks after a gap of one id: the official vocabulary has 100256 ranks (ids 0..100255), id 100256 is
unused and `<|endoftext|>` is 100257 ... `<|reg0|>` 100280 ... `<|extra0|>` 100288. The rule "specials
start at len(ranks) + 1" reproduces those ids and applies unchanged to smaller (toy) rank files.

bos = eos = pad = `<|endoftext|>`, as the official class sets them. The tokenizer cannot grow: adding
tokens is refused; assigning one of its own special tokens (`tokenizer.unk_token = '<|reg0|>'`) works.
"""

from typing import List, Union

from transformers import AddedToken

from .qwen import QWEN_PATTERN, TiktokenTokenizer

ARCADE100K_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<gh_stars>",
    "<filename>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
    "<|endofprompt|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pause|>",
    "<|reg0|>",
    "<|reg1|>",
    "<|reg2|>",
    "<|reg3|>",
    "<|reg4|>",
    "<|reg5|>",
    "<|reg6|>",
    "<|reg7|>",
    "<|extra0|>",
)

CANNOT_ADD_MESSAGE = (
    "Arcade100kTokenizer cannot add tokens; choose one of its own special tokens, e.g. unk_token='<|reg0|>' "
    "(assign it: tokenizer.unk_token = '<|reg0|>')."
)


class Arcade100kTokenizer(TiktokenTokenizer):
    """StableLM-2 tokenizer: fixed vocabulary, bos = eos = pad = `<|endoftext|>`."""

    vocab_file_name = "arcade100k.tiktoken"
    vocab_files_names = {"vocab_file": vocab_file_name}
    pattern = QWEN_PATTERN
    special_token_list = ARCADE100K_SPECIAL_TOKENS
    suggested_unk_token = "<|reg0|>"

    @staticmethod
    def first_special_id(num_ranks: int) -> int:
        return num_ranks + 1  # one unused id between the ranks and the specials, as in the official vocabulary

    def __init__(
        self,
        vocab_file: str,
        errors: str = "replace",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        **kwargs,
    ):
        super().__init__(
            vocab_file, errors=errors, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, **kwargs
        )

    def add_special_tokens(self, special_tokens_dict, replace_additional_special_tokens: bool = True) -> int:
        raise ValueError(CANNOT_ADD_MESSAGE)

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        raise ValueError(CANNOT_ADD_MESSAGE)

    def sanitize_special_tokens(self) -> int:
        # Called by from_pretrained; the base class would go through add_tokens. Nothing is ever added here:
        # check instead that every special token set on this tokenizer is one of its own.
        self._check_own_special_tokens(self.all_special_tokens)
        return 0

    def _add_tokens(self, new_tokens: List[Union[str, AddedToken]], special_tokens: bool = False) -> int:
        raise ValueError(CANNOT_ADD_MESSAGE)
