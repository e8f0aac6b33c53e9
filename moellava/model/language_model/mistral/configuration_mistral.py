"""Mistral configuration: reads the official `config.json` of mistralai/Mistral-7B-* (model_type `mistral`)."""
from transformers import PretrainedConfig


class MistralConfig(PretrainedConfig):
    model_type = "mistral"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        sliding_window=4096,
        attention_dropout=0.0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Mistral-Nemo style configs give head_dim explicitly (hidden_size != heads * head_dim).
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        # null: full causal attention (Mistral-7B-v0.2 and later); an int: attend to the last `sliding_window` tokens.
        self.sliding_window = sliding_window
        self.attention_dropout = attention_dropout
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Mistral num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
                f"{self.num_key_value_heads}; fix one of them in config.json."
            )
        if self.head_dim % 2:
            raise ValueError(f"Mistral head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"Mistral sliding_window={self.sliding_window} must be a positive number of tokens, or null for "
                "full attention."
            )
