"""Model configuration: one frozen dataclass holds every size, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

# Serving stores weights and K/V in bfloat16; tests, `verify-cache` and evaluation may ask for float32.
# Scores, softmax and accumulators are float32 either way.
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int = 1
    d_ff: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, dtype="float32") -> int:
        """Bytes one cached token costs across all layers (keys + values) when stored as `dtype`."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * np.dtype(dtype).itemsize

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        return self.vocab_size * d + self.n_layers * per_layer + d


PRESETS: dict[str, ModelConfig] = {
    # The seed project's configuration, exactly.
    "seed": ModelConfig(),
    # Small enough for unit tests, with GQA (2 query heads per KV head) and the GPT-2 vocabulary.
    "tiny": ModelConfig(context_length=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
    # Provisional default for the shipped checkpoint (the training issue picks the final one).
    "base": ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    # SmolLM2-135M's dimensions exactly, for measurements with random weights.
    "smollm2-135m": ModelConfig(vocab_size=49152, context_length=8192, d_model=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, d_ff=1536, rope_theta=100000.0, norm_eps=1e-5, eos_token_id=2),
}


def get_dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
