"""`AttentionSum`: the attention each cached key has received so far, summed over every query since
it was cached and over the query heads of its KV group (H2O's accumulated score)."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from ...config import ModelConfig
from .base import Signal


class AttentionSum(Signal):
    score: jax.Array  # [layers, batch, kv_heads, capacity] float32

    name: ClassVar[str] = "attention_sum"
    leaves: ClassVar[dict] = {"score": (1, 0.0)}

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, size: int) -> AttentionSum:
        return cls(jnp.zeros((cfg.n_layers, batch, cfg.n_kv_heads, capacity), jnp.float32))

    def observe(self, layer, q, weights, pos, valid) -> AttentionSum:
        received = jnp.einsum("bkgts,bt->bks", weights, valid.astype(jnp.float32))
        return AttentionSum(self.score.at[layer].add(received))
