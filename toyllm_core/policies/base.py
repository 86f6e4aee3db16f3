"""What every compression policy shares: its parameters, the signals it declares, the eviction.

A policy is a small frozen dataclass that carries its own parameters (hashable: jitted steps
specialise on it) and one scoring function that rates every cache slot per layer, row and KV head
(higher = keep). It declares the signals the forward must record for it (`signals`); a cache built
for the policy carries exactly those, so a forward computes only what some row needs. Everything
else lives here, once: protecting the attention sinks and the recent window, the top-k, and
gathering the kept slots to the front in position order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ..cache import KVCache


@dataclass(frozen=True)
class Signals:
    """What the forward records in the cache for a policy."""

    scores: bool = False  # attention each key has received so far (summed over queries)
    recent_queries: int = 0  # how many of the most recent queries to remember (0 = none)


@dataclass(frozen=True)
class Policy:
    """A cache policy. Subclasses set `name`, and compressing ones implement `score`."""

    name: ClassVar[str]
    evicts: ClassVar[bool] = True

    @property
    def signals(self) -> Signals:
        return Signals()

    @property
    def params(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> dict:
        """{"policy": name, **parameters}: how the API and /info show it."""
        return {"policy": self.name, **self.params}

    @property
    def label(self) -> str:
        """A compact, unique name: `snapkv:budget=64,sink_size=4,...` (`full` for the full cache)."""
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}:{args}" if args else self.name

    def validate(self) -> Policy:
        return self


@dataclass(frozen=True)
class EvictingPolicy(Policy):
    """A policy that keeps `budget` slots per layer and KV head: sinks + its choice + recent window."""

    budget: int = 64  # slots kept per layer and KV head after a compression
    sink_size: int = 4  # first tokens never evicted (attention sinks)
    window_size: int = 16  # most recent tokens never evicted
    slack: int = 16  # decoding compresses when the cache reaches budget + slack

    def validate(self) -> EvictingPolicy:
        if self.budget < 1 or self.sink_size < 0 or self.window_size < 0 or self.slack < 1:
            raise ValueError("budget and slack must be >= 1, sink_size and window_size >= 0")
        if self.sink_size + self.window_size > self.budget:
            raise ValueError(f"sink_size + window_size ({self.sink_size} + {self.window_size}) must not exceed "
                             f"the budget ({self.budget})")
        return self

    @property
    def trigger(self) -> int:
        """Cache length at which decoding compresses (amortises compression over `slack` steps)."""
        return self.budget + self.slack

    def score(self, cache: KVCache) -> jax.Array:
        """Score every slot: [layers, batch, kv_heads, capacity], higher = keep. Empty slots, sinks
        and the recent window are handled by `compress`; scores there are ignored."""
        raise NotImplementedError


def protected_slots(cache: KVCache, policy: EvictingPolicy) -> tuple[jax.Array, jax.Array]:
    """(live, protected) masks [layers, batch, kv_heads, capacity].

    Slots are in position order, so the sinks are the first `sink_size` slots and the window the
    last `window_size` live ones.
    """
    slot = jnp.arange(cache.capacity)
    length = cache.length[None, :, None, None]
    live = cache.pos >= 0
    recent = (slot >= length - policy.window_size) & (slot < length)
    protected = live & ((slot < policy.sink_size) | recent)
    return live, protected


def compress(cache: KVCache, policy: EvictingPolicy) -> KVCache:
    """Keep exactly `budget` slots per layer, row and KV head (all live ones if fewer), in position
    order, at the front of the same capacity."""
    live, protected = protected_slots(cache, policy)
    scores = policy.score(cache)
    scores = jnp.where(protected, jnp.inf, jnp.where(live, scores, -jnp.inf))
    _, keep = jax.lax.top_k(scores, policy.budget)  # [layers, batch, kv_heads, budget]
    keep = jnp.sort(keep, axis=-1)  # slot order is position order
    pad = cache.capacity - policy.budget

    def gather(x: jax.Array, fill) -> jax.Array:
        index = keep if x.ndim == 4 else keep[..., None]
        kept = jnp.take_along_axis(x, index, axis=3)
        widths = [(0, 0)] * x.ndim
        widths[3] = (0, pad)
        return jnp.pad(kept, widths, constant_values=fill)

    new_length = jnp.minimum(cache.length, policy.budget)
    # When fewer than `budget` slots were live, top-k also picked empty slots; they sort last.
    in_use = jnp.arange(cache.capacity) < new_length[None, :, None, None]
    fields = lambda c: [c.k, c.v, c.pos, c.length] + ([c.score] if c.score is not None else [])
    values = [gather(cache.k, 0), gather(cache.v, 0), jnp.where(in_use, gather(cache.pos, -1), -1), new_length]
    if cache.score is not None:
        values.append(gather(cache.score, 0.0))
    return eqx.tree_at(fields, cache, values)
