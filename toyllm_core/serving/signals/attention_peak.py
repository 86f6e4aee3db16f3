"""`AttentionPeak`: the largest attention each cached key has received from one query, over every
query since the signal was last cleared and over the query heads of its KV group (KVzip's score,
when the queries are the context's reconstruction)."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from ...config import ModelConfig
from .base import Signal


class AttentionPeak(Signal):
    peak: jax.Array  # [layers, batch, kv_heads, capacity] float32

    name: ClassVar[str] = "attention_peak"
    leaves: ClassVar[dict] = {"peak": (1, 0.0)}

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, size: int) -> AttentionPeak:
        return cls(jnp.zeros((cfg.n_layers, batch, cfg.n_kv_heads, capacity), jnp.float32))

    def observe(self, layer, q, weights, pos, valid) -> AttentionPeak:
        # weights [B, kv, g, T, S]; padding queries (valid False) count for nothing.
        seen = jnp.where(valid[:, None, None, :, None], weights, 0.0).max(axis=(2, 3))  # [B, kv, S]
        return AttentionPeak(self.peak.at[layer].max(seen))
