"""What every compression policy shares: its parameters, the signals it declares, the eviction.

A policy is a small frozen dataclass that carries its own parameters (hashable: jitted steps
specialise on it) and one scoring function that rates every cache slot per layer, row and KV head
(higher = keep). It declares the signals the forward must record for it (`signals`); a cache built
for the policy carries exactly those, so a forward computes only what some row needs. Everything
else lives here, once: protecting the attention sinks and the recent window, the top-k, and
gathering the kept slots to the front in position order.

Most policies keep the same number of slots in every layer and KV head. Some spread a total over
heads (AdaKV) or layers (PyramidKV): `allocate` says how many slots each (layer, row, KV head)
keeps, and `kept_slots` bounds it. The cache's shape stays static: every head's kept slots go to
the front in position order and the rest of the first `kept_slots` slots are left empty (position
-1, masked like any empty slot), so a row's length is always `kept_slots` after a compression.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..signals import Want


def param(default, doc: str, *, ge: int | None = None, le: int | None = None, choices: tuple | None = None):
    """A policy parameter: its default, what it means, and the values a request may give it (the
    server's request schema is generated from these: server/schemas.py `CacheSpec`)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "ge": ge, "le": le, "choices": choices})


@dataclass(frozen=True)
class Policy:
    """A cache policy. Subclasses set `name`, and compressing ones implement `score`."""

    name: ClassVar[str]
    evicts: ClassVar[bool] = True
    # Whether the engine runs a reconstruction pass over the context before each compression of a
    # prompt (KVzip; see `Engine._reconstruct`).
    reconstructs: ClassVar[bool] = False

    @property
    def signals(self) -> tuple[Want, ...]:
        """The signals the forward must record for this policy (see the `signals` package)."""
        return ()

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

    budget: int = param(64, "Slots kept per layer and KV head after a compression.", ge=1, le=65536)
    sink_size: int = param(4, "First tokens never evicted (attention sinks).", ge=0, le=65536)
    window_size: int = param(16, "Most recent tokens never evicted.", ge=0, le=65536)
    slack: int = param(16, "Decoding compresses when the cache reaches budget + slack.", ge=1, le=4096)
    # A session keeps what its hot cache evicts in a cold tier quantised to this many bits (8 or 4;
    # 0: evicted tokens are dropped), and re-selects its hot set from both at every new turn.
    cold_bits: int = param(8, "The cold tier a session keeps what its hot cache evicts in (8 or 4 bits; 0: "
                           "none, evicted tokens are dropped).", choices=(0, 4, 8))

    def validate(self) -> EvictingPolicy:
        if self.budget < 1 or self.sink_size < 0 or self.window_size < 0 or self.slack < 1:
            raise ValueError("budget and slack must be >= 1, sink_size and window_size >= 0")
        if self.cold_bits not in (0, 4, 8):
            raise ValueError(f"cold_bits must be 0 (no cold tier), 4 or 8, not {self.cold_bits}")
        if self.sink_size + self.window_size > self.budget:
            raise ValueError(f"sink_size + window_size ({self.sink_size} + {self.window_size}) must not exceed "
                             f"the budget ({self.budget})")
        return self

    @property
    def kept_slots(self) -> int:
        """Slots a row occupies after a compression: `budget`, or the most any one layer and head
        may keep under a policy whose budget varies."""
        return self.budget

    @property
    def trigger(self) -> int:
        """Cache length at which decoding compresses (amortises compression over `slack` steps)."""
        return self.kept_slots + self.slack

    def allocate(self, scores: jax.Array, live: jax.Array, protected: jax.Array) -> jax.Array:
        """Slots to keep per layer, row and KV head [layers, batch, kv_heads] int32, given the
        scores and masks of `compress` (protected slots score +inf, empty ones -inf): `budget`
        everywhere unless the policy spreads its budget unevenly."""
        return jnp.full(scores.shape[:3], self.budget, jnp.int32)

    def score(self, cache: KVCache) -> jax.Array:
        """Score every slot: [layers, batch, kv_heads, capacity], higher = keep. Empty slots, sinks
        and the recent window are handled by `compress`; scores there are ignored."""
        raise NotImplementedError


def protected_slots(cache: KVCache, policy: EvictingPolicy) -> tuple[jax.Array, jax.Array]:
    """(live, protected) masks [layers, batch, kv_heads, capacity].

    By original position, since a head may have empty slots among its live ones: the sinks are
    positions below `sink_size`, the window the last `window_size` positions seen.
    """
    live = cache.pos >= 0
    recent = cache.pos >= (cache.next_pos - policy.window_size)[None, :, None, None]
    protected = live & ((cache.pos < policy.sink_size) | recent)
    return live, protected


def compress(cache: KVCache, policy: EvictingPolicy) -> KVCache:
    """Keep the slots `policy.allocate` grants each layer, row and KV head (`budget` unless the
    policy spreads it; all live ones if fewer) in position order at the front of the same
    capacity; the row's length becomes `kept_slots` (or stays, if shorter)."""
    return _compress(cache, policy, split=False)[0]


def compress_split(cache: KVCache, policy: EvictingPolicy, evictable: jax.Array | None = None,
                   n_evicted: int | None = None) -> tuple[KVCache, Evicted, jax.Array]:
    """`compress`, and what it evicts: the live slots it did not keep, in position order, as
    `Evicted` [layers, batch, kv_heads, capacity - kept_slots, or capacity when the policy spreads
    its budget unevenly] (position -1 past each head's last), and the kept mask over the input's
    slots [layers, batch, kv_heads, capacity]. `evictable` [like the kept mask]: only those of the
    evicted slots are handed back, `n_evicted` of them at most (a bound the caller knows)."""
    return _compress(cache, policy, split=True, evictable=evictable, n_evicted=n_evicted)


class Evicted(eqx.Module):
    """Slots a compression dropped, as the cache stores them (keys after RoPE, bfloat16 as bits)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


def _compress(cache: KVCache, policy: EvictingPolicy, split: bool, evictable=None, n_evicted=None):
    live, protected = protected_slots(cache, policy)
    scores = policy.score(cache)
    scores = jnp.where(protected, jnp.inf, jnp.where(live, scores, -jnp.inf))
    counts = policy.allocate(scores, live, protected)  # [layers, batch, kv_heads]
    k_max = policy.kept_slots
    _, best = jax.lax.top_k(scores, k_max)  # [layers, batch, kv_heads, k_max], best first
    chosen = (jnp.arange(k_max) < counts[..., None]) & jnp.take_along_axis(live, best, axis=3)
    # Chosen slots first in slot (= position) order, the rest after them.
    keep = jnp.sort(jnp.where(chosen, best, best + cache.capacity), axis=-1) % cache.capacity
    kept = jnp.arange(k_max) < chosen.sum(axis=-1, keepdims=True)  # the chosen ones come first
    pad = cache.capacity - k_max

    def gather(x: jax.Array, index: jax.Array, fill, width: int) -> jax.Array:
        kept_x = jnp.take_along_axis(x, index if x.ndim == 4 else index[..., None], axis=3)
        widths = [(0, 0)] * x.ndim
        widths[3] = (0, width)
        return jnp.pad(kept_x, widths, constant_values=fill)

    new_length = jnp.minimum(cache.length, k_max)
    in_use = jnp.pad(kept, [(0, 0)] * 3 + [(0, pad)])
    out = dataclasses.replace(
        cache, k=gather(cache.k, keep, 0, pad), v=gather(cache.v, keep, 0, pad),
        pos=jnp.where(in_use, gather(cache.pos, keep, -1, pad), -1), length=new_length,
        signals=tuple(sig.map_slotted(lambda x, fill: gather(x, keep, fill, pad)) for sig in cache.signals))
    if not split:
        return out, None, None
    # The kept mask over the input's slots, then the evicted (live, not kept) slots in slot order.
    n_layers, batch, n_kv, capacity = cache.pos.shape
    index = [i[..., None] for i in jnp.ix_(jnp.arange(n_layers), jnp.arange(batch), jnp.arange(n_kv))]
    kept_mask = jnp.zeros(cache.pos.shape, bool).at[(*index, best)].set(chosen)
    evicted = live & ~kept_mask
    if evictable is not None:
        evicted &= evictable
    slot = jnp.arange(capacity)
    # A head keeps kept_slots, so at most capacity - kept_slots are evicted, unless the policy
    # spreads its budget unevenly: then a head may keep fewer, and evict up to the whole row.
    n_out = capacity - k_max if type(policy).allocate is EvictingPolicy.allocate else capacity
    n_out = min(n_out, n_evicted or capacity)
    order = (jnp.sort(jnp.where(evicted, slot, slot + capacity), axis=-1) % capacity)[..., :n_out]
    is_evicted = jnp.arange(n_out) < evicted.sum(axis=-1, keepdims=True)
    ev = Evicted(gather(cache.k, order, 0, 0), gather(cache.v, order, 0, 0),
                 jnp.where(is_evicted, gather(cache.pos, order, -1, 0), -1))
    return out, ev, kept_mask
