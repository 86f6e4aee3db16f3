"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023, arXiv:2306.14048): keep the keys that have received
the most attention so far (accumulated over every query since they were cached, summed over the
query heads of their KV group), plus the sinks and the recent window.

The model accumulates `cache.score` as it runs, so scoring is a read."""

import jax

from ..cache import KVCache
from .base import CacheConfig, Policy
from .registry import register


@register
class H2O(Policy):
    name = "h2o"

    def score(self, cache: KVCache, cfg: CacheConfig) -> jax.Array:
        return cache.score
