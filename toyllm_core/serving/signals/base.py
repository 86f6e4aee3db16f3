"""What a signal is: something the forward records in the cache for a compression policy to read.

A signal is a small module of arrays that rides in the cache (`KVCache.signals`). It declares, per
array, the axis its rows are on and, for an array with one entry per cache slot (axis 3, after the
layer, row and KV-head axes), the value of an empty slot. With that the cache moves, gathers,
resizes and truncates every signal's arrays without knowing them. A signal says itself how a
forward records it (`observe`, once per layer; `advance`, once per chunk) and how it starts
(`empty`).

A policy asks for signals with `Want`s; a cache built for several policies records the union
(`merge`), and `narrowed` hands each policy what it asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ...config import ModelConfig


@dataclass(frozen=True)
class Want:
    """A policy's request for a signal (hashable: classes and jitted steps take it statically)."""

    signal: type[Signal]
    size: int = 0  # a size the signal takes (RecentQueries: how many queries it remembers)

    @property
    def name(self) -> str:
        return self.signal.name


class Signal(eqx.Module):
    """Base class. Subclasses set `name` and `leaves` ({field: (batch axis, empty-slot fill or None
    for an array without a slot axis)}) and implement `empty` and `observe`."""

    name: ClassVar[str]
    leaves: ClassVar[dict[str, tuple[int, float | int | None]]]

    @classmethod
    def want(cls, size: int = 0) -> Want:
        return Want(cls, size)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, size: int) -> Signal:
        raise NotImplementedError

    def observe(self, layer, q: jax.Array, weights: jax.Array, pos: jax.Array, valid: jax.Array) -> Signal:
        """Record layer `layer` of a chunk: queries q [B, T, heads, hd], attention weights [B, kv,
        group, T, S] over the cache's S slots, the chunk's positions and validity [B, T]."""
        raise NotImplementedError

    def advance(self, pos: jax.Array, valid: jax.Array) -> Signal:
        """After every layer has run a chunk."""
        return self

    def narrowed(self, want: Want) -> Signal:
        """This signal as `want` asks for it (its size at most this one's)."""
        return self

    def truncated(self, position, gone: jax.Array) -> Signal:
        """As if the row had seen only the tokens before `position`; `gone` [layers, B, kv, capacity]
        marks the slots emptied. Per-slot arrays are reset to their fill there."""
        return self.map_slotted(lambda x, fill: jnp.where(_expand(gone, x), fill, x))

    def cleared(self) -> Signal:
        """As if nothing had been observed: per-slot arrays at their fill (the rest as they are)."""
        return self.map_slotted(lambda x, fill: jnp.full_like(x, fill))

    @property
    def size(self) -> int:
        return 0

    # ------------------------------------------------------------------ generic, from `leaves`
    def map_leaves(self, fn) -> Signal:
        """fn(array, batch_axis, fill) applied to every array."""
        return dataclasses.replace(self, **{f: fn(getattr(self, f), axis, fill)
                                            for f, (axis, fill) in self.leaves.items()})

    def map_slotted(self, fn) -> Signal:
        """fn(array, fill) applied to the arrays with a slot axis."""
        return self.map_leaves(lambda x, axis, fill: x if fill is None else fn(x, fill))

    def batch_axes(self) -> Signal:
        """The same structure with each array's batch axis in place of the array."""
        return type(self)(**{f: axis for f, (axis, _) in self.leaves.items()})

    def slotted(self) -> Signal:
        """The same structure with whether each array has the slot axis."""
        return type(self)(**{f: fill is not None for f, (_, fill) in self.leaves.items()})


def _expand(mask: jax.Array, x: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def merge(wants) -> tuple[Want, ...]:
    """The union of several policies' wants: each signal once, at the largest size asked, in a fixed
    order (so that caches built from the same wants have the same structure)."""
    by_name: dict[str, Want] = {}
    for w in wants:
        old = by_name.get(w.name)
        by_name[w.name] = w if old is None or w.size > old.size else old
    return tuple(by_name[n] for n in sorted(by_name))
