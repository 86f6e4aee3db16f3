"""The KV cache: a pytree of static shape, passed into every jitted step and returned from it.

A cache holds `batch` rows (a single sequence is a batch of one). Per layer, row and KV head it has
`capacity` slots of keys and values (keys after RoPE at their original positions) and the original
position of each slot (-1 when empty). Slots are always in position order and filled from slot 0,
so the first `length` slots of a row are its live ones.

The layer axis comes first: the model's `lax.scan` over layers carries the whole cache and reads and
writes one layer at a time, which is then one contiguous block.

What a compression policy needs is carried only when its policy asks for it (`Policy.signals`):
`signals`, the signals the forward records (see the `signals` package: each declares its arrays,
and the cache moves, gathers and resizes them without knowing them).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from . import backend
from .backend import from_bits, storage_dtype, to_bits
from .executables import program
from .signals import Signal, Want


class KVCache(eqx.Module):
    k: jax.Array  # [layers, batch, kv_heads, capacity, head_dim], after RoPE (stored as backend.to_bits)
    v: jax.Array  # [layers, batch, kv_heads, capacity, head_dim]
    pos: jax.Array  # [layers, batch, kv_heads, capacity] int32 original position, -1 = empty
    length: jax.Array  # [batch] int32 live slots
    next_pos: jax.Array  # [batch] int32 tokens seen so far = position of the next token
    signals: tuple[Signal, ...] = ()  # what the forward records for the policies, in `merge` order
    rope_theta: float = eqx.field(static=True, default=10000.0)  # how the keys were rotated (Expected Attention)

    def signal(self, kind: type[Signal]):
        """The signal of this kind the cache carries (None if it carries none)."""
        return next((s for s in self.signals if isinstance(s, kind)), None)

    @property
    def wants(self) -> tuple[Want, ...]:
        """What this cache records, as wants (the structure a cache built from them has)."""
        return tuple(Want(type(s), s.size) for s in self.signals)

    def _with(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]

    @property
    def dtype(self):
        """The dtype of the keys and values (bfloat16 ones are stored as uint16 bits)."""
        return jnp.bfloat16 if self.k.dtype == jnp.uint16 else self.k.dtype

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    # ------------------------------------------------------------------ inside the model's scan
    def write(self, layer, k: jax.Array, v: jax.Array, slot_pos: jax.Array) -> KVCache:
        """Put a chunk's keys and values k, v [B, T, kv, hd] of layer `layer` into slots length..
        with original positions slot_pos [B, T] (-1 for padding). A row with no room (an inactive
        row of a full cache: slot_pos all -1) keeps what is there.

        How is the backend's choice (`backend.row_writes`): one dynamic-update-slice per row, or
        every row in one scatter."""
        b, t = slot_pos.shape
        new_pos = jnp.broadcast_to(slot_pos[:, None, :], (b, k.shape[2], t))  # [B, kv, T]
        new_k, new_v = (to_bits(x.transpose(0, 2, 1, 3).astype(self.dtype)) for x in (k, v))
        if backend.current().row_writes:
            ck, cv, cp = self._write_rows(layer, new_k, new_v, new_pos, slot_pos)
        else:
            # Slot of each token; padding and rows without room go out of range and are dropped.
            slots = jnp.where(slot_pos >= 0, self.length[:, None] + jnp.arange(t)[None, :], self.k.shape[3])
            rows = jnp.arange(b)[:, None]
            put = lambda c, new: c.at[layer, rows, :, slots].set(new.swapaxes(1, 2), mode="drop")
            ck, cv, cp = put(self.k, new_k), put(self.v, new_v), put(self.pos, new_pos)
        return eqx.tree_at(lambda c: (c.k, c.v, c.pos), self, (ck, cv, cp))

    def _write_rows(self, layer, new_k, new_v, new_pos, slot_pos):
        """One in-place dynamic-update-slice per row (a loop over rows unless there is one)."""
        b, t = slot_pos.shape
        cap = self.capacity

        def put(i, arrays):
            ck, cv, cp = arrays
            start = jnp.minimum(self.length[i], cap - t)
            writes = slot_pos[i, 0] >= 0  # padding only at the end of a chunk: its first token says
            at4, at3 = (layer, i, 0, start, 0), (layer, i, 0, start)

            def put_one(c, new, at):
                old = jax.lax.dynamic_slice(c, at, (1, 1, *new.shape[1:]))
                return jax.lax.dynamic_update_slice(c, jnp.where(writes, new[i][None, None], old), at)

            return put_one(ck, new_k, at4), put_one(cv, new_v, at4), put_one(cp, new_pos, at3)

        arrays = (self.k, self.v, self.pos)
        return put(0, arrays) if b == 1 else jax.lax.fori_loop(0, b, put, arrays)

    def keys(self) -> jax.Array:
        """Every layer's keys in their dtype: [layers, batch, kv_heads, capacity, head_dim]."""
        return from_bits(self.k)

    def layer(self, layer) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Keys, values [B, kv, capacity, hd] and positions [B, kv, capacity] of one layer (of a
        window's rows and slots only: see `window`)."""
        b, cap = self.batch, self.capacity
        return from_bits(self.k[layer, :b, :, :cap]), from_bits(self.v[layer, :b, :, :cap]), self.pos[layer]

    def observe(self, layer, q: jax.Array, weights: jax.Array, pos: jax.Array, valid: jax.Array) -> KVCache:
        """Record this layer's signals from a chunk: q [B, T, heads, hd], attention weights
        [B, kv, group, T, S], positions and validity [B, T]."""
        if not self.signals:
            return self
        return self._with(signals=tuple(s.observe(layer, q, weights, pos, valid) for s in self.signals))

    def advance(self, n_valid: jax.Array, pos: jax.Array, valid: jax.Array) -> KVCache:
        """After every layer has run: count the chunk's real tokens in, and let the signals close the chunk."""
        return self._with(length=self.length + n_valid, next_pos=self.next_pos + n_valid,
                          signals=tuple(s.advance(pos, valid) for s in self.signals))

    def cleared_signals(self) -> KVCache:
        """The same slots with every signal as if nothing had been observed yet (`Signal.cleared`)."""
        return self._with(signals=tuple(s.cleared() for s in self.signals))

    def with_signals(self, wants: tuple[Want, ...] = ()) -> KVCache:
        """The same slots carrying only the signals `wants` asks for (each at most what this cache
        records). One prefill recorded with every signal can then be compressed by several policies."""
        out = []
        for want in wants:
            have = self.signal(want.signal)
            if have is None:
                raise ValueError(f"the cache does not record {want.name}")
            out.append(have.narrowed(want))
        return self._with(signals=tuple(out))

    @staticmethod
    def stack(caches: list[KVCache]) -> KVCache:
        """One cache whose rows are the rows of `caches` (same capacity and signals), in order."""
        axes = _batch_axes(caches[0])
        return jax.tree.map(lambda *xs: jnp.concatenate(xs[1:], axis=xs[0]), axes, *caches)

    def truncated(self, position) -> KVCache:
        """Every slot at `position` and after emptied, as if the row had seen only the tokens before
        it (one row; `position` may be traced). Slots stay in position order, so the live ones stay
        first."""
        gone = self.pos >= position
        pos = jnp.where(gone, -1, self.pos)
        return self._with(pos=pos, length=jnp.max(jnp.sum(pos >= 0, axis=-1), axis=(0, 2)).astype(jnp.int32),
                          next_pos=jnp.minimum(self.next_pos, position).astype(jnp.int32),
                          signals=tuple(s.truncated(position, gone) for s in self.signals))

    # ---------------------------------------------------------------------------- whole rows
    def rows(self, start, n: int = 1) -> KVCache:
        """Rows start .. start + n as a cache of n rows (start may be traced)."""
        if n == self.batch:
            return self
        return jax.tree.map(lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, n, axis), self, _batch_axes(self))

    def set_rows(self, start, rows: KVCache) -> KVCache:
        """This cache with rows start.. replaced by `rows` (of the same capacity)."""
        if rows.batch == self.batch:
            return rows
        return jax.tree.map(lambda x, y, axis: jax.lax.dynamic_update_slice_in_dim(x, y, start, axis), self, rows,
                            _batch_axes(self))

    def set_row_prefix(self, slot, row: KVCache) -> KVCache:
        """This cache with row `slot` replaced by the one-row `row`, whose capacity may be smaller:
        keys and values are written only over row's slots, and past them the slot keeps what it
        had (never read: those slots' positions become -1). Pages of a decode state that no row
        reaches are then never written (`backend.release_zero_pages`). In place when donated."""
        if row.capacity == self.capacity:
            return self.set_rows(slot, row)
        # Positions -1 and scores 0 past the row's slots (small leaves, written whole); its own keys
        # and values (the padded ones are dead code).
        full = row.resized(self.capacity)
        part = eqx.tree_at(lambda c: (c.k, c.v), full, (row.k, row.v))
        return jax.tree.map(lambda x, y, axis: jax.lax.dynamic_update_slice_in_dim(x, y, slot, axis), self, part,
                            _batch_axes(self))

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The rows at indices rows [k] (any order; traced), as a cache of k rows (a copy)."""
        return jax.tree.map(lambda x, axis: jnp.take(x, rows, axis=axis), self, _batch_axes(self))

    def put_rows(self, rows: jax.Array, part: KVCache) -> KVCache:
        """This cache with the rows at indices rows [k] replaced by part's k rows (an index given
        twice must get the same row twice)."""
        def put(x, y, axis):
            return x.at[(slice(None),) * axis + (rows,)].set(y)

        return jax.tree.map(put, self, part, _batch_axes(self))

    def prefix(self, n_rows: int, n_slots: int) -> KVCache:
        """Rows [0, n_rows) with their first n_slots slots, as a cache of that shape (static sizes;
        traced). A step that only needs the filled prefix of its rows works on this, so that its
        attention reads what is filled and not the whole capacity; `with_prefix` puts it back."""
        if n_rows == self.batch and n_slots == self.capacity:
            return self
        def cut(x, axis, slotted):
            x = jax.lax.slice_in_dim(x, 0, n_rows, axis=axis)
            return jax.lax.slice_in_dim(x, 0, n_slots, axis=3) if slotted else x

        return jax.tree.map(cut, self, _batch_axes(self), _slot_leaves(self))

    def with_prefix(self, part: KVCache) -> KVCache:
        """This cache with rows [0, part.batch) x slots [0, part.capacity) replaced by `part` (from
        `prefix`: what lies past its slots is empty in those rows and stays so). In place when donated."""
        if part.batch == self.batch and part.capacity == self.capacity:
            return part
        # Every leaf of the part starts at index 0 on every axis of the same leaf here.
        return jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice(x, y, (0,) * x.ndim), self, part)

    def window(self, n_rows: int, n_slots: int) -> KVCache:
        """Rows [0, n_rows) and their first n_slots slots as a cache of that shape for the model's
        forward (static sizes; traced), like `prefix`, except that the keys and values stay whole:
        the forward reads each layer's window of them (`layer`) and writes its tokens in place,
        instead of a copy of the window going out and back in on every call (the whole window of
        16 decode rows is hundreds of MB). Only `write`, `layer`, `observe` and `advance` may be
        called on it; `with_window` puts it back."""
        if n_rows == self.batch and n_slots == self.capacity:
            return self
        part = self.prefix(n_rows, n_slots)
        return eqx.tree_at(lambda c: (c.k, c.v), part, (self.k, self.v))

    def with_window(self, part: KVCache) -> KVCache:
        """This cache with the window `part` (from `window`) put back."""
        if part.batch == self.batch and part.capacity == self.capacity:
            return part
        small = eqx.tree_at(lambda c: (c.k, c.v), part, (self.k, self.v))
        return eqx.tree_at(lambda c: (c.k, c.v), self.with_prefix(small), (part.k, part.v))

    def resized(self, capacity: int) -> KVCache:
        """The same rows with another capacity: pads with empty slots, or cuts slots off the end
        (the caller makes sure they are empty). Traced: call inside a jitted function."""
        old = self.capacity
        if capacity == old:
            return self

        def fit(x, fill):
            if capacity < old:
                return jax.lax.slice_in_dim(x, 0, capacity, axis=3)
            widths = [(0, 0)] * x.ndim
            widths[3] = (0, capacity - old)
            return jnp.pad(x, widths, constant_values=fill)

        signals = tuple(sig.map_slotted(fit) for sig in self.signals)
        return self._with(k=fit(self.k, 0), v=fit(self.v, 0), pos=fit(self.pos, -1), signals=signals)


def _batch_axes(cache: KVCache) -> KVCache:
    """The batch axis of every leaf: 1 under the leading layer axis, 0 for per-row leaves."""
    return KVCache(k=1, v=1, pos=1, length=0, next_pos=0, signals=tuple(s.batch_axes() for s in cache.signals),
                   rope_theta=cache.rope_theta)


def _slot_leaves(cache: KVCache) -> KVCache:
    """Whether each leaf has the slot axis (axis 3): the keys, values, positions and per-slot signals."""
    return KVCache(k=True, v=True, pos=True, length=False, next_pos=False,
                   signals=tuple(s.slotted() for s in cache.signals), rope_theta=cache.rope_theta)


@program(static_argnums=(0, 1, 2, 3, 4))
def empty_cache(cfg: ModelConfig, batch: int, capacity: int, dtype, wants: tuple[Want, ...] = ()) -> KVCache:
    """An empty cache recording the signals `wants` asks for (in `signals.merge` order)."""
    lead = (cfg.n_layers, batch, cfg.n_kv_heads, capacity)
    return KVCache(
        k=jnp.zeros((*lead, cfg.head_dim), storage_dtype(dtype)),
        v=jnp.zeros((*lead, cfg.head_dim), storage_dtype(dtype)),
        pos=jnp.full(lead, -1, jnp.int32),
        length=jnp.zeros(batch, jnp.int32),
        next_pos=jnp.zeros(batch, jnp.int32),
        signals=tuple(w.signal.empty(cfg, batch, capacity, w.size) for w in wants),
        rope_theta=cfg.rope_theta,
    )


def kept_positions(cache: KVCache, length: int) -> np.ndarray:
    """Original positions of the live slots of a one-row cache: [layers, kv_heads, length]."""
    return np.asarray(cache.pos)[:, 0, :, :length]  # sliced on the host: no compile per length
