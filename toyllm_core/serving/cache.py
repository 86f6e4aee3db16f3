"""The KV cache: a pytree of static shape, passed into every jitted step and returned from it.

A cache holds `batch` rows (a single sequence is a batch of one). Per layer, row and KV head it has
`capacity` slots of keys and values (keys after RoPE at their original positions) and the original
position of each slot (-1 when empty). Slots are always in position order and filled from slot 0,
so the first `length` slots of a row are its live ones.

The layer axis comes first: the model's `lax.scan` over layers carries the whole cache and reads and
writes one layer at a time, which is then one contiguous block.

What a compression policy needs is carried only when its policy declares it (see
`policies.Signals`); the forward records a signal exactly when the cache has room for it:
- `score`: the attention each key has received so far, summed over queries (H2O);
- `recent_q`, `recent_pos`: the queries of the most recent tokens, a ring buffer (SnapKV's window).
"""

from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from . import backend
from .backend import from_bits, storage_dtype, to_bits


class KVCache(eqx.Module):
    k: jax.Array  # [layers, batch, kv_heads, capacity, head_dim], after RoPE (stored as backend.to_bits)
    v: jax.Array  # [layers, batch, kv_heads, capacity, head_dim]
    pos: jax.Array  # [layers, batch, kv_heads, capacity] int32 original position, -1 = empty
    length: jax.Array  # [batch] int32 live slots
    next_pos: jax.Array  # [batch] int32 tokens seen so far = position of the next token
    score: jax.Array | None = None  # [layers, batch, kv_heads, capacity] float32 attention received
    recent_q: jax.Array | None = None  # [layers, batch, heads, R, head_dim] float32 ring buffer, slot = pos % R
    recent_pos: jax.Array | None = None  # [batch, R] int32 position of each remembered query, -1 = none
    rope_theta: float = eqx.field(static=True, default=10000.0)  # how the keys were rotated (Expected Attention)

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
            slots = jnp.where(slot_pos >= 0, self.length[:, None] + jnp.arange(t)[None, :], self.capacity)
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
        """Keys, values [B, kv, capacity, hd] and positions [B, kv, capacity] of one layer."""
        return from_bits(self.k[layer]), from_bits(self.v[layer]), self.pos[layer]

    def observe(self, layer, q: jax.Array, weights: jax.Array, pos: jax.Array, valid: jax.Array) -> KVCache:
        """Record this layer's policy signals from a chunk: q [B, T, heads, hd], attention weights
        [B, kv, group, T, S], positions and validity [B, T]. Records only what the cache carries."""
        cache = self
        if self.score is not None:
            # Attention each key received from the chunk's real queries, summed over the query heads
            # of its KV group: H2O's accumulated score.
            received = jnp.einsum("bkgts,bt->bks", weights, valid.astype(jnp.float32))
            cache = eqx.tree_at(lambda c: c.score, cache, self.score.at[layer].add(received))
        if self.recent_q is not None:
            ring = _ring_slots(pos, valid, self.recent_q.shape[3])
            rows = jnp.arange(q.shape[0])[:, None]
            recent_q = self.recent_q.at[layer, rows, :, ring].set(q.astype(jnp.float32), mode="drop")
            cache = eqx.tree_at(lambda c: c.recent_q, cache, recent_q)
        return cache

    def advance(self, n_valid: jax.Array, pos: jax.Array, valid: jax.Array) -> KVCache:
        """After every layer has run: count the chunk's real tokens in (and remember their positions
        in the query ring)."""
        cache = eqx.tree_at(lambda c: (c.length, c.next_pos), self,
                            (self.length + n_valid, self.next_pos + n_valid))
        if self.recent_pos is not None:
            ring = _ring_slots(pos, valid, self.recent_pos.shape[1])
            rows = jnp.arange(pos.shape[0])[:, None]
            cache = eqx.tree_at(lambda c: c.recent_pos, cache, self.recent_pos.at[rows, ring].set(pos, mode="drop"))
        return cache

    def with_signals(self, scores: bool = False, recent: int = 0) -> KVCache:
        """The same slots carrying only the signals asked for: the attention scores if `scores`, and
        the last `recent` queries (at most the ring this cache has). One prefill recorded with every
        signal can then be compressed by several policies (the long-context evaluation)."""
        score = self.score if scores else None
        recent_q = recent_pos = None
        if recent:
            ring = self.recent_q.shape[3]
            if recent > ring:
                raise ValueError(f"the cache remembers {ring} queries, fewer than {recent}")
            last = self.next_pos[:, None] - 1  # [B, 1]
            wanted = last - ((last - jnp.arange(recent)[None, :]) % recent)  # slot j: latest position = j mod r
            src = wanted % ring
            rows = jnp.arange(self.batch)[:, None]
            ok = (wanted >= 0) & (self.recent_pos[rows, src] == wanted)
            recent_pos = jnp.where(ok, wanted, -1).astype(jnp.int32)
            recent_q = self.recent_q[:, rows, :, src].transpose(2, 0, 3, 1, 4)  # [L, B, H, recent, hd]
        return KVCache(self.k, self.v, self.pos, self.length, self.next_pos, score, recent_q, recent_pos,
                       self.rope_theta)

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
        fields = lambda c: [c.pos, c.length, c.next_pos] + ([c.score] if c.score is not None else []) + \
            ([c.recent_pos] if c.recent_pos is not None else [])
        values = [pos, jnp.max(jnp.sum(pos >= 0, axis=-1), axis=(0, 2)).astype(jnp.int32),
                  jnp.minimum(self.next_pos, position).astype(jnp.int32)]
        if self.score is not None:
            values.append(jnp.where(gone, 0.0, self.score))
        if self.recent_pos is not None:
            values.append(jnp.where(self.recent_pos >= position, -1, self.recent_pos))
        return eqx.tree_at(fields, self, values)

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

        fields = lambda c: [c.k, c.v, c.pos] + ([c.score] if c.score is not None else [])
        values = [fit(self.k, 0), fit(self.v, 0), fit(self.pos, -1)]
        if self.score is not None:
            values.append(fit(self.score, 0.0))
        return eqx.tree_at(fields, self, values)


def _ring_slots(pos: jax.Array, valid: jax.Array, ring: int) -> jax.Array:
    """Ring-buffer slot [B, T] for each token: pos % R for the last R real tokens of each row, and
    the out-of-range slot R (dropped by the scatter) for the rest."""
    n_valid = valid.sum(axis=1, keepdims=True)
    offsets = jnp.arange(pos.shape[1])[None, :]
    remembered = valid & (offsets >= n_valid - ring)
    return jnp.where(remembered, pos % ring, ring)


def _batch_axes(cache: KVCache) -> KVCache:
    """The batch axis of every leaf: 1 under the leading layer axis, 0 for per-row leaves."""
    per_layer = lambda x: None if x is None else 1
    return KVCache(k=1, v=1, pos=1, length=0, next_pos=0, score=per_layer(cache.score),
                   recent_q=per_layer(cache.recent_q), recent_pos=None if cache.recent_pos is None else 0,
                   rope_theta=cache.rope_theta)


def _slot_leaves(cache: KVCache) -> KVCache:
    """Whether each leaf has the slot axis (axis 3): the keys, values, positions and scores."""
    return KVCache(k=True, v=True, pos=True, length=False, next_pos=False,
                   score=None if cache.score is None else True,
                   recent_q=None if cache.recent_q is None else False,
                   recent_pos=None if cache.recent_pos is None else False, rope_theta=cache.rope_theta)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def empty_cache(cfg: ModelConfig, batch: int, capacity: int, dtype, scores: bool = False,
                recent: int = 0) -> KVCache:
    """An empty cache; `scores` and `recent` (ring size) add the signals a policy declares."""
    lead = (cfg.n_layers, batch, cfg.n_kv_heads, capacity)
    return KVCache(
        k=jnp.zeros((*lead, cfg.head_dim), storage_dtype(dtype)),
        v=jnp.zeros((*lead, cfg.head_dim), storage_dtype(dtype)),
        pos=jnp.full(lead, -1, jnp.int32),
        length=jnp.zeros(batch, jnp.int32),
        next_pos=jnp.zeros(batch, jnp.int32),
        score=jnp.zeros(lead, jnp.float32) if scores else None,
        recent_q=jnp.zeros((cfg.n_layers, batch, cfg.n_heads, recent, cfg.head_dim), jnp.float32) if recent else None,
        recent_pos=jnp.full((batch, recent), -1, jnp.int32) if recent else None,
        rope_theta=cfg.rope_theta,
    )


def kept_positions(cache: KVCache, length: int) -> np.ndarray:
    """Original positions of the live slots of a one-row cache: [layers, kv_heads, length]."""
    return np.asarray(cache.pos)[:, 0, :, :length]  # sliced on the host: no compile per length
