"""Each backbone family's tokenizer rules, as one table, and `load_tokenizer()` that applies them.

Families treat bos/eos/unk/pad differently and the label masks depend on it:
  llama, mistral: LlamaTokenizer (transformers 4.31) as loaded: `<unk>`=0, `<s>`=1 added in front, `</s>`=2.
  qwen:     no special token is set; add unk `<|extra_0|>` and eos `<|endoftext|>` (both already in the vocab).
  phi:      CodeGen BPE with eos `<|endoftext|>`; add unk `<|extra_0|>` (a new token: id = old len(tokenizer)).
  stablelm: Arcade100k cannot add tokens; assign unk `<|reg0|>`.
Every family then pads with unk. The family comes from config.json's `model_type`, else from the tokenizer
class; `family=` overrides. Folder names are never used.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerFamily:
    name: str
    version: str  # default conversation template (`--version`) for stages 2 and 3
    train_modules: Tuple[str, ...]  # default MoE `--train_modules` (FFN weight names + router `wg`)
    # default `--lora_target`: the decoder layers' attention and FFN Linear names (experts' FFNs included)
    lora_target: Tuple[str, ...]
    model_types: Tuple[str, ...]  # config.json model_type values that belong to this family
    tokenizer_classes: Tuple[str, ...]  # tokenizer classes that indicate this family
    # Special tokens set through `tokenizer.add_special_tokens` (may append a new token to the vocabulary).
    add_special_tokens: Dict[str, str] = field(default_factory=dict)
    # Special tokens assigned directly, for tokenizers that cannot add tokens.
    assign_special_tokens: Dict[str, str] = field(default_factory=dict)


_LLAMA_FFN = ("gate_proj", "up_proj", "down_proj", "wg")
_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: Dict[str, TokenizerFamily] = {
    "llama": TokenizerFamily(
        name="llama",
        version="v1",
        train_modules=_LLAMA_FFN,
        lora_target=_LLAMA_LORA,
        model_types=("llama", "llava_llama", "moe_llava_llama"),
        tokenizer_classes=("LlamaTokenizer",),
    ),
    "mistral": TokenizerFamily(
        name="mistral",
        version="mistral",
        train_modules=_LLAMA_FFN,
        lora_target=_LLAMA_LORA,
        model_types=("mistral", "llava_mistral", "moe_llava_mistral"),
        tokenizer_classes=(),  # Mistral ships a LlamaTokenizer; only its model_type tells it apart
    ),
    "qwen": TokenizerFamily(
        name="qwen",
        version="qwen",
        train_modules=("mlp.w1", "mlp.w2", "mlp.c_proj", "wg"),  # plain "c_proj" would also train attn.c_proj
        lora_target=("c_attn", "c_proj", "w1", "w2"),  # attn.c_attn and attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj
        model_types=("qwen", "llava_qwen", "moe_llava_qwen"),
        tokenizer_classes=("QWenTokenizer",),
        add_special_tokens={"unk_token": "<|extra_0|>", "eos_token": "<|endoftext|>"},
    ),
    "phi": TokenizerFamily(
        name="phi",
        version="phi",
        train_modules=("fc1", "fc2", "wg"),
        lora_target=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
        model_types=("phi", "llava_phi", "moe_llava_phi"),
        tokenizer_classes=("CodeGenTokenizer",),
        add_special_tokens={"unk_token": "<|extra_0|>"},
    ),
    "stablelm": TokenizerFamily(
        name="stablelm",
        version="stablelm",
        train_modules=_LLAMA_FFN,
        lora_target=_LLAMA_LORA,
        model_types=("stablelm", "stablelm_epoch", "llava_stablelm", "moe_llava_stablelm"),
        tokenizer_classes=("Arcade100kTokenizer",),
        assign_special_tokens={"unk_token": "<|reg0|>"},
    ),
}

def _override_hint() -> str:
    return f"pass family=<one of {', '.join(FAMILIES)}> to load_tokenizer to choose the rules explicitly"


def _unknown(what: str) -> ValueError:
    return ValueError(f"{what} does not belong to a known tokenizer family; {_override_hint()}")


def get_family(name: str) -> TokenizerFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for_model_type(model_type: str) -> str:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family.name
    raise _unknown(f"model_type {model_type!r}")


def family_for_tokenizer_class(class_name: str) -> str:
    name = class_name[: -len("Fast")] if class_name.endswith("Fast") else class_name
    for family in FAMILIES.values():
        if name in family.tokenizer_classes:
            return family.name
    raise _unknown(f"tokenizer class {class_name!r}")


def _read_json_field(path: str, key: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get(key)


def detect_family(
    path_or_config: Union[str, os.PathLike, PretrainedConfig, None] = None,
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
) -> str:
    """Family from a config's `model_type` (a config object, or a folder's config.json), else from the
    tokenizer class (the given tokenizer, or the folder's tokenizer_config.json)."""
    tokenizer_class = None
    if isinstance(path_or_config, PretrainedConfig):
        return family_for_model_type(path_or_config.model_type)
    if path_or_config is not None:
        folder = os.fspath(path_or_config)
        model_type = _read_json_field(os.path.join(folder, "config.json"), "model_type")
        if model_type:
            try:
                return family_for_model_type(model_type)
            except ValueError as err:
                raise ValueError(f"{folder}/config.json: {err}") from None
        tokenizer_class = _read_json_field(os.path.join(folder, "tokenizer_config.json"), "tokenizer_class")
    if tokenizer is not None:
        tokenizer_class = type(tokenizer).__name__
    if tokenizer_class is None:
        raise ValueError(
            f"cannot tell the tokenizer family of {path_or_config!r}: no config.json model_type and no "
            f"tokenizer class; {_override_hint()}"
        )
    return family_for_tokenizer_class(tokenizer_class)


def apply_family_rules(tokenizer: PreTrainedTokenizerBase, family: str) -> PreTrainedTokenizerBase:
    """Set the family's special tokens, pad = unk, and check the result (in place; returns the tokenizer)."""
    rules = get_family(family)
    if rules.add_special_tokens:
        # transformers 4.31 never adds a token that is already the unk_token, and add_special_tokens assigns
        # unk before adding: a new unk (phi's <|extra_0|>) must enter the vocabulary first.
        tokenizer.add_tokens(list(rules.add_special_tokens.values()), special_tokens=True)
        tokenizer.add_special_tokens(dict(rules.add_special_tokens))
    for attribute, token in rules.assign_special_tokens.items():
        setattr(tokenizer, attribute, token)
    if tokenizer.unk_token is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no unk token after the {family!r} rules, so there is nothing to pad "
            f"with; check the family or {_override_hint()}"
        )
    tokenizer.pad_token = tokenizer.unk_token
    _verify(tokenizer, rules)
    logger.info(
        "tokenizer family %s: %s; eos id %s, unk id %s, pad id %s, %d ids",
        family, tokenizer.special_tokens_map, tokenizer.eos_token_id, tokenizer.unk_token_id,
        tokenizer.pad_token_id, len(tokenizer),
    )
    return tokenizer


def _verify(tokenizer: PreTrainedTokenizerBase, rules: TokenizerFamily) -> None:
    """The rules took effect, and the end-of-turn token written in text (as templates write it) is one token."""
    wanted = {**rules.add_special_tokens, **rules.assign_special_tokens}
    for attribute, token in wanted.items():
        actual = tokenizer.special_tokens_map.get(attribute)
        if actual != token:
            raise ValueError(f"{rules.name} rules: {attribute} is {actual!r}, expected {token!r}")
    for attribute in ("unk_token", "pad_token", "eos_token"):
        token = tokenizer.special_tokens_map.get(attribute)
        if token is None:
            raise ValueError(f"{rules.name} rules: the tokenizer has no {attribute}")
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"{rules.name} rules: {attribute} {token!r} is not a token of the vocabulary")
    eos = tokenizer.special_tokens_map["eos_token"]
    eos_in_text = tokenizer(eos, add_special_tokens=False).input_ids
    if eos_in_text != [tokenizer.eos_token_id]:
        raise ValueError(
            f"{type(tokenizer).__name__} does not read {eos!r} in text as the eos token (got ids {eos_in_text}, "
            f"expected [{tokenizer.eos_token_id}]); conversation templates write it as text. Load the tokenizer "
            "from its folder with tokenizer_config.json (from_pretrained), not from the vocabulary file alone."
        )


def load_tokenizer(
    path: Union[str, os.PathLike],
    family: Optional[str] = None,
    *,
    model_max_length: Optional[int] = None,
    padding_side: str = "right",
    cache_dir: Optional[str] = None,
) -> PreTrainedTokenizerBase:
    """The slow tokenizer of `path` with its family's rules applied (family detected unless given)."""
    if family is not None:
        get_family(family)  # fail before loading
    # Code shipped in a model folder (auto_map) never runs: the QWen and Arcade100k tokenizers are our own.
    kwargs = {"use_fast": False, "padding_side": padding_side, "cache_dir": cache_dir, "trust_remote_code": False}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    kwargs.update(_reload_safe_unk(path, family))
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), **kwargs)
    if family is None:
        family = detect_family(path, tokenizer)
    return apply_family_rules(tokenizer, family)


def _reload_safe_unk(path: Union[str, os.PathLike], family: Optional[str]) -> Dict[str, str]:
    """Loading kwargs that keep an added unk token (phi's `<|extra_0|>`) in a folder saved after the rules.

    transformers 4.31's slow tokenizers never add a token equal to their unk token, so such a folder would
    reload without it (and every later added token would shift by one id). Loading with unk = eos restores
    the added tokens at their saved ids; the family rules then make `<|extra_0|>` the unk again.
    """
    if family is None:
        try:
            family = detect_family(path)
        except ValueError:
            return {}
    if "unk_token" not in get_family(family).add_special_tokens:
        return {}
    eos = _read_json_field(os.path.join(os.fspath(path), "tokenizer_config.json"), "eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return {"unk_token": eos} if eos else {}
