"""Ada-KV (Feng et al., 2024, arXiv:2407.11550, "Ada-KV: Optimizing KV Cache Eviction by Adaptive
Budget Allocation for Efficient LLM Inference"), on SnapKV's scores: a layer's budget is shared by
its KV heads rather than split evenly. The layer keeps its `budget x kv_heads` best slots by score
across all its heads, so a head whose votes fall on few slots (beyond its sinks and window) leaves
room to a head with many well-voted ones. Votes are comparable across heads: each is a sum of
softmax weights.

Safeguards, as in the paper: every head keeps at least `floor_pct` percent of the budget (its own
best slots; the sinks and window always), and at most `max_factor x budget` slots, which is the
cache room a row keeps after a compression (`kept_slots`; a head keeping fewer leaves the rest of
its slots empty). Parameters: SnapKV's, `floor_pct`, `max_factor`.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .base import param
from .registry import register
from .snapkv import SnapKV


@register
@dataclass(frozen=True)
class AdaKV(SnapKV):
    name = "adakv"
    floor_pct: int = param(20, "The least share of the budget a head keeps (%).", ge=0, le=100)
    max_factor: int = param(2, "The most a head keeps, in budgets.", ge=1, le=16)

    def validate(self) -> "AdaKV":
        super().validate()
        if not 0 <= self.floor_pct <= 100:
            raise ValueError("floor_pct must be between 0 and 100")
        if self.max_factor < 1:
            raise ValueError("max_factor must be >= 1")
        return self

    @property
    def kept_slots(self) -> int:
        return self.max_factor * self.budget

    @property
    def floor(self) -> int:
        return max(self.budget * self.floor_pct // 100, self.sink_size + self.window_size)

    def allocate(self, scores: jax.Array, live: jax.Array, protected: jax.Array) -> jax.Array:
        layers, batch, heads, _ = scores.shape
        cap = self.kept_slots
        best, _ = jax.lax.top_k(scores, cap)  # each head's candidates, best first [L, B, kv, cap]
        # A head's first `floor` candidates are kept whatever their score (protected ones score +inf).
        guaranteed = jnp.arange(cap) < self.floor
        ranked = jnp.where(guaranteed, jnp.inf, best).reshape(layers, batch, heads * cap)
        _, chosen = jax.lax.top_k(ranked, self.budget * heads)  # the layer's best across its heads
        # Within a head, candidates are in score order, so the chosen ones are a prefix: count them.
        return jax.nn.one_hot(chosen // cap, heads, dtype=jnp.int32).sum(axis=2)
