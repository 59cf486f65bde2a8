"""ToyGPT configuration: GPT-2 hyperparameters under nanoGPT's names, mapped to transformers' standard names."""

from transformers import PretrainedConfig

# Named presets. `tiny` trains in minutes on a 2-core CPU; `gpt2` is the 124M GPT-2 small.
PRESETS = {
    # tiny: narrow (the tied 50257-token embedding/LM head is most of the compute) but 6 layers deep; tuned by
    # bench/quality.py for the best validation bits/char in 10 minutes on 2 CPU cores.
    "tiny": dict(n_layer=6, n_head=4, n_embd=128, block_size=256, dropout=0.0),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0),
}


# Written into every saved config.json so the auto classes find the remote code (AutoModel included).
AUTO_MAP = {
    "AutoConfig": "configuration_toygpt.ToyGPTConfig",
    "AutoModel": "modeling_toygpt.ToyGPTModel",
    "AutoModelForCausalLM": "modeling_toygpt.ToyGPTForCausalLM",
}


class ToyGPTConfig(PretrainedConfig):
    model_type = "toygpt"
    keys_to_ignore_at_inference = ["past_key_values"]
    # transformers' generation and cache code read these standard names.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
    }

    def __init__(
        self,
        vocab_size=50257,
        block_size=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        dropout=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        bias=True,
        tie_word_embeddings=True,
        quantization=None,
        bos_token_id=50256,
        eos_token_id=50256,
        use_cache=True,
        **kwargs,
    ):
        # Standard names (hidden_size=...) must go through validation too, not land via attribute_map afterwards.
        n_embd = kwargs.pop("hidden_size", n_embd)
        n_layer = kwargs.pop("num_hidden_layers", n_layer)
        n_head = kwargs.pop("num_attention_heads", n_head)
        block_size = kwargs.pop("max_position_embeddings", block_size)
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.bias = bias
        # None for fp32 weights; a dict describing the int8 scheme for a quantize.py output directory.
        self.quantization = quantization
        self.use_cache = use_cache
        self._validate()
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ToyGPTConfig: {name} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"ToyGPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head from the divisors of {self.n_embd}."
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ToyGPTConfig: dropout must be in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or self.layer_norm_epsilon <= 0:
            raise ValueError(f"ToyGPTConfig: layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}.")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range <= 0:
            raise ValueError(f"ToyGPTConfig: initializer_range must be positive, got {self.initializer_range!r}.")

    @classmethod
    def from_preset(cls, name, **overrides):
        """`ToyGPTConfig.from_preset("tiny", n_layer=2)`: a named preset with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["ToyGPTConfig", "PRESETS"]
