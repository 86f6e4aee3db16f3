"""What every compression policy shares: its configuration, the scoring interface, and the eviction.

A policy is one small class with one scoring function that rates every cache slot per layer and KV
head (higher = keep). Everything else lives here, once: protecting the attention sinks and the
recent window, the top-k, and gathering the kept slots to the front in position order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..cache import RECENT_QUERIES, KVCache


@dataclass(frozen=True)
class CacheConfig:
    """How one sequence's cache is compressed. Hashable: jitted compression specialises on it."""

    policy: str = "snapkv"
    budget: int = 64  # slots kept per layer and KV head after a compression
    sink_size: int = 4  # first tokens never evicted (attention sinks)
    window_size: int = 16  # most recent tokens never evicted
    slack: int = 16  # decoding compresses when the cache reaches budget + slack
    obs_window: int = 16  # SnapKV: recent queries that vote
    pool_kernel: int = 7  # SnapKV: max-pooling kernel over the votes

    def validate(self) -> CacheConfig:
        from .registry import get_policy  # the registry imports the policies, which import this module

        policy = get_policy(self.policy)
        if not policy.evicts:
            return self
        if self.budget < 1 or self.sink_size < 0 or self.window_size < 0 or self.slack < 1:
            raise ValueError("budget and slack must be >= 1, sink_size and window_size >= 0")
        if self.sink_size + self.window_size > self.budget:
            raise ValueError(
                f"sink_size + window_size ({self.sink_size} + {self.window_size}) must not exceed "
                f"the budget ({self.budget})"
            )
        if not 1 <= self.obs_window <= RECENT_QUERIES:
            raise ValueError(f"obs_window must be between 1 and {RECENT_QUERIES}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError("pool_kernel must be an odd number >= 1")
        return self

    @property
    def evicts(self) -> bool:
        from .registry import get_policy

        return get_policy(self.policy).evicts

    @property
    def trigger(self) -> int:
        """Cache length at which decoding compresses (amortises compression over `slack` steps)."""
        return self.budget + self.slack


class Policy:
    """A compression policy: one scoring function over the cache's slots."""

    name: ClassVar[str]
    evicts: ClassVar[bool] = True

    def score(self, cache: KVCache, cfg: CacheConfig) -> jax.Array:
        """Score every slot of one sequence's cache: [layers, kv_heads, capacity], higher = keep.

        Empty slots, sinks and the recent window are handled by `compress`; scores there are ignored.
        """
        raise NotImplementedError


def protected_slots(cache: KVCache, cfg: CacheConfig) -> tuple[jax.Array, jax.Array]:
    """(live, protected) masks [layers, kv_heads, capacity] for one sequence's cache.

    Slots are in position order, so the sinks are the first `sink_size` slots and the window the
    last `window_size` live ones.
    """
    slot = jnp.arange(cache.capacity)
    live = cache.pos >= 0
    recent = (slot >= cache.length - cfg.window_size) & (slot < cache.length)
    protected = live & ((slot < cfg.sink_size) | recent)
    return live, protected


def compress(cache: KVCache, cfg: CacheConfig) -> KVCache:
    """Keep exactly `budget` slots per layer and KV head (all live ones if fewer), in position order."""
    from .registry import get_policy

    live, protected = protected_slots(cache, cfg)
    scores = get_policy(cfg.policy).score(cache, cfg)
    scores = jnp.where(protected, jnp.inf, jnp.where(live, scores, -jnp.inf))
    _, keep = jax.lax.top_k(scores, cfg.budget)  # [layers, kv_heads, budget]
    keep = jnp.sort(keep, axis=-1)  # slot order is position order

    pad = cache.capacity - cfg.budget

    def gather(x: jax.Array, fill) -> jax.Array:
        index = keep if x.ndim == 3 else keep[..., None]
        kept = jnp.take_along_axis(x, index, axis=2)
        widths = [(0, 0)] * x.ndim
        widths[2] = (0, pad)
        return jnp.pad(kept, widths, constant_values=fill)

    new_length = jnp.minimum(cache.length, cfg.budget)
    # When fewer than `budget` slots were live, top-k also picked empty slots; they sort last.
    pos = jnp.where(jnp.arange(cache.capacity) < new_length, gather(cache.pos, -1), -1)
    return KVCache(
        k=gather(cache.k, 0.0),
        v=gather(cache.v, 0.0),
        pos=pos,
        score=gather(cache.score, 0.0),
        recent_q=cache.recent_q,
        recent_pos=cache.recent_pos,
        length=new_length,
        next_pos=cache.next_pos,
    )
