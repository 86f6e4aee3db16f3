"""KVzip (Kim et al., 2025, arXiv:2505.23416, "KVzip: Query-Agnostic KV Cache Compression with
Context Reconstruction"): keep the keys and values the model needs to repeat its context.

Before it compresses, the engine runs a reconstruction pass (`Engine` and `steps.reconstruct`):
a prompt asking the model to repeat the previous context exactly, followed by the context itself,
teacher-forced in chunks over the cache. Each chunk attends over the whole cached context, and the
`AttentionPeak` signal keeps, for every cached key, the largest attention it receives from one
reconstruction query over the query heads of its KV group. A key the model needs to reproduce
some part of the context scores high whatever question comes later, so the choice does not depend
on a question the cache has not seen. The chunks are then dropped from the cache (truncated back).

Budget: as the paper and kvpress's KVzipPress, the whole cache's `budget x layers x kv_heads` slots
go to the best-scoring keys across every layer and head (the scores are attention weights, so they
compare), each head keeping between `floor_pct` percent of the budget (its sinks and window always)
and `max_factor` budgets, the room a row keeps after a compression (`kept_slots`). Between
reconstructions, decoding keeps the peak over its own queries, so a row that compresses while
decoding ranks by that. Parameters: `budget`, `sink_size`, `window_size`, `slack`, `cold_bits` (see
`EvictingPolicy`), `floor_pct`, `max_factor`.
"""

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..signals import AttentionPeak, Want
from .base import EvictingPolicy, param
from .registry import register

# What the reconstruction pass asks the model (the paper's wording).
REPEAT_PROMPT = "Repeat the previous context exactly."


@register
@dataclass(frozen=True)
class KVzip(EvictingPolicy):
    name = "kvzip"
    reconstructs: ClassVar[bool] = True
    floor_pct: int = param(20, "The least share of the budget a head keeps (%).", ge=0, le=100)
    max_factor: int = param(2, "The most a head keeps, in budgets.", ge=1, le=16)

    def validate(self) -> "KVzip":
        super().validate()
        if not 0 <= self.floor_pct <= 100:
            raise ValueError("floor_pct must be between 0 and 100")
        if self.max_factor < 1:
            raise ValueError("max_factor must be >= 1")
        return self

    @property
    def signals(self) -> tuple[Want, ...]:
        return (AttentionPeak.want(),)

    @property
    def kept_slots(self) -> int:
        return self.max_factor * self.budget

    def allocate(self, scores: jax.Array, live: jax.Array, protected: jax.Array) -> jax.Array:
        layers, batch, heads, _ = scores.shape
        cap = self.kept_slots
        best, _ = jax.lax.top_k(scores, cap)  # each head's candidates, best first [L, B, kv, cap]
        floor = max(self.budget * self.floor_pct // 100, self.sink_size + self.window_size)
        ranked = jnp.where(jnp.arange(cap) < floor, jnp.inf, best)  # a head's first `floor` whatever they score
        ranked = ranked.transpose(1, 0, 2, 3).reshape(batch, layers * heads * cap)
        _, chosen = jax.lax.top_k(ranked, self.budget * layers * heads)  # the best across the whole row
        # Within a head, candidates are in score order, so the chosen ones are a prefix: count them.
        counts = jax.nn.one_hot(chosen // cap, layers * heads, dtype=jnp.int32).sum(axis=1)  # [B, L * kv]
        return counts.reshape(batch, layers, heads).transpose(1, 0, 2)

    def score(self, cache: KVCache) -> jax.Array:
        return cache.signal(AttentionPeak).peak


def repeat_prompt_ids(tokenizer, chat=None) -> list[int]:
    """The token ids of the reconstruction's instruction: the turn the context was in closed, a user
    turn asking to repeat, and the reply's header, as the model's chat template renders them (the
    repeated context follows as the reply); without a template, the instruction as plain text
    between blank lines."""
    if chat is not None:
        turn = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        return chat.continuation_ids(tokenizer, turn, [{"role": "user", "content": REPEAT_PROMPT}])
    return list(tokenizer(f"\n\n{REPEAT_PROMPT}\n\n", add_special_tokens=False)["input_ids"])
