"""The KV cache: a pytree of static capacity, passed into every step and returned from it.

One sequence's cache holds, per layer and KV head, `capacity` slots of keys and values (keys after
RoPE at their original positions), the original position of each slot (-1 when empty), and the
state that compression policies read: the attention each key has received so far (H2O) and the
queries of the most recent tokens (SnapKV's observation window). Slots are always in position
order and filled from slot 0, so the first `length` slots are the live ones.

A batched cache is the same pytree with a leading batch axis on every leaf; the model works on one
sequence and callers `vmap`. Capacity changes only through `resize`, between jitted calls, in a few
power-of-two buckets, so the jitted steps compile once per bucket.
"""

from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

# How many recent queries the cache remembers for observation-window policies (SnapKV's
# obs_window may be anything up to this).
RECENT_QUERIES = 32
MIN_CAPACITY = 64


class KVCache(eqx.Module):
    k: jax.Array  # [layers, kv_heads, capacity, head_dim], after RoPE
    v: jax.Array  # [layers, kv_heads, capacity, head_dim]
    pos: jax.Array  # [layers, kv_heads, capacity] int32 original position, -1 = empty
    score: jax.Array  # [layers, kv_heads, capacity] attention received so far (summed over queries)
    recent_q: jax.Array  # [layers, heads, RECENT_QUERIES, head_dim] ring buffer, slot = pos % R
    recent_pos: jax.Array  # [RECENT_QUERIES] int32 position of each remembered query, -1 = none
    length: jax.Array  # [] int32 live slots
    next_pos: jax.Array  # [] int32 tokens seen so far = position of the next token

    @staticmethod
    def empty(cfg: ModelConfig, capacity: int, batch: int | None = None) -> KVCache:
        return _empty(cfg, capacity, batch)

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]

    @property
    def batched(self) -> bool:
        return self.length.ndim == 1

    def resize(self, capacity: int) -> KVCache:
        """The same cache with another capacity (pads with empty slots, or drops empty ones)."""
        old = self.capacity
        if capacity == old:
            return self
        if capacity < old:
            keep = np.asarray(self.length).max(initial=0)
            if keep > capacity:
                raise ValueError(f"cannot shrink a cache holding {keep} tokens to capacity {capacity}")
            return _slice_slots(self, capacity)
        return _pad_slots(self, capacity - old)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _empty(cfg: ModelConfig, capacity: int, batch: int | None) -> KVCache:
    lead = () if batch is None else (batch,)
    kv_shape = (*lead, cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
    slot_shape = (*lead, cfg.n_layers, cfg.n_kv_heads, capacity)
    return KVCache(
        k=jnp.zeros(kv_shape, jnp.float32),
        v=jnp.zeros(kv_shape, jnp.float32),
        pos=jnp.full(slot_shape, -1, jnp.int32),
        score=jnp.zeros(slot_shape, jnp.float32),
        recent_q=jnp.zeros((*lead, cfg.n_layers, cfg.n_heads, RECENT_QUERIES, cfg.head_dim), jnp.float32),
        recent_pos=jnp.full((*lead, RECENT_QUERIES), -1, jnp.int32),
        length=jnp.zeros(lead, jnp.int32),
        next_pos=jnp.zeros(lead, jnp.int32),
    )


# The whole-cache helpers below are jitted so that each is one compile per cache shape, rather than
# one small compile per leaf shape for every eager op inside.
@jax.jit
def take_row(cache: KVCache, i) -> KVCache:
    return jax.tree.map(lambda x: x[i], cache)


@jax.jit
def add_batch_axis(cache: KVCache) -> KVCache:
    return jax.tree.map(lambda x: x[None], cache)


@jax.jit
def drop_batch_axis(cache: KVCache) -> KVCache:
    return jax.tree.map(lambda x: x[0], cache)


@partial(jax.jit, static_argnums=1)
def _pad_slots(cache: KVCache, extra: int) -> KVCache:
    axis = 3 if cache.batched else 2

    def pad(x, fill):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths, constant_values=fill)

    return eqx.tree_at(
        lambda c: (c.k, c.v, c.pos, c.score),
        cache,
        (pad(cache.k, 0.0), pad(cache.v, 0.0), pad(cache.pos, -1), pad(cache.score, 0.0)),
    )


@partial(jax.jit, static_argnums=1)
def _slice_slots(cache: KVCache, capacity: int) -> KVCache:
    axis = 3 if cache.batched else 2

    def cut(x):
        return jax.lax.slice_in_dim(x, 0, capacity, axis=axis)

    return eqx.tree_at(
        lambda c: (c.k, c.v, c.pos, c.score),
        cache,
        (cut(cache.k), cut(cache.v), cut(cache.pos), cut(cache.score)),
    )


@jax.jit
def stack(caches: list[KVCache]) -> KVCache:
    """Batch single-sequence caches of one capacity along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


@jax.jit
def concat(a: KVCache, b: KVCache) -> KVCache:
    """Join two batched caches of one capacity along the batch axis."""
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


@jax.jit
def take_rows(cache: KVCache, index) -> KVCache:
    """Rows `index` [n] of a batched cache, as a batched cache."""
    return jax.tree.map(lambda x: x[index], cache)


def capacity_bucket(tokens: int) -> int:
    """The smallest power-of-two capacity (at least MIN_CAPACITY) that holds `tokens`."""
    cap = MIN_CAPACITY
    while cap < tokens:
        cap *= 2
    return cap


def kept_positions(cache: KVCache) -> np.ndarray:
    """Original positions of the live slots of one sequence: [layers, kv_heads, length]."""
    n = int(cache.length)
    return np.asarray(cache.pos[..., :n])
