"""StableLM configuration: reads the official `config.json` of stabilityai/stablelm-2-* in both formats.

`model_type: stablelm` is the transformers-native format; `model_type: stablelm_epoch` is the older remote-code
format MoE-LLaVA-StableLM was built on. The epoch format names three fields differently (`norm_eps`, `rope_pct`,
`num_heads`) and carries `rotary_scaling_factor`; the weights and the architecture are the same.
"""
from transformers import PretrainedConfig

# stablelm_epoch field name -> stablelm field name.
EPOCH_FIELD_NAMES = {
    "norm_eps": "layer_norm_eps",
    "rope_pct": "partial_rotary_factor",
    "num_heads": "num_attention_heads",
}


def _pick(field, value, epoch_value, default):
    """Value of `field` given under its own name and/or its stablelm_epoch name; both must agree."""
    if value is not None and epoch_value is not None and value != epoch_value:
        epoch_name = next(old for old, new in EPOCH_FIELD_NAMES.items() if new == field)
        raise ValueError(
            f"StableLM config gives {field}={value} and its stablelm_epoch name {epoch_name}={epoch_value}; "
            f"they must agree: remove one of them from config.json."
        )
    if value is not None:
        return value
    return epoch_value if epoch_value is not None else default


class StableLmConfig(PretrainedConfig):
    model_type = "stablelm"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Lets code written against the epoch format read `config.norm_eps` etc.
    attribute_map = EPOCH_FIELD_NAMES

    def __init__(
        self,
        vocab_size=50304,
        intermediate_size=6912,
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=None,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        layer_norm_eps=None,
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=10_000,
        rope_scaling=None,
        use_qkv_bias=False,
        qk_layernorm=False,
        use_parallel_residual=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        partial_rotary_factor=None,
        bos_token_id=0,
        eos_token_id=0,
        norm_eps=None,
        rope_pct=None,
        num_heads=None,
        rotary_scaling_factor=1.0,
        **kwargs,
    ):
        if rope_scaling is not None:
            raise ValueError(
                f"StableLM rope_scaling={rope_scaling} is not supported (the released StableLM-2 models use none); "
                "set rope_scaling to null in config.json."
            )
        if rotary_scaling_factor != 1.0:
            raise ValueError(
                f"stablelm_epoch rotary_scaling_factor={rotary_scaling_factor} is not supported (the released "
                "models use 1.0, i.e. no scaling); set it to 1.0 in config.json."
            )
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = _pick("num_attention_heads", num_attention_heads, num_heads, 32)
        self.num_key_value_heads = (
            num_key_value_heads if num_key_value_heads is not None else self.num_attention_heads
        )
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.layer_norm_eps = _pick("layer_norm_eps", layer_norm_eps, norm_eps, 1.0e-5)
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = None
        self.use_qkv_bias = use_qkv_bias
        self.qk_layernorm = qk_layernorm
        self.use_parallel_residual = use_parallel_residual
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.partial_rotary_factor = _pick("partial_rotary_factor", partial_rotary_factor, rope_pct, 0.25)
        self._validate_shapes()
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate_shapes(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"StableLM hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; fix one of them in config.json."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"StableLM num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
                f"{self.num_key_value_heads}; fix one of them in config.json."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        rotary_ndims = int(head_dim * self.partial_rotary_factor)
        if rotary_ndims % 2 or not 0 < rotary_ndims <= head_dim:
            raise ValueError(
                f"StableLM partial_rotary_factor={self.partial_rotary_factor} gives {rotary_ndims} rotary dims of a "
                f"{head_dim}-dim head; it must give an even number in (0, head_dim]."
            )


class StableLMEpochConfig(StableLmConfig):
    """The same architecture under the older `model_type: stablelm_epoch` (its own type so that the saved
    config.json keeps the type it was loaded with)."""

    model_type = "stablelm_epoch"
