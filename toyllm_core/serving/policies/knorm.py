"""Key norm (Devoto et al., 2024, arXiv:2406.11430, "A Simple and Effective L2 Norm-Based Strategy
for KV Cache Compression"): keys with a low L2 norm draw high attention, so keep the keys of lowest
norm, plus the sinks and the recent window. Query-agnostic: it needs no signal, so what it keeps
does not depend on the question that comes later (a baseline for multi-turn sessions).

RoPE rotates pairs of dimensions, which leaves the norm unchanged: the cached (rotated) keys score
as the unrotated ones would. Parameters: `budget`, `sink_size`, `window_size`, `slack` (see
`EvictingPolicy`)."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..cache import KVCache
from .base import EvictingPolicy
from .registry import register


@register
@dataclass(frozen=True)
class KeyNorm(EvictingPolicy):
    name = "knorm"

    def score(self, cache: KVCache) -> jax.Array:
        k = cache.keys().astype(jnp.float32)  # [layers, batch, kv, capacity, head_dim]
        return -jnp.sqrt(jnp.sum(k * k, axis=-1))  # lowest norm first
