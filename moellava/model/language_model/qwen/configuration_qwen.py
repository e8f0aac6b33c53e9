"""Configuration of QWen v1 (Qwen/Qwen-1_8B, Qwen-7B, model_type ``qwen``): reads the official config.json."""

from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    """QWen v1 decoder: fused ``c_attn`` (with bias), RMSNorm, ``c_proj(w1(x) * silu(w2(x)))`` MLP.

    Field names and defaults follow the official ``configuration_qwen.py``. Notes on fields that do not
    change the architecture:

    * ``intermediate_size`` is the official doubled value: ``w1``/``w2`` have ``intermediate_size // 2``
      outputs.
    * ``use_dynamic_ntk`` / ``use_logn_attn`` only act in eval mode on sequences longer than
      ``seq_length`` (NTK-scaled rotary base, log-n query scaling), as in the official model.
    * ``bf16`` / ``fp16`` / ``fp32`` are the official precision flags, kept so the file round-trips; the
      weights load in the dtype given to ``from_pretrained(torch_dtype=...)``.
    * ``use_flash_attn`` and ``softmax_in_fp32`` are kept for round-trip; attention runs through
      ``torch.nn.functional.scaled_dot_product_attention`` (flash kernels on GPU where torch has them)
      and the explicit path (``output_attentions``) takes the softmax in fp32.
    * KV-cache quantization (``use_cache_quantization``/``use_cache_kernel``) is not implemented.
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        emb_dropout_prob=0.0,
        attn_dropout_prob=0.0,
        layer_norm_epsilon=1e-6,
        initializer_range=0.02,
        max_position_embeddings=8192,
        scale_attn_weights=True,
        use_cache=True,
        bf16=False,
        fp16=False,
        fp32=False,
        kv_channels=128,
        rotary_pct=1.0,
        rotary_emb_base=10000,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        use_flash_attn="auto",
        intermediate_size=22016,
        no_bias=True,
        tie_word_embeddings=False,
        use_cache_quantization=False,
        use_cache_kernel=False,
        softmax_in_fp32=False,
        seq_length=8192,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.use_cache_quantization = use_cache_quantization
        self.use_cache_kernel = use_cache_kernel
        self.softmax_in_fp32 = softmax_in_fp32
        self.seq_length = seq_length
        self._validate()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _validate(self):
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"QWenConfig: kv_channels * num_attention_heads = {self.kv_channels} * {self.num_attention_heads} "
                f"must equal hidden_size ({self.hidden_size}), as in the official QWen layout"
            )
        if self.intermediate_size % 2:
            raise ValueError(
                f"QWenConfig: intermediate_size ({self.intermediate_size}) must be even: w1/w2 have "
                "intermediate_size // 2 outputs"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"QWenConfig: rotary_pct must be in (0, 1], got {self.rotary_pct}")
        rotary_dim = int(self.kv_channels * self.rotary_pct)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                f"QWenConfig: int(kv_channels * rotary_pct) = int({self.kv_channels} * {self.rotary_pct}) = "
                f"{rotary_dim} rotary channels; it must be even and >= 2"
            )
        if not self.scale_attn_weights:
            raise ValueError(
                "QWenConfig: scale_attn_weights=False is not supported (the official model always scales "
                "attention scores by 1/sqrt(kv_channels)); set it to true"
            )
        if self.use_cache_quantization or self.use_cache_kernel:
            raise ValueError(
                "QWenConfig: KV-cache quantization (use_cache_quantization / use_cache_kernel) is not "
                "implemented; set both to false in config.json"
            )
        if self.seq_length < 1:
            raise ValueError(f"QWenConfig: seq_length must be >= 1, got {self.seq_length}")
