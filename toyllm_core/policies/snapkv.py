"""SnapKV (Li et al., 2024, arXiv:2404.14469): the last `obs_window` queries vote for the keys
they attend to; heavy hitters by pooled vote are kept, with the sinks and the recent window.

Votes are the softmax attention (scaled by 1/sqrt(head_dim), causal inside the window) of each
observation query over the cached keys, summed over the window's queries and over the query heads
of each KV group, so every KV head picks its own slots. Only candidates (neither sink nor window)
vote-count; sinks draw huge attention and would otherwise bleed into their neighbours through the
pooling. Max-pooling (kernel `pool_kernel`, stride 1, same padding) keeps the neighbours of a
heavy hitter too, which preserves whole phrases rather than isolated tokens.
"""

import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..model import attention_weights
from .base import CacheConfig, Policy, protected_slots
from .registry import register


@register
class SnapKV(Policy):
    name = "snapkv"

    def score(self, cache: KVCache, cfg: CacheConfig) -> jax.Array:
        n_layers, n_heads, n_recent, head_dim = cache.recent_q.shape
        n_kv = cache.k.shape[1]
        observing = (cache.recent_pos >= 0) & (cache.recent_pos >= cache.next_pos - cfg.obs_window)  # [R]
        # Unused ring slots get position 0 (so their softmax is well defined) and zero weight.
        q_pos = jnp.where(observing, cache.recent_pos, 0)
        q = cache.recent_q.reshape(n_layers, n_kv, n_heads // n_kv, n_recent, head_dim)
        weights = jax.vmap(attention_weights, in_axes=(0, 0, None, 0))(q, cache.k, q_pos, cache.pos)
        votes = jnp.einsum("lkgrs,r->lks", weights, observing.astype(jnp.float32))  # [L, kv, capacity]

        live, protected = protected_slots(cache, cfg)
        votes = jnp.where(live & ~protected, votes, 0.0)
        return jax.lax.reduce_window(
            votes, -jnp.inf, jax.lax.max, (1, 1, cfg.pool_kernel), (1, 1, 1), "SAME"
        )
