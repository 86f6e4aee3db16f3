"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023, arXiv:2306.14048): keep the keys that have received
the most attention so far (accumulated over every query since they were cached, summed over the
query heads of their KV group), plus the sinks and the recent window.

Declares the `scores` signal: the forward accumulates `cache.score` as it runs, so scoring is a read.
Parameters: `budget`, `sink_size`, `window_size`, `slack` (see `EvictingPolicy`)."""

from dataclasses import dataclass

import jax

from ..cache import KVCache
from .base import EvictingPolicy, Signals
from .registry import register


@register
@dataclass(frozen=True)
class H2O(EvictingPolicy):
    name = "h2o"

    @property
    def signals(self) -> Signals:
        return Signals(scores=True)

    def score(self, cache: KVCache) -> jax.Array:
        return cache.score
