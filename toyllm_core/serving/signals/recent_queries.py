"""`RecentQueries`: the queries of the most recent tokens, in a ring buffer (SnapKV's observation
window; Expected Attention's statistics). Ring slot = position mod its size."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from ...config import ModelConfig
from .base import Signal, Want


class RecentQueries(Signal):
    q: jax.Array  # [layers, batch, heads, R, head_dim] float32, ring slot = pos % R
    pos: jax.Array  # [batch, R] int32 position of each remembered query, -1 = none

    name: ClassVar[str] = "recent_queries"
    leaves: ClassVar[dict] = {"q": (1, None), "pos": (0, None)}

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, size: int) -> RecentQueries:
        return cls(jnp.zeros((cfg.n_layers, batch, cfg.n_heads, size, cfg.head_dim), jnp.float32),
                   jnp.full((batch, size), -1, jnp.int32))

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    def observe(self, layer, q, weights, pos, valid) -> RecentQueries:
        ring = _ring_slots(pos, valid, self.size)
        rows = jnp.arange(q.shape[0])[:, None]
        return RecentQueries(self.q.at[layer, rows, :, ring].set(q.astype(jnp.float32), mode="drop"), self.pos)

    def advance(self, pos, valid) -> RecentQueries:
        ring = _ring_slots(pos, valid, self.size)
        rows = jnp.arange(pos.shape[0])[:, None]
        return RecentQueries(self.q, self.pos.at[rows, ring].set(pos, mode="drop"))

    def narrowed(self, want: Want) -> RecentQueries:
        """The last `want.size` queries (at most the ring this one has), in a ring of that size."""
        recent, ring = want.size, self.size
        if recent == ring:
            return self
        if recent > ring:
            raise ValueError(f"the cache remembers {ring} queries, fewer than {recent}")
        last = jnp.max(self.pos, axis=1, keepdims=True)  # [B, 1] the latest position remembered
        wanted = last - ((last - jnp.arange(recent)[None, :]) % recent)  # slot j: latest position = j mod r
        src = wanted % ring
        rows = jnp.arange(self.pos.shape[0])[:, None]
        ok = (wanted >= 0) & (self.pos[rows, src] == wanted)
        return RecentQueries(self.q[:, rows, :, src].transpose(2, 0, 3, 1, 4),  # [L, B, H, recent, hd]
                             jnp.where(ok, wanted, -1).astype(jnp.int32))

    def truncated(self, position, gone) -> RecentQueries:
        return RecentQueries(self.q, jnp.where(self.pos >= position, -1, self.pos))


def _ring_slots(pos: jax.Array, valid: jax.Array, ring: int) -> jax.Array:
    """Ring-buffer slot [B, T] for each token: pos % R for the last R real tokens of each row, and
    the out-of-range slot R (dropped by the scatter) for the rest."""
    n_valid = valid.sum(axis=1, keepdims=True)
    offsets = jnp.arange(pos.shape[1])[None, :]
    remembered = valid & (offsets >= n_valid - ring)
    return jnp.where(remembered, pos % ring, ring)
