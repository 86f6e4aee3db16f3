"""An idle session's hot cache, parked in host memory with only its live slots.

Between turns a session's hot tier is not read. Kept as the engine hands it back (one row at its
class's capacity, 2,064 slots for the default class), a session that had said hello held ~48 MB;
parked, it holds what it has: a 40-token session 0.9 MB. Parking is a copy to the host (no program:
nothing compiles), and so is the way back (`unpark`, at the capacity the next turn prefills into).

Under memory pressure a parked row moves down a ladder (`server.pressure`), and nothing in it is
lost but precision:
- `quantized(8)`: its keys and values as int8 with a float16 scale per token and KV head, as the
  cold tier stores them (half the bytes of bfloat16); `quantized(4)`: int4 in groups of 32 channels;
- `split_cold`: for a session with a cold tier, every slot but the policy's sinks and recent window
  moves into the cold tier. The next turn recalls hot ∪ cold and its question re-selects the hot
  set over both (`tiers`), so what was moved comes back where the question needs it.

A parked row is immutable: every change returns a new one, so a reader never sees half a change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import ml_dtypes
import numpy as np

from .cache import KVCache
from .signals import Signal
from .tiers import ColdChunk, ColdTier, dequantize, pack, quantize, unpack


@dataclass(frozen=True)
class ParkedRow:
    """A one-row cache on the host, cut to its live slots (`slots`). Keys and values are as the
    cache stores them (`bits` 0) or quantised (`bits` 8 or 4: codes, packed for int4, and scales)."""

    k: np.ndarray  # [layers, 1, kv, slots, head_dim] as stored, or codes
    v: np.ndarray
    pos: np.ndarray  # [layers, 1, kv, slots] int32, -1 = empty
    length: np.ndarray  # [1] int32
    next_pos: np.ndarray  # [1] int32
    signals: tuple[Signal, ...]  # their per-slot arrays cut to `slots` (numpy)
    rope_theta: float
    stored: np.dtype  # the dtype the cache stores keys and values in (uint16: bfloat16 bits)
    bits: int = 0
    k_scale: np.ndarray | None = None  # [layers, 1, kv, slots, head_dim / group] float16 when quantised
    v_scale: np.ndarray | None = None

    @property
    def slots(self) -> int:
        return self.pos.shape[-1]

    @property
    def capacity(self) -> int:
        return self.slots

    @property
    def kv_nbytes(self) -> int:
        """Bytes of its keys and values (the hot tier's size)."""
        return sum(a.nbytes for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None)

    @property
    def nbytes(self) -> int:
        signals = sum(getattr(s, f).nbytes for s in self.signals for f in s.leaves)
        return self.kv_nbytes + self.pos.nbytes + signals

    # --------------------------------------------------------------------- down the ladder
    def quantized(self, bits: int) -> ParkedRow:
        """Keys and values at `bits` (8 or 4)."""
        if bits == self.bits:
            return self
        k, v = (self._real(x, s) for x, s in ((self.k, self.k_scale), (self.v, self.v_scale)))
        (kc, ks), (vc, vs) = quantize(k, bits, xp=np), quantize(v, bits, xp=np)
        return dataclasses.replace(self, k=pack(kc, bits), v=pack(vc, bits), k_scale=ks, v_scale=vs, bits=bits)

    def _real(self, x: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
        """Keys or values as float32."""
        if self.bits:
            return dequantize(unpack(x, self.bits), scale, np.float32, xp=np)
        if x.dtype == np.uint16:
            return x.view(ml_dtypes.bfloat16).astype(np.float32)
        return x.astype(np.float32)

    def _stored(self, x: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
        """Keys or values as the cache stores them."""
        if not self.bits:
            return x
        real = self._real(x, scale)
        if self.stored == np.uint16:
            return real.astype(ml_dtypes.bfloat16).view(np.uint16)
        return real.astype(self.stored)

    def split_cold(self, cold: ColdTier, sink: int, window: int) -> tuple[ParkedRow, ColdTier, int]:
        """Every live slot but the first `sink` and the last `window` of each layer and KV head moved
        into `cold` (quantised at its bits, with their positions) -> (row, cold tier, slots moved per
        layer and KV head, on average)."""
        pos = self.pos[:, 0]  # [layers, kv, slots]
        live = pos >= 0
        n_live = live.sum(axis=-1, keepdims=True)
        index = np.arange(self.slots)
        hot = live & ((index < sink) | (index >= n_live - window))
        moving = live & ~hot
        moved = int(moving.sum()) // max(1, pos.shape[0] * pos.shape[1])
        if not moved:
            return self, cold, 0

        def gather(mask: np.ndarray):
            """Each head's slots where `mask`, first (in slot order), cut to the most any head has."""
            n = int(mask.sum(axis=-1).max())
            order = np.argsort(~mask, axis=-1, kind="stable")[..., :n]
            return order, np.take_along_axis(mask, order, axis=-1)

        # What goes cold, quantised as a ColdChunk of one row.
        order, ok = gather(moving)
        take = lambda x: np.take_along_axis(x[:, 0], order[..., None], axis=2)
        k, v = (take(self._real(x, s)) for x, s in ((self.k, self.k_scale), (self.v, self.v_scale)))
        (kc, ks), (vc, vs) = quantize(k, cold.bits, xp=np), quantize(v, cold.bits, xp=np)
        cpos = np.where(ok, np.take_along_axis(pos, order, axis=-1), -1).astype(np.int32)
        chunk = ColdChunk(kc[:, None], ks[:, None], vc[:, None], vs[:, None], cpos[:, None])
        cold = cold.extend([(chunk, 0)])

        # What stays hot, compacted to the front of each head; per-slot signals follow their slots.
        order, ok = gather(hot)

        def keep(x: np.ndarray, fill) -> np.ndarray:
            extra = (1,) * (x.ndim - 4)  # channels, for keys and values
            idx = order[:, None].reshape(*order.shape[:1], 1, *order.shape[1:], *extra)
            out = np.take_along_axis(x, np.broadcast_to(idx, (*x.shape[:3], idx.shape[3], *x.shape[4:])), axis=3)
            gone = ~ok[:, None].reshape(*ok.shape[:1], 1, *ok.shape[1:], *extra)
            return np.where(gone, np.asarray(fill, x.dtype), out)

        row = dataclasses.replace(
            self, k=keep(self.k, 0), v=keep(self.v, 0), pos=keep(self.pos, -1),
            k_scale=None if self.k_scale is None else keep(self.k_scale, 0),
            v_scale=None if self.v_scale is None else keep(self.v_scale, 0),
            length=np.asarray([ok.sum(axis=-1).max()], np.int32),
            signals=tuple(s.map_slotted(keep) for s in self.signals))
        return row, cold, moved


def park(cache: KVCache) -> ParkedRow:
    """A one-row cache as a parked row: copied to the host, its live slots only."""
    n = int(np.asarray(cache.length)[0])
    cut = lambda x: np.array(np.asarray(x)[:, :, :, :n])  # a copy: the device buffer can go

    def host(x, axis, fill):
        return cut(x) if fill is not None else np.array(np.asarray(x))

    return ParkedRow(k=cut(cache.k), v=cut(cache.v), pos=cut(cache.pos), length=np.array(np.asarray(cache.length)),
                     next_pos=np.array(np.asarray(cache.next_pos)),
                     signals=tuple(s.map_leaves(host) for s in cache.signals), rope_theta=cache.rope_theta,
                     stored=np.dtype(cache.k.dtype))


def unpark(row: ParkedRow, capacity: int) -> KVCache:
    """A parked row back on the device as a one-row cache of `capacity` slots (at least its own).
    Only the live slots are written: the rest of a large buffer stays untouched zero pages. Uploaded
    with `jax.device_put`, which compiles nothing (`jnp.asarray` would build a program per shape)."""
    if capacity < row.slots:
        raise ValueError(f"a parked row of {row.slots} slots does not fit {capacity}")

    def fit(x: np.ndarray, fill) -> jax.Array:
        out = np.zeros((*x.shape[:3], capacity, *x.shape[4:]), x.dtype) if fill == 0 else \
            np.full((*x.shape[:3], capacity, *x.shape[4:]), fill, x.dtype)
        out[:, :, :, : x.shape[3]] = x
        return jax.device_put(out)

    def device(x, axis, fill):
        return fit(x, fill) if fill is not None else jax.device_put(x)

    k = row._stored(row.k, row.k_scale)
    v = row._stored(row.v, row.v_scale)
    return KVCache(k=fit(k, 0), v=fit(v, 0), pos=fit(row.pos, -1), length=jax.device_put(row.length),
                   next_pos=jax.device_put(row.next_pos), signals=tuple(s.map_leaves(device) for s in row.signals),
                   rope_theta=row.rope_theta)

