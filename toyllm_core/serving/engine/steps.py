"""The engine's jitted steps: pure functions over (model, cache) pytrees.

Each compiles once per cache class (and chunk length, or decode batch size); positions, lengths,
slots and step counts are arrays, never Python ints, so they never recompile. Caches that a step
returns updated are donated to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .. import tiers
from ..cache import KVCache, empty_cache
from ..executables import program
from ..model import ToyLLM
from ..policies import compress, compress_split
from ..sampling import TOP_LOGPROBS, sample_rows, top_alternatives
from ..tiers import ColdChunk, quantize_slots
from .classes import RECALL_TAIL, SHORT_PROMPT, CacheClass


def new_cache(model: ToyLLM, cls: CacheClass, batch: int, capacity: int) -> KVCache:
    """An empty cache for rows of this class (with the signals its policy declares)."""
    return empty_cache(model.cfg, batch, capacity, model.dtype, cls.policy.signals)


def new_batch_cache(model: ToyLLM, rows: int, wants: tuple) -> KVCache:
    """An empty short-prompt batch cache (`classes.SHORT_PROMPT` slots per row)."""
    return empty_cache(model.cfg, rows, SHORT_PROMPT, model.dtype, wants)


@program(static_argnames=("capacity",))
def resize(cache: KVCache, *, capacity: int) -> KVCache:
    """The same rows at another capacity (a new buffer: the shapes differ, so nothing to donate)."""
    return cache.resized(capacity)


@program(static_argnames=("span",), donate_argnames=("cache",))
def prefill_chunk(model: ToyLLM, cache: KVCache, tokens, n_valid, *, span: int | None = None):
    """tokens [1, C] (the first n_valid [1] real) into a one-row cache -> (logits [vocab] after the
    last real token, cache). `span`: the chunk attends over the cache's first `span` slots only
    (they must hold its filled slots and the chunk) [default: all of them]."""
    part = cache.window(1, span or cache.capacity)
    h, part = model.forward(tokens, part, n_valid)
    last = h[0, jnp.maximum(n_valid[0] - 1, 0)]
    return model.logits(last[None])[0], cache.with_window(part)


@program(static_argnames=("span",), donate_argnames=("cache",))
def prefill_batch(model: ToyLLM, cache: KVCache, tokens, n_valid, *, span: int):
    """Several short prompts together: tokens [k, T] (row i's first n_valid[i] real) into a batch
    cache of k empty rows, attending over its first `span` slots -> (logits [k, vocab] after each
    row's last real token, cache)."""
    part = cache.window(cache.batch, span)
    h, part = model.forward(tokens, part, n_valid)
    last = jnp.take_along_axis(h, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache.with_window(part)


@program
def batch_take(batch: KVCache, i) -> KVCache:
    """Row i of a batch prefill cache, as a one-row cache (a copy; every class's signals)."""
    return batch.rows(i)


def _class_row(row: KVCache, cls: CacheClass, grow: bool = True) -> KVCache:
    """A one-row batch prefill cache as a row of class `cls`: its signals, and its capacity (or, if
    not `grow`, at most its capacity)."""
    row = row.with_signals(cls.policy.signals)
    return row.resized(cls.capacity if grow else min(cls.capacity, row.capacity))


@program(static_argnames=("cls",), donate_argnames=("state",))
def insert_batch_row(state: KVCache, slot, row: KVCache, *, cls: CacheClass) -> KVCache:
    """A row taken from a batch prefill cache (`batch_take`) into decode slot `slot` (its keys and
    values written over the batch cache's slots only: `KVCache.set_row_prefix`)."""
    return state.set_row_prefix(slot, _class_row(row, cls, grow=False))


@program(static_argnames=("cls",))
def batch_row(row: KVCache, *, cls: CacheClass) -> KVCache:
    """A row taken from a batch prefill cache as an idle one-row cache of class `cls` (a sequence
    that ended at its first token)."""
    return _class_row(row, cls)


def _compress(cache: KVCache, cls: CacheClass) -> tuple[KVCache, ColdChunk | None]:
    """Compress under the class's policy; a tiered class also returns what it evicted, quantised."""
    if not cls.tiered:
        return compress(cache, cls.policy), None
    out, evicted, _ = compress_split(cache, cls.policy)
    return out, quantize_slots(evicted.k, evicted.v, evicted.pos, cls.policy.cold_bits)


@program(static_argnames=("cls",), donate_argnames=("cache",))
def compress_cache(cache: KVCache, *, cls: CacheClass) -> tuple[KVCache, ColdChunk | None]:
    """A prefill cache compressed -> (cache, the evicted slots for the cold tier, or None)."""
    return _compress(cache, cls)


@program(donate_argnames=("cache",))
def truncate(cache: KVCache, position) -> KVCache:
    """A prefill cache without the slots at `position` and after (a session rewinding its last reply)."""
    return cache.truncated(position)


@program(static_argnames=("cls",))
def recall(cache: KVCache, cold: ColdChunk, *, cls: CacheClass) -> tuple[KVCache, jax.Array]:
    """A prefill cache and its cold tier (padded to a bucket) as one cache at the class's recall
    capacity -> (cache, each slot's index in the cold tier or -1). (Not donated: the shapes differ.)"""
    return tiers.recall(cache, cold, cls.recall_capacity)


@program(static_argnames=("cls",))
def reselect(cache: KVCache, origin, *, cls: CacheClass):
    """A recalled cache's hot set chosen by the class's policy -> (cache at the prefill capacity,
    the hot slots it dropped, quantised, which cold entries it brought back [layers, 1, kv, the
    largest cold bucket]). The dropped ones can only be the prefill cache's and the tail's slots."""
    return tiers.reselect(cache, origin, cls.policy, cls.prefill_capacity, cls.prefill_capacity + RECALL_TAIL,
                          cls.cold_buckets[-1])


@program(donate_argnames=("cache",))
def clear_signals(cache: KVCache) -> KVCache:
    """The cache with its signals as if nothing had been observed (before a reconstruction pass)."""
    return cache.cleared_signals()


@program(static_argnames=("cls", "span"), donate_argnames=("state",))
def insert_row(state: KVCache, slot, row: KVCache, *, cls: CacheClass, span: int) -> KVCache:
    """A one-row cache (at its prefill capacity) into decode slot `slot`: its first `span` slots
    (a compiled span that holds its live ones; see `KVCache.set_row_prefix`)."""
    return state.set_row_prefix(slot, row.prefix(1, span))


@program
def extract_row(state: KVCache, slot) -> KVCache:
    """Decode slot `slot` as a one-row cache (a copy)."""
    return state.rows(slot)


@program(static_argnames=("span",), donate_argnames=("state",))
def move_row(state: KVCache, src, dst, *, span: int) -> KVCache:
    """Copy slot src into slot dst (keeps the occupied rows packed at the front): the first `span`
    slots of src, a compiled span that holds its live ones."""
    return state.set_row_prefix(dst, state.rows(src).prefix(1, span))


@program(static_argnames=("cls",), donate_argnames=("state",))
def compress_rows(state: KVCache, slots, *, cls: CacheClass) -> tuple[KVCache, ColdChunk | None, jax.Array]:
    """Compress the decode rows at slots [k] in one call (a padded list repeats a slot: the same row
    compressed twice gives the same result) -> (state, their evicted slots [.., k, ..] for the cold
    tier, or None, and their new lengths [k]: an output of its own, that a timer may wait for while
    the state is donated to the next call)."""
    rows, evicted = _compress(state.take_rows(slots), cls)
    return state.put_rows(slots, rows), evicted, rows.length + 0


def decode_rows(model: ToyLLM, tokens, active, cache: KVCache):
    """One decode step for every row (traced inside the jitted steps): feed tokens [B]; rows whose
    `active` [B] is False write nothing. Returns (logits [B, vocab], cache)."""
    h, cache = model.forward(tokens[:, None], cache, active.astype(jnp.int32))
    return model.logits(h[:, 0]), cache


# A decode call takes one host array and gives back one (each host-device copy has a fixed cost):
# per row, its inputs as int32 columns (floats and the uint32 key by their bits), and its outputs as
# [tokens | logprobs | emitted] x max_steps, then remaining and the key.
DECODE_INPUTS = ("token", "remaining", "key0", "key1", "temperature", "top_k", "top_p", "eos", "top_n")


def decode_inputs(token, remaining, keys, temperature, top_k, top_p, eos, top_n) -> np.ndarray:
    """The rows' inputs [n] (keys [n, 2]) as one int32 array [n, len(DECODE_INPUTS)] (host side)."""
    bits = lambda x, dtype: np.asarray(x, dtype).view(np.int32)
    cols = [np.asarray(token, np.int32), np.asarray(remaining, np.int32), bits(keys, np.uint32)[:, 0],
            bits(keys, np.uint32)[:, 1], bits(temperature, np.float32), np.asarray(top_k, np.int32),
            bits(top_p, np.float32), np.asarray(eos, np.int32), np.asarray(top_n, np.int32)]
    return np.stack(cols, axis=1)


@dataclass
class DecodeOutputs:
    tokens: np.ndarray  # [n, max_steps] int32
    logprobs: np.ndarray  # [n, max_steps] float32
    emitted: np.ndarray  # [n, max_steps] bool
    remaining: np.ndarray  # [n] int32
    keys: np.ndarray  # [n, 2] uint32

    @staticmethod
    def read(bundle, max_steps: int) -> DecodeOutputs:
        """Copy a decode call's output bundle to the host and split it."""
        b, s = np.asarray(bundle), max_steps
        return DecodeOutputs(b[:, :s], b[:, s:2 * s].view(np.float32), b[:, 2 * s:3 * s].astype(bool), b[:, 3 * s],
                             np.ascontiguousarray(b[:, 3 * s + 1:3 * s + 3]).view(np.uint32))


@program(static_argnames=("n_rows", "max_steps", "span"), donate_argnames=("state",))
def decode_steps(model: ToyLLM, state: KVCache, n_steps, inputs, *, n_rows: int, max_steps: int,
                 span: int | None = None):
    """Run n_steps (<= max_steps, an array: any count, one compile) decode steps for rows [0, n_rows)
    of the decode state, attending over their first `span` slots (which must hold every active row's
    filled slots and the n_steps it adds) [default: all of them].

    inputs [n, len(DECODE_INPUTS)] (`decode_inputs`), per row: its pending token (sampled, not yet in
    the cache); the tokens it may still produce (0 = inactive: writes nothing); its PRNG key, so a
    row's samples do not depend on its batch-mates; its sampling settings; the token that ends it
    (-1 = none); and the alternatives it wants per token (computed for the whole call only when some
    active row does). Returns (state, the output bundle (`DecodeOutputs.read`), top ids [n, max_steps,
    TOP_LOGPROBS], their logprobs); columns past n_steps are not emitted.
    """
    as_f32 = lambda x: jax.lax.bitcast_convert_type(x, jnp.float32)
    tokens, remaining, eos, top_k, top_n = (inputs[:, DECODE_INPUTS.index(f)] for f in
                                            ("token", "remaining", "eos", "top_k", "top_n"))
    keys = jax.lax.bitcast_convert_type(inputs[:, 2:4], jnp.uint32)
    temperature, top_p = as_f32(inputs[:, 4]), as_f32(inputs[:, 6])
    sub = state.window(n_rows, span or state.capacity)
    k = min(TOP_LOGPROBS, model.cfg.vocab_size)

    def step(i, carry):
        cache, tokens, remaining, keys, out, logprobs, emitted, top_ids, top_lps = carry
        active = remaining > 0
        logits, cache = decode_rows(model, tokens, active, cache)
        split = jax.vmap(jax.random.split)(keys)  # [n, 2, 2]
        keys, subkeys = split[:, 0], split[:, 1]
        new, logprob = sample_rows(logits, subkeys, temperature, top_k, top_p)
        ids, lps = top_alternatives(logits, jnp.any(active & (top_n > 0)))
        new = jnp.where(active, new, tokens)
        remaining = jnp.where(active & (new != eos), remaining - 1, 0)
        return (cache, new, remaining, keys, out.at[i].set(new), logprobs.at[i].set(logprob),
                emitted.at[i].set(active), top_ids.at[i].set(ids), top_lps.at[i].set(lps))

    init = (sub, tokens, remaining, keys, jnp.zeros((max_steps, n_rows), jnp.int32),
            jnp.zeros((max_steps, n_rows), jnp.float32), jnp.zeros((max_steps, n_rows), bool),
            jnp.zeros((max_steps, n_rows, k), jnp.int32), jnp.zeros((max_steps, n_rows, k), jnp.float32))
    sub, _, remaining, keys, out, logprobs, emitted, top_ids, top_lps = jax.lax.fori_loop(0, n_steps, step, init)
    state = state.with_window(sub)
    as_i32 = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
    bundle = jnp.concatenate([out.T, as_i32(logprobs.T), emitted.T.astype(jnp.int32), remaining[:, None],
                              as_i32(keys)], axis=1)
    return state, bundle, top_ids.transpose(1, 0, 2), top_lps.transpose(1, 0, 2)


@program(donate_argnames=("cache",))
def teacher_forced(model: ToyLLM, cache: KVCache, tokens):
    """Feed tokens [B, T] one decode step at a time (the decode path, no sampling) -> (logits
    [B, T, vocab], cache). The cache must have room for T more tokens; nothing is compressed."""

    def step(cache, token):
        logits, cache = decode_rows(model, token, jnp.ones(token.shape, bool), cache)
        return cache, logits

    cache, logits = jax.lax.scan(step, cache, tokens.T)
    return logits.transpose(1, 0, 2), cache


@program(static_argnames=("n_rows",), donate_argnames=("state",))
def forced_steps(model: ToyLLM, state: KVCache, tokens, targets, *, n_rows: int):
    """Teacher forcing through rows [0, n_rows) of a decode state: feed tokens [n, k] one decode
    step at a time and score targets [n, k] -> (state, NLL [n, k], argmax-correct [n, k])."""
    sub = state.rows(0, n_rows)

    def step(cache, xy):
        x, y = xy
        logits, cache = decode_rows(model, x, jnp.ones(x.shape, bool), cache)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return cache, (nll, jnp.argmax(logits, axis=-1) == y)

    sub, (nll, correct) = jax.lax.scan(step, sub, (tokens.T, targets.T))
    state = state.set_rows(0, sub)
    return state, nll.T, correct.T
