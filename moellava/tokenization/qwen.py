"""QWenTokenizer: Qwen (v1)'s tiktoken BPE as a transformers 4.31 slow tokenizer, with no remote code.

The vocabulary file `qwen.tiktoken` holds one `base64(token_bytes) rank` line per BPE token. Special tokens
are not in the file: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>` ... `<|extra_204|>` follow
the ranks in that order (151643, 151644, ... on the official vocabulary). As in the official tokenizer,
text is NFC-normalised, special tokens written in the text are encoded as special tokens, regular tokens
are `bytes` (a token may hold part of a UTF-8 character) and decoding replaces broken UTF-8.

`TiktokenTokenizer` is the shared base: Arcade100k (StableLM-2) was derived from Qwen's tokenizer and
differs only in its file name, special tokens and where they start (see `arcade100k.py`).
"""

import base64
import logging
import os
import unicodedata
from typing import Dict, List, Optional, Tuple, Union

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

logger = logging.getLogger(__name__)

# The Qwen-v1 pre-tokenisation regex (cl100k's, with digits split one by one).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)


def load_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    """Read a tiktoken rank file (`base64(token) rank` per line); ranks must be exactly 0..N-1."""
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'base64(token) rank', got {line[:80]!r}")
            token = base64.b64decode(fields[0], validate=True)
            if token in ranks:
                raise ValueError(f"{path}:{line_no}: token {token!r} appears twice")
            ranks[token] = int(fields[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the integers 0..{len(ranks) - 1}, each once")
    return ranks


def write_tiktoken_ranks(ranks: Dict[bytes, int], path: str) -> None:
    """Write ranks in the official format, ordered by rank."""
    with open(path, "w", encoding="utf-8") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


class TiktokenTokenizer(PreTrainedTokenizer):
    """A tiktoken BPE (rank file + regex) with a fixed list of special tokens placed after the ranks."""

    model_input_names = ["input_ids", "attention_mask"]
    # Set by subclasses.
    vocab_file_name: str
    pattern: str
    special_token_list: Tuple[str, ...]
    suggested_unk_token: str  # named in error messages

    @staticmethod
    def first_special_id(num_ranks: int) -> int:
        return num_ranks

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs):
        self.vocab_file = vocab_file
        self.errors = errors
        self.mergeable_ranks = load_tiktoken_ranks(vocab_file)
        start = self.first_special_id(len(self.mergeable_ranks))
        self.special_tokens = {token: start + i for i, token in enumerate(self.special_token_list)}
        self.encoding = tiktoken.Encoding(
            name=type(self).__name__,
            pat_str=self.pattern,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.decoder: Dict[int, Union[bytes, str]] = {i: t for t, i in self.mergeable_ranks.items()}
        self.decoder.update({i: t for t, i in self.special_tokens.items()})
        super().__init__(errors=errors, **kwargs)

    # --- vocabulary ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> Dict[Union[bytes, str], int]:
        vocab: Dict[Union[bytes, str], int] = dict(self.mergeable_ranks)
        vocab.update(self.special_tokens)
        return vocab

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, bytes):  # one regular token; the base class would iterate over its bytes
            return self._convert_token_to_id(tokens)
        return super().convert_tokens_to_ids(tokens)

    def _convert_token_to_id(self, token: Union[bytes, str]) -> int:
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        as_bytes = token.encode("utf-8") if isinstance(token, str) else token
        if as_bytes in self.mergeable_ranks:
            return self.mergeable_ranks[as_bytes]
        raise ValueError(
            f"{token!r} is not a token of {type(self).__name__}; its special tokens are "
            f"{self._special_tokens_summary()}"
        )

    def _convert_id_to_token(self, index: int) -> Union[bytes, str]:
        if index in self.decoder:
            return self.decoder[index]
        raise ValueError(f"id {index} is not in the vocabulary of {type(self).__name__} ({len(self)} ids)")

    def _special_tokens_summary(self) -> str:
        tokens = self.special_token_list
        if len(tokens) <= 8:
            return ", ".join(tokens)
        return f"{', '.join(tokens[:4])}, ..., {tokens[-1]}"

    # --- encoding and decoding -------------------------------------------------------------------------
    def tokenize(
        self, text: str, allowed_special: Union[str, set] = "all", disallowed_special=(), **kwargs
    ) -> List[Union[bytes, str]]:
        """Encode the whole text with tiktoken; special tokens written in it are special (as the official)."""
        if kwargs:
            logger.warning("Keyword arguments %s not recognized.", sorted(kwargs))
        text = unicodedata.normalize("NFC", text)
        ids = self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return [self.decoder[i] for i in ids]

    def _tokenize(self, text, **kwargs):
        # `tokenize` encodes whole texts; the base class never calls this for tiktoken tokenizers.
        raise NotImplementedError(f"{type(self).__name__} tokenizes whole texts in `tokenize`")

    def convert_tokens_to_string(self, tokens: List[Union[bytes, str]]) -> str:
        pieces: List[str] = []
        pending = b""
        for token in tokens:
            if isinstance(token, bytes):
                pending += token
                continue
            if not isinstance(token, str):
                raise TypeError(f"tokens must be bytes or str, got {type(token).__name__}")
            if pending:
                pieces.append(pending.decode("utf-8", errors=self.errors))
                pending = b""
            pieces.append(token)
        if pending:
            pieces.append(pending.decode("utf-8", errors=self.errors))
        return "".join(pieces)

    def _decode(
        self, token_ids: Union[int, List[int]], skip_special_tokens: bool = False, errors: Optional[str] = None,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        unknown = [i for i in token_ids if i not in self.decoder]
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are not in the vocabulary of {type(self).__name__} ({len(self)} ids)")
        if skip_special_tokens:
            special_ids = set(self.special_tokens.values())
            token_ids = [i for i in token_ids if i not in special_ids]
        return self.encoding.decode(token_ids, errors=errors or self.errors)

    # --- special tokens --------------------------------------------------------------------------------
    def _check_own_special_tokens(self, tokens) -> None:
        for token in tokens:
            text = str(token)
            if text not in self.special_tokens:
                raise ValueError(
                    f"{type(self).__name__} cannot use {text!r} as a special token: it has a fixed vocabulary and "
                    f"can only use its own special tokens ({self._special_tokens_summary()}), "
                    f"e.g. unk_token={self.suggested_unk_token!r}."
                )

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_file_name
        path = os.path.join(save_directory, name)
        write_tiktoken_ranks(self.mergeable_ranks, path)
        return (path,)


class QWenTokenizer(TiktokenTokenizer):
    """Qwen-v1 tokenizer. No bos/eos/unk/pad by default; `add_special_tokens` accepts only its own tokens."""

    vocab_file_name = "qwen.tiktoken"
    vocab_files_names = {"vocab_file": vocab_file_name}
    pattern = QWEN_PATTERN
    special_token_list = QWEN_SPECIAL_TOKENS
    suggested_unk_token = "<|extra_0|>"

    def add_special_tokens(self, special_tokens_dict, replace_additional_special_tokens: bool = True) -> int:
        # Check before the base class assigns any attribute, so a refused call leaves the tokenizer unchanged.
        for value in special_tokens_dict.values():
            self._check_own_special_tokens(value if isinstance(value, (list, tuple)) else [value])
        return super().add_special_tokens(special_tokens_dict, replace_additional_special_tokens)

    def _add_tokens(self, new_tokens: List[Union[str, AddedToken]], special_tokens: bool = False) -> int:
        self._check_own_special_tokens(new_tokens)
        return 0  # they are already in the vocabulary
