"""Configuration of Phi (microsoft/phi-2, model_type ``phi``): reads the official config.json unchanged."""

from transformers import PretrainedConfig

from ..common import validate_rope_scaling


class PhiConfig(PretrainedConfig):
    """Phi decoder: one LayerNorm feeds attention and MLP in parallel, partial rotary, biased ``lm_head``.

    Field names and defaults are those of the official ``configuration_phi.py`` (transformers >= 4.37),
    so microsoft/phi-2's config.json loads as is. One field is ours: ``upcast_attention`` (default False)
    computes attention in fp32, as the official eager code always does; by default it runs in the model
    dtype, so a GPU takes the fused kernels (which accumulate the scores in fp32 anyway).
    """

    model_type = "phi"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=51200,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        hidden_act="gelu_new",
        max_position_embeddings=2048,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        partial_rotary_factor=0.5,
        qk_layernorm=False,
        upcast_attention=False,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attention_dropout = attention_dropout
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.partial_rotary_factor = partial_rotary_factor
        self.qk_layernorm = qk_layernorm
        self.upcast_attention = upcast_attention
        self._validate()
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"PhiConfig: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"PhiConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"PhiConfig: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        head_dim = self.hidden_size // self.num_attention_heads
        rotary_dim = int(head_dim * self.partial_rotary_factor)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                f"PhiConfig: int(head_dim * partial_rotary_factor) = int({head_dim} * "
                f"{self.partial_rotary_factor}) = {rotary_dim} rotary channels; it must be even and >= 2"
            )
        validate_rope_scaling(self.rope_scaling)
