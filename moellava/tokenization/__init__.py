"""Tokenizers and per-family tokenizer rules.

Importing this package registers `QWenTokenizer` and `Arcade100kTokenizer` with `AutoTokenizer`, so a folder
whose tokenizer_config.json names them as `tokenizer_class` loads with no `trust_remote_code`, also when it
carries the official `auto_map` entry.
"""

from transformers import AutoTokenizer, PretrainedConfig

from .arcade100k import Arcade100kTokenizer
from .families import (
    FAMILIES,
    TokenizerFamily,
    apply_family_rules,
    detect_family,
    family_for_model_type,
    family_for_tokenizer_class,
    get_family,
    load_tokenizer,
)
from .qwen import QWenTokenizer


# transformers 4.31 resolves a `tokenizer_class` name by searching the tokenizers registered per config
# class. The model configs live in moellava.model; these classes are only the registry keys, so that the
# tokenizers resolve without importing any model code.
class _QWenTokenizerKey(PretrainedConfig):
    pass


class _Arcade100kTokenizerKey(PretrainedConfig):
    pass


AutoTokenizer.register(_QWenTokenizerKey, slow_tokenizer_class=QWenTokenizer)
AutoTokenizer.register(_Arcade100kTokenizerKey, slow_tokenizer_class=Arcade100kTokenizer)

__all__ = [
    "Arcade100kTokenizer",
    "FAMILIES",
    "QWenTokenizer",
    "TokenizerFamily",
    "apply_family_rules",
    "detect_family",
    "family_for_model_type",
    "family_for_tokenizer_class",
    "get_family",
    "load_tokenizer",
]
