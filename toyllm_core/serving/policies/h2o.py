"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023, arXiv:2306.14048): keep the keys that have received
the most attention so far (accumulated over every query since they were cached, summed over the
query heads of their KV group), plus the sinks and the recent window.

Asks for the `AttentionSum` signal: the forward accumulates it as it runs, so scoring is a read.
Parameters: `budget`, `sink_size`, `window_size`, `slack` (see `EvictingPolicy`)."""

from dataclasses import dataclass

import jax

from ..cache import KVCache
from ..signals import AttentionSum, Want
from .base import EvictingPolicy
from .registry import register


@register
@dataclass(frozen=True)
class H2O(EvictingPolicy):
    name = "h2o"

    @property
    def signals(self) -> tuple[Want, ...]:
        return (AttentionSum.want(),)

    def score(self, cache: KVCache) -> jax.Array:
        return cache.signal(AttentionSum).score
