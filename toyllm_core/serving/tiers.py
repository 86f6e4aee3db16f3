"""The cold tier: every key and value a session's hot cache evicted, quantised, in host memory.

A compressing cache keeps `budget` slots hot (what decoding attends to). What a compression drops
is not thrown away: `compress_split` hands it back, it is quantised on the device (`quantize`,
inside the same jitted step) and a session keeps it here, with the original position of every
entry. When a new turn arrives, all but its last prompt tokens are prefilled against the hot cache;
then `recall` puts hot ∪ cold back together (cold keys and values dequantised) and the last prompt
tokens (the question, and the template's reply header) are prefilled against all of it, so in
every layer their queries see the whole history. `reselect` lets those queries vote and picks the
hot set again: cold tokens come back, and what is no longer voted for goes cold. So no turn's choice
is final, and nothing is lost unless the session itself is.

A re-selection moves only what changes tier: the cold entries it brings back leave the host tier
(`ColdTier.reselected`), and the hot slots it drops are quantised and added to it. What stays cold is
neither copied back from the device nor quantised again.

Quantisation is symmetric, one float16 scale per token, KV head and group of `group` channels
(int8: the whole head, 64 channels on SmolLM2; int4: groups of 32, two codes packed per byte on the
host). The cold tier is never read while decoding; only a new turn uploads it, padded to a length
bucket so that recalling it is one program per bucket (`cold_buckets`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .backend import from_bits, to_bits
from .cache import KVCache

COLD_BITS = (0, 4, 8)  # 0: no cold tier (evicted tokens are dropped)
MIN_COLD_BUCKET = 256


def group_size(bits: int, head_dim: int) -> int:
    """Channels that share one scale: the whole head at int8, 32 channels at int4."""
    return head_dim if bits == 8 else min(32, head_dim)


def cold_buckets(max_tokens: int) -> list[int]:
    """The cold lengths a re-selection compiles for: powers of two from MIN_COLD_BUCKET up to the
    first one that holds `max_tokens`."""
    sizes, n = [MIN_COLD_BUCKET], MIN_COLD_BUCKET
    while n < max_tokens:
        n *= 2
        sizes.append(n)
    return sizes


def cold_bucket(max_tokens: int, n: int) -> int:
    return next(b for b in cold_buckets(max_tokens) if b >= n)


# ------------------------------------------------------------------------------- on the device
class ColdChunk(eqx.Module):
    """Quantised slots [layers, batch, kv_heads, n, ...]: codes int8 (values in [-qmax, qmax]),
    scales float16 [..., n, head_dim / group], positions int32 (-1 = not an entry)."""

    k: jax.Array
    k_scale: jax.Array
    v: jax.Array
    v_scale: jax.Array
    pos: jax.Array


def quantize(x, bits: int, xp=jnp):
    """x [..., head_dim] (any float dtype) -> (codes int8, scales float16 [..., head_dim / group]).
    `xp`: jax.numpy inside a jitted step, numpy on the host (`parking`)."""
    qmax = (1 << (bits - 1)) - 1
    hd = x.shape[-1]
    g = group_size(bits, hd)
    xs = x.astype(xp.float32).reshape(*x.shape[:-1], hd // g, g)
    scale = (xp.max(xp.abs(xs), axis=-1) / qmax).astype(xp.float16)
    safe = xp.where(scale > 0, scale.astype(xp.float32), 1.0)
    codes = xp.clip(xp.round(xs / safe[..., None]), -qmax, qmax).astype(xp.int8)
    return codes.reshape(x.shape), scale


def dequantize(codes, scale, dtype, xp=jnp):
    hd = codes.shape[-1]
    g = hd // scale.shape[-1]
    xs = codes.astype(xp.float32).reshape(*codes.shape[:-1], hd // g, g) * scale.astype(xp.float32)[..., None]
    return xs.reshape(codes.shape).astype(dtype)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Host codes as kept: int8 as they are, int4 two per byte."""
    if bits == 8:
        return codes
    c = (codes.astype(np.int16) & 0xF).astype(np.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    lo, hi = (packed & 0xF).astype(np.int8), (packed >> 4).astype(np.int8)
    lo, hi = np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.int8)
    out[..., 0::2], out[..., 1::2] = lo, hi
    return out


def quantize_slots(k_bits: jax.Array, v_bits: jax.Array, pos: jax.Array, bits: int) -> ColdChunk:
    """Slots as the cache stores them (bfloat16 as bits) -> a ColdChunk."""
    k, ks = quantize(from_bits(k_bits), bits)
    v, vs = quantize(from_bits(v_bits), bits)
    return ColdChunk(k, ks, v, vs, pos)


def merge(cache: KVCache, cold: ColdChunk) -> tuple[KVCache, jax.Array]:
    """Hot ∪ cold as one cache of capacity hot + cold, every (layer, row, KV head) in position order
    with its empty slots last, and where each slot came from [layers, batch, kv, slots]: its index
    in `cold`, or -1 for a hot slot (or an empty one). Signals are kept (a cold slot's per-slot
    signals start empty, e.g. an attention sum at 0)."""
    hot_cap = cache.capacity
    big = cache.resized(hot_cap + cold.pos.shape[-1])
    dtype = cache.dtype
    put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, hot_cap, 3)
    k = put(big.k, to_bits(dequantize(cold.k, cold.k_scale, dtype)))
    v = put(big.v, to_bits(dequantize(cold.v, cold.v_scale, dtype)))
    pos = put(big.pos, cold.pos)
    index = jnp.broadcast_to(jnp.arange(cold.pos.shape[-1], dtype=jnp.int32), cold.pos.shape)
    origin = put(jnp.full(pos.shape, -1, jnp.int32), jnp.where(cold.pos >= 0, index, -1))
    # Live slots by position, then the empty ones.
    order = jnp.argsort(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max), axis=-1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order if x.ndim == 4 else order[..., None], axis=3)
    length = jnp.max(jnp.sum(pos >= 0, axis=-1), axis=(0, 2)).astype(jnp.int32)  # [B]
    signals = tuple(sig.map_slotted(lambda x, fill: take(x)) for sig in big.signals)
    return dataclasses.replace(big, k=take(k), v=take(v), pos=take(pos), length=length, signals=signals), \
        take(origin)


def recall(cache: KVCache, cold: ColdChunk, capacity: int) -> tuple[KVCache, jax.Array]:
    """Hot ∪ cold (`merge`) at `capacity` slots, with room for the turn's last prompt tokens, and
    each slot's index in `cold` (-1: not from the cold tier) [layers, batch, kv, capacity]."""
    merged, origin = merge(cache, cold)
    extra = capacity - merged.capacity
    return merged.resized(capacity), jnp.pad(origin, [(0, 0)] * 3 + [(0, extra)], constant_values=-1)


def reselect(merged: KVCache, origin: jax.Array, policy, capacity: int, demoted: int,
             cold_slots: int) -> tuple[KVCache, ColdChunk, jax.Array]:
    """The policy's choice over a recalled cache (hot ∪ cold, and the turn's last prompt tokens
    prefilled against both; `origin` as `recall` gives it) -> (the hot cache at `capacity`, the hot
    slots it dropped, quantised [layers, batch, kv, `demoted`: at least the recalled cache's slots
    not from cold], which cold entries it brought back [layers, batch, kv, `cold_slots`: at least the
    uploaded bucket])."""
    from .policies import compress_split

    from_cold = origin >= 0
    out, dropped, kept = compress_split(merged, policy, evictable=~from_cold, n_evicted=demoted)
    n_layers, batch, n_kv, _ = merged.pos.shape
    index = [i[..., None] for i in jnp.ix_(jnp.arange(n_layers), jnp.arange(batch), jnp.arange(n_kv))]
    back = jnp.zeros((n_layers, batch, n_kv, cold_slots), bool).at[
        (*index, jnp.where(kept & from_cold, origin, cold_slots))].set(True, mode="drop")
    return out.resized(capacity), quantize_slots(dropped.k, dropped.v, dropped.pos, policy.cold_bits), back


# ---------------------------------------------------------------------------------- on the host
@dataclass
class ColdTier:
    """A session's cold tier (one row), in host memory: per layer and KV head, `n` entries.

    Heads may hold different numbers of entries (policies whose budget varies over heads); the
    arrays are as long as the longest, the rest position -1. int4 codes are packed two per byte."""

    bits: int
    head_dim: int
    k: np.ndarray  # [layers, kv, n, head_dim] int8 (int4: [..., head_dim / 2] uint8, packed)
    k_scale: np.ndarray  # [layers, kv, n, head_dim / group] float16
    v: np.ndarray
    v_scale: np.ndarray
    pos: np.ndarray  # [layers, kv, n] int32, -1 = none

    @staticmethod
    def empty(n_layers: int, n_kv: int, head_dim: int, bits: int) -> ColdTier:
        groups = head_dim // group_size(bits, head_dim)
        code_dim = head_dim if bits == 8 else head_dim // 2
        codes = lambda: np.zeros((n_layers, n_kv, 0, code_dim), np.int8 if bits == 8 else np.uint8)
        scales = lambda: np.zeros((n_layers, n_kv, 0, groups), np.float16)
        return ColdTier(bits, head_dim, codes(), scales(), codes(), scales(), np.zeros((n_layers, n_kv, 0), np.int32))

    @property
    def entries(self) -> int:
        """Cold tokens per layer and KV head, on average."""
        return int((self.pos >= 0).sum()) // max(1, self.pos.shape[0] * self.pos.shape[1])

    @property
    def length(self) -> int:
        return self.pos.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.k, self.k_scale, self.v, self.v_scale, self.pos))

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        return pack(codes, self.bits)

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        return unpack(packed, self.bits)

    def requantized(self, bits: int) -> ColdTier:
        """The same entries at `bits` (memory pressure demotes a tier to 4 bits; a new turn brings it
        back to its class's bits, the shapes its programs were compiled for)."""
        if bits == self.bits:
            return self
        out = [self.pos]
        for codes, scale in ((self.k, self.k_scale), (self.v, self.v_scale)):
            x = dequantize(self._unpack(codes), scale, np.float32, xp=np)
            c, s = quantize(x, bits, xp=np)
            out += [pack(c, bits), s]
        pos, k, ks, v, vs = out
        return ColdTier(bits, self.head_dim, k, ks, v, vs, pos)

    def reselected(self, back: np.ndarray, dropped: ColdChunk) -> ColdTier:
        """The tier after a re-selection: without the entries it brought back (`back` [layers, kv,
        >= length] marks them by their index here), with the hot slots it dropped (a one-row chunk),
        each head's entries packed to the front."""
        grown = self.extend([(dropped, 0)])
        back = np.pad(back[..., : self.length], [(0, 0), (0, 0), (0, grown.length - self.length)])
        return grown._where((grown.pos >= 0) & ~back)

    def _where(self, keep: np.ndarray) -> ColdTier:
        """Only the entries `keep` marks [layers, kv, length], each head's in their order."""
        n = int(keep.sum(axis=-1).max()) if keep.size else 0
        order = np.argsort(~keep, axis=-1, kind="stable")[..., :n]
        take = lambda a: np.take_along_axis(a, order if a.ndim == 3 else order[..., None], axis=2)
        pos = np.where(take(keep), take(self.pos), -1)
        return ColdTier(self.bits, self.head_dim, take(self.k), take(self.k_scale), take(self.v), take(self.v_scale),
                        pos)

    def extend(self, chunks: list[tuple[ColdChunk, int]]) -> ColdTier:
        """This tier plus the entries of `chunks`: (chunk, row) pairs, in eviction order (a chunk
        that several rows' compressions evicted together is copied to the host once), each head's
        entries packed to the front."""
        if not chunks:
            return self
        host: dict[int, list[np.ndarray]] = {}
        for c, _ in chunks:
            if id(c) not in host:
                host[id(c)] = [np.asarray(a) for a in (c.pos, c.k, c.k_scale, c.v, c.v_scale)]
        parts = [[a[:, row] for a in host[id(c)]] for c, row in chunks]
        keep = [(q, (q[0] >= 0).sum(axis=-1).max()) for q in parts]
        keep = [(q, int(n)) for q, n in keep if n > 0]
        if not keep:
            return self

        def compact(p: np.ndarray, arrays: list[np.ndarray], n: int) -> list[np.ndarray]:
            # Each head's entries first (a stable sort on emptiness keeps their order), cut to n.
            order = np.argsort(p < 0, axis=-1, kind="stable")[..., :n]
            return [np.take_along_axis(a, order if a.ndim == 3 else order[..., None], axis=2) for a in arrays]

        pieces = [compact(q[0], q, n) for q, n in keep]
        pos = np.concatenate([self.pos] + [q[0] for q in pieces], axis=2)
        k = np.concatenate([self.k] + [self._pack(q[1]) for q in pieces], axis=2)
        ks = np.concatenate([self.k_scale] + [q[2] for q in pieces], axis=2)
        v = np.concatenate([self.v] + [self._pack(q[3]) for q in pieces], axis=2)
        vs = np.concatenate([self.v_scale] + [q[4] for q in pieces], axis=2)
        out = ColdTier(self.bits, self.head_dim, k, ks, v, vs, pos)
        live = pos >= 0
        # Heads that evict unevenly (a policy whose budget varies over heads) leave holes: packed.
        return out if live.sum(axis=-1).max() == out.length else out._where(live)

    def upload(self, bucket: int) -> ColdChunk:
        """The tier as a one-row ColdChunk padded to `bucket` entries (the re-selection's input)."""
        n = self.length
        if n > bucket:
            raise ValueError(f"the cold tier holds {n} entries, more than the bucket of {bucket}")
        pad = lambda a, fill=0: np.pad(a, [(0, 0), (0, 0), (0, bucket - n)] + [(0, 0)] * (a.ndim - 3),
                                       constant_values=fill)[:, None]
        return ColdChunk(pad(self._unpack(self.k)), pad(self.k_scale), pad(self._unpack(self.v)), pad(self.v_scale),
                         pad(self.pos, -1))

    def before(self, position: int) -> ColdTier:
        """The tier without its entries at `position` and after (a session rewinding its last reply)."""
        return self._where((self.pos >= 0) & (self.pos < position))

    def drop_oldest(self, keep: int) -> tuple[ColdTier, int]:
        """At most `keep` entries per head: the latest positions (the tier's bound). Returns the tier
        and how many entries per head it dropped."""
        n = self.length
        if n <= keep:
            return self, 0
        order = np.argsort(np.where(self.pos >= 0, self.pos, -1), axis=-1, kind="stable")[..., n - keep:]
        take = lambda a: np.take_along_axis(a, order if a.ndim == 3 else order[..., None], axis=2)
        before = self.entries
        out = ColdTier(self.bits, self.head_dim, take(self.k), take(self.k_scale), take(self.v), take(self.v_scale),
                       take(self.pos))
        return out, before - out.entries
