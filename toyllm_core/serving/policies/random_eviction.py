"""Random eviction: keep the sinks, the recent window and a random choice of the rest. The floor any
policy has to beat (the long-context evaluations report it beside the others).

The choice is reproducible: each key's score is a hash of (`seed`, layer, KV head, original
position), so a key keeps its score across compressions and the same prompt keeps the same keys.
Parameters: `budget`, `sink_size`, `window_size`, `slack` (see `EvictingPolicy`), `seed`."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..cache import KVCache
from .base import EvictingPolicy, param
from .registry import register


def position_hash(seed: int, layer, head, pos) -> jax.Array:
    """A uniform-looking float32 in [0, 1) per (seed, layer, head, position) (uint32 integer mixing,
    the finaliser of MurmurHash3), so that NumPy can compute the same numbers."""
    x = (jnp.uint32(seed) * jnp.uint32(0x9E3779B1)) ^ (layer.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)) \
        ^ (head.astype(jnp.uint32) * jnp.uint32(0xC2B2AE3D)) ^ pos.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    return (x >> 8).astype(jnp.float32) / jnp.float32(1 << 24)


@register
@dataclass(frozen=True)
class RandomEviction(EvictingPolicy):
    name = "random"
    seed: int = param(0, "The seed of its choice.", ge=0, le=2**32 - 1)

    def validate(self) -> "RandomEviction":
        if not 0 <= self.seed < 2**32:
            raise ValueError("seed must be in [0, 2^32)")
        return super().validate()

    def score(self, cache: KVCache) -> jax.Array:
        layers, _, heads, _ = cache.pos.shape
        layer = jnp.arange(layers)[:, None, None, None]
        head = jnp.arange(heads)[None, None, :, None]
        return position_hash(self.seed, layer, head, cache.pos)
