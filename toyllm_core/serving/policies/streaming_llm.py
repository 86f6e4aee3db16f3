"""StreamingLLM (Xiao et al., 2023, arXiv:2309.17453): keep the attention sinks (the first
`sink_size` tokens) and the most recent tokens; everything in between is evicted. Needs no signal.

Parameters: `budget` slots kept, `sink_size` sinks, `window_size` recent tokens always kept (the
rest of the budget goes to the next most recent), `slack` decode steps between compressions."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..cache import KVCache
from .base import EvictingPolicy
from .registry import register


@register
@dataclass(frozen=True)
class StreamingLLM(EvictingPolicy):
    name = "streaming"

    def score(self, cache: KVCache) -> jax.Array:
        # More recent = more valuable; sinks are protected by `compress`.
        return cache.pos.astype(jnp.float32)
