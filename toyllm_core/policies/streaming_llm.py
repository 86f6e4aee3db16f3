"""StreamingLLM (Xiao et al., 2023, arXiv:2309.17453): keep the attention sinks (the first
`sink_size` tokens) and the most recent tokens; everything in between is evicted."""

import jax

from ..cache import KVCache
from .base import CacheConfig, Policy
from .registry import register


@register
class StreamingLLM(Policy):
    name = "streaming"

    def score(self, cache: KVCache, cfg: CacheConfig) -> jax.Array:
        # More recent = more valuable; sinks are protected by `compress`.
        return cache.pos.astype(jax.numpy.float32)
