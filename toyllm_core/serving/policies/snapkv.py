"""SnapKV (Li et al., 2024, arXiv:2404.14469): the last `obs_window` queries vote for the keys
they attend to; heavy hitters by pooled vote are kept, with the sinks and the recent window.

Votes are the softmax attention (scaled by 1/sqrt(head_dim), causal inside the window) of each
observation query over the cached keys, summed over the window's queries and over the query heads
of each KV group, so every KV head picks its own slots. Only candidates (neither sink nor window)
vote-count; sinks draw huge attention and would otherwise bleed into their neighbours through the
pooling. Max-pooling (kernel `pool_kernel`, stride 1, same padding) keeps the neighbours of a
heavy hitter too, which preserves whole phrases rather than isolated tokens.

Declares the `recent_queries` signal (a ring of the last `obs_window` queries). Parameters:
`budget`, `sink_size`, `window_size`, `slack` (see `EvictingPolicy`), `obs_window`, `pool_kernel`.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..model import attention_weights
from ..signals import RecentQueries, Want
from .base import EvictingPolicy, param, protected_slots
from .registry import register

MAX_OBS_WINDOW = 128


@register
@dataclass(frozen=True)
class SnapKV(EvictingPolicy):
    name = "snapkv"
    obs_window: int = param(16, "Recent queries that vote.", ge=1, le=MAX_OBS_WINDOW)
    # Max-pooling kernel over the votes. The paper's 7 kept a 4k-token passkey in 1 of 3 prompts on
    # SmolLM2-135M at budget 512, 15 in 3 of 3: the digits sit a few tokens from the words that
    # draw the votes, and 15 keeps the whole sentence (docs/compression.md).
    pool_kernel: int = param(15, "Max-pooling kernel over the votes.", ge=1, le=65536)

    def validate(self) -> "SnapKV":
        super().validate()
        if not 1 <= self.obs_window <= MAX_OBS_WINDOW:
            raise ValueError(f"obs_window must be between 1 and {MAX_OBS_WINDOW}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError("pool_kernel must be an odd number >= 1")
        return self

    @property
    def signals(self) -> tuple[Want, ...]:
        return (RecentQueries.want(self.obs_window),)

    def score(self, cache: KVCache) -> jax.Array:
        recent = cache.signal(RecentQueries)
        n_layers, batch, n_heads, ring, head_dim = recent.q.shape
        n_kv = cache.k.shape[2]
        observing = recent.pos >= 0  # [B, R]: the ring holds exactly the last obs_window queries
        # Unused ring slots get position 0 (so their softmax is well defined) and zero weight.
        q_pos = jnp.where(observing, recent.pos, 0)
        q = recent.q.reshape(n_layers, batch, n_kv, n_heads // n_kv, ring, head_dim)
        weights = jax.vmap(attention_weights, in_axes=(0, 0, None, 0))(q, cache.keys(), q_pos, cache.pos)
        votes = jnp.einsum("lbkgrs,br->lbks", weights, observing.astype(jnp.float32))  # [L, B, kv, capacity]

        live, protected = protected_slots(cache, self)
        votes = jnp.where(live & ~protected, votes, 0.0)
        return jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, (1, 1, 1, self.pool_kernel), (1, 1, 1, 1),
                                     "SAME")
