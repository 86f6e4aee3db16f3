"""Generation: sampling, prefill, the decode step, and a batched decode loop.

The engine is pure jitted functions over pytrees (model, cache) plus a little host bookkeeping:

- `prefill_step(model, tokens, n_valid, cache)`: a padded chunk per sequence written into the
  cache; returns the last real token's logits (or all logits).
- `decode_steps(model, cache, ...)`: `n_steps` decode steps for every row of a batch inside one
  jitted call (a `lax.scan`): feed each row's pending token, sample the next one. Rows that are
  done (or padding) write nothing.
- `compress_row(cache, row, cfg)`: the row's policy evicts down to its budget.

Shapes that reach the compiler come from a few buckets (chunk lengths, capacities and batch sizes
are powers of two); positions, lengths and the number of decode steps are arrays, never Python
ints, so a new position or step count never recompiles.

`prefill` and `DecodeBatch` are the host-side drivers: prefill chunks a prompt into buckets and
compresses when a policy's budget is exceeded; `DecodeBatch` holds the sequences that decode
together, lets them join and leave between calls, grows capacity for full caches and compresses
rows when they reach `budget + slack`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .cache import (
    KVCache,
    add_batch_axis,
    capacity_bucket,
    concat,
    drop_batch_axis,
    stack,
    take_row,
    take_rows,
)
from .model import ToyLLM
from .policies import CacheConfig, compress
from .sampling import SamplerSpec, sample_token


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        return self

    @property
    def spec(self) -> SamplerSpec:
        return SamplerSpec.for_rows([(self.temperature, self.top_k, self.top_p)])


# ------------------------------------------------------------------------------------ jitted steps
@partial(jax.jit, static_argnames=("all_logits",), donate_argnames=("cache",))
def prefill_step(model: ToyLLM, tokens, n_valid, cache: KVCache, all_logits: bool = False):
    """tokens [B, C] (first n_valid [B] real) -> (logits [B, vocab] or [B, C, vocab], cache)."""

    def one(tokens, n_valid, cache):
        h, cache = model.extend(tokens, n_valid, cache)
        if all_logits:
            return model.logits(h), cache
        return model.logits(h[jnp.maximum(n_valid - 1, 0)]), cache

    return jax.vmap(one)(tokens, n_valid, cache)


def decode_rows(model: ToyLLM, tokens, active, cache: KVCache):
    """One decode step for every row (traced inside the jitted steps): feed tokens [B]; rows whose
    `active` [B] is False write nothing. Returns (logits [B, vocab], cache)."""

    def one(token, row_active, row_cache):
        h, row_cache = model.extend(token[None], row_active.astype(jnp.int32), row_cache)
        return h[0], row_cache

    h, cache = jax.vmap(one)(tokens, active, cache)
    return model.logits(h), cache


@partial(jax.jit, static_argnames=("max_steps", "spec"), donate_argnames=("cache",))
def decode_steps(model: ToyLLM, cache: KVCache, n_steps, tokens, remaining, keys, temperature, top_k, top_p, eos,
                 *, max_steps: int, spec: SamplerSpec):
    """Run n_steps (<= max_steps, an array: any count, one compile) decode steps for every row.

    tokens [B]: each row's pending token (sampled, not yet in the cache); remaining [B]: tokens the
    row may still produce (0 = inactive: writes nothing); keys [B, 2]: per-row PRNG keys, so a row's
    samples do not depend on its batch-mates; eos [B]: token that ends the row (-1 = none).
    Returns (cache, new tokens [B, max_steps], logprobs, emitted [B, max_steps], remaining, keys);
    columns past n_steps are not emitted.
    """
    batch = tokens.shape[0]

    def step(i, carry):
        cache, tokens, remaining, keys, out, logprobs, emitted = carry
        active = remaining > 0
        logits, cache = decode_rows(model, tokens, active, cache)
        split = jax.vmap(jax.random.split)(keys)  # [B, 2, 2]
        keys, subkeys = split[:, 0], split[:, 1]
        new, logprob = jax.vmap(partial(sample_token, spec=spec))(logits, subkeys, temperature, top_k, top_p)
        new = jnp.where(active, new, tokens)
        remaining = jnp.where(active & (new != eos), remaining - 1, 0)
        return (cache, new, remaining, keys, out.at[i].set(new), logprobs.at[i].set(logprob),
                emitted.at[i].set(active))

    init = (cache, tokens, remaining, keys, jnp.zeros((max_steps, batch), jnp.int32),
            jnp.zeros((max_steps, batch), jnp.float32), jnp.zeros((max_steps, batch), bool))
    cache, _, remaining, keys, out, logprobs, emitted = jax.lax.fori_loop(0, n_steps, step, init)
    return cache, out.T, logprobs.T, emitted.T, remaining, keys


def decode_teacher_forced(model: ToyLLM, cache: KVCache, tokens) -> tuple[jax.Array, KVCache]:
    """Feed tokens [B, T] one decode step at a time (the decode path, no sampling) -> logits [B, T, vocab].

    No compression happens in here: the batched cache must have room for T more tokens.
    """
    if int(np.max(cache.length)) + tokens.shape[1] > cache.capacity:
        raise ValueError(f"cache capacity {cache.capacity} has no room for {tokens.shape[1]} more tokens")
    return _decode_teacher_forced(model, cache, tokens)


@partial(jax.jit, donate_argnames=("cache",))
def _decode_teacher_forced(model: ToyLLM, cache: KVCache, tokens):
    def step(cache, token):
        logits, cache = decode_rows(model, token, jnp.ones(token.shape, bool), cache)
        return cache, logits

    cache, logits = jax.lax.scan(step, cache, tokens.T)
    return logits.transpose(1, 0, 2), cache


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def compress_row(cache: KVCache, row, cfg: CacheConfig) -> KVCache:
    """Compress one row of a batched cache to its policy's budget."""
    one = jax.tree.map(lambda x: x[row], cache)
    one = compress(one, cfg)
    return jax.tree.map(lambda x, y: x.at[row].set(y), cache, one)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def compress_one(cache: KVCache, cfg: CacheConfig) -> KVCache:
    return compress(cache, cfg)


# -------------------------------------------------------------------------------------- prefill
def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Smallest padded prefill chunk: fewer shapes to compile, at the cost of some padding work.
MIN_CHUNK = 16


@dataclass
class PrefillResult:
    logits: jax.Array  # [vocab] after the last prompt token
    cache: KVCache  # one sequence, unbatched
    length: int  # live slots after prefill (and compression)
    evicted: int = 0  # tokens evicted per layer and KV head by compressions during this prefill
    compressions: int = 0


@dataclass(frozen=True)
class PrefillChunk:
    real: int  # prompt tokens in this chunk
    padded: int  # its compiled length
    capacity: int  # the cache capacity it runs against (the cache grows to it first when smaller)
    compress: bool  # compress to the budget after it


def plan_prefill(n_tokens: int, length: int, capacity: int | None, cache_cfg: CacheConfig,
                 max_chunk: int = 512) -> tuple[list[PrefillChunk], int]:
    """The chunks `prefill` runs for n_tokens on a cache of `length` live slots and `capacity`
    (None = a new cache), and the capacity it returns. Pure host arithmetic: the server's warm-up
    enumerates every shape prefill can compile with it."""
    if capacity is None:
        # A full cache is sized for the whole prompt at once; a compressing one for one chunk on
        # top of what it keeps.
        capacity = capacity_bucket(length + (min(n_tokens, max_chunk) if cache_cfg.evicts else n_tokens))
    chunks, done = [], 0
    while done < n_tokens:
        real = min(n_tokens - done, max_chunk)
        if length + real > capacity:
            capacity = capacity_bucket(length + real)
        padded = max(_pow2_ceil(real), MIN_CHUNK)
        if length + padded > capacity:  # padding would overflow: take an exact piece
            real = padded = _pow2_floor(real)
        length += real
        done += real
        compress = cache_cfg.evicts and length > cache_cfg.budget
        if compress:
            length = cache_cfg.budget
        chunks.append(PrefillChunk(real, padded, capacity, compress))
    if any(c.compress for c in chunks) and capacity > capacity_bucket(cache_cfg.trigger):
        # Give back what the prompt needed: decoding needs budget + slack slots at most.
        capacity = capacity_bucket(cache_cfg.trigger)
    return chunks, capacity


def prefill(model: ToyLLM, tokens: Sequence[int], cache: KVCache | None, cache_cfg: CacheConfig,
            length: int = 0, max_chunk: int = 512) -> PrefillResult:
    """Append a prompt to one sequence's cache (None = a new sequence) and compress if it overflows.

    `length` is the cache's live-slot count (the host mirror, so that no device sync is needed).
    A compressing policy compresses after each chunk that leaves more than `budget` slots, so a
    prompt of any length prefills in bounded memory; one that fits in one chunk compresses once,
    after the whole prompt, as in SnapKV.
    """
    if len(tokens) == 0:
        raise ValueError("prefill needs at least one token")
    chunks, final_capacity = plan_prefill(len(tokens), length, None if cache is None else cache.capacity,
                                          cache_cfg, max_chunk)
    if cache is None:
        cache = KVCache.empty(model.cfg, chunks[0].capacity)
    tokens = np.asarray(tokens, np.int32)
    result = PrefillResult(logits=None, cache=cache, length=length)  # type: ignore[arg-type]
    done = 0
    for piece in chunks:
        chunk = np.zeros(piece.padded, np.int32)
        chunk[: piece.real] = tokens[done : done + piece.real]
        result.logits, cache = _prefill_chunk(model, cache.resize(piece.capacity), chunk, piece.real)
        result.length += piece.real
        done += piece.real
        if piece.compress:
            cache = compress_one(cache, cache_cfg)
            result.evicted += result.length - cache_cfg.budget
            result.compressions += 1
            result.length = cache_cfg.budget
    result.cache = cache.resize(final_capacity)
    return result


def _prefill_chunk(model: ToyLLM, cache: KVCache, chunk: np.ndarray, real: int) -> tuple[jax.Array, KVCache]:
    """One padded chunk [C] (the first `real` tokens real) into an unbatched cache -> (logits, cache)."""
    logits, batched = prefill_step(model, chunk[None], np.array([real], np.int32), add_batch_axis(cache))
    return logits[0], drop_batch_axis(batched)


def idle_capacities(length: int, cache_cfg: CacheConfig) -> list[int]:
    """Capacities a compressing policy's idle cache of `length` slots can have between requests:
    from what its length needs up to the bucket decoding grows it to."""
    caps, cap = [], capacity_bucket(length + 1)
    while cap <= capacity_bucket(cache_cfg.trigger):
        caps.append(cap)
        cap *= 2
    return caps


def prefill_shapes(cache_cfg: CacheConfig, max_prompt: int, max_chunk: int = 512) -> set[tuple]:
    """Every shape-determining operation prefill (and a decode batch's join and leave) can run for
    sessions under one compressing cache configuration and prompts of up to max_prompt tokens:
    ("new", capacity), ("resize", from, to), ("chunk", padded, capacity), ("compress", capacity)."""
    if not cache_cfg.evicts:
        raise ValueError("only a compressing policy's prefill shapes are bounded")
    decode_capacity = capacity_bucket(cache_cfg.trigger)
    # Past two chunks every state repeats: after a full chunk and its compression the cache is at
    # the budget again. (+1: a continued session feeds its pending token first.)
    longest = min(max_prompt + 1, 2 * max_chunk + cache_cfg.trigger + 1)
    ops: set[tuple] = set()
    for length in range(cache_cfg.trigger + 1):
        for start in [None] if length == 0 else idle_capacities(length, cache_cfg):
            for n in range(1, longest + 1):
                chunks, final = plan_prefill(n, length, start, cache_cfg, max_chunk)
                cap = start
                if cap is None:
                    ops.add(("new", chunks[0].capacity))
                    cap = chunks[0].capacity
                for piece in chunks:
                    if piece.capacity != cap:
                        ops.add(("resize", cap, piece.capacity))
                        cap = piece.capacity
                    ops.add(("chunk", piece.padded, cap))
                    if piece.compress:
                        ops.add(("compress", cap))
                if final != cap:
                    ops.add(("resize", cap, final))
    for length in range(cache_cfg.trigger + 1):  # joining a decode batch, and leaving it trimmed
        for cap in idle_capacities(length, cache_cfg):
            if cap != decode_capacity:
                ops.update({("resize", cap, decode_capacity), ("resize", decode_capacity, cap)})
    return ops


def warm_prefill(model: ToyLLM, cache_cfg: CacheConfig, max_prompt: int, max_chunk: int = 512) -> int:
    """Compile every prefill_shapes() operation on empty caches; returns how many there were."""
    ops = sorted(prefill_shapes(cache_cfg, max_prompt, max_chunk))
    for op in ops:
        kind, a = op[0], op[1]
        if kind == "new":
            out = KVCache.empty(model.cfg, a)
        elif kind == "resize":
            out = KVCache.empty(model.cfg, a).resize(op[2])
        elif kind == "chunk":
            out = _prefill_chunk(model, KVCache.empty(model.cfg, op[2]), np.zeros(a, np.int32), a)
        else:
            out = compress_one(KVCache.empty(model.cfg, a), cache_cfg)
        jax.block_until_ready(out)
    return len(ops)


# --------------------------------------------------------------------------------- decode batch
@dataclass(eq=False)
class Row:
    """One sequence in a DecodeBatch (host mirror of its device state)."""

    cache_cfg: CacheConfig
    sampling: SamplingParams
    length: int  # live cache slots
    pending: int  # sampled token not yet in the cache
    remaining: int  # tokens it may still produce
    key: np.ndarray  # [2] uint32 PRNG key
    eos: int = -1
    slot: int = -1  # index in the batch
    single_step: bool = False  # host must see every token before the next (stop strings)
    tokens_evicted: int = 0
    compressions: int = 0
    user: object = None  # whatever the caller attaches (a request)

    @property
    def active(self) -> bool:
        return self.remaining > 0


@dataclass
class StepOutput:
    row: Row
    tokens: list[int]
    logprobs: list[float]


@dataclass
class DecodeBatch:
    """Sequences decoded together in one batched cache; they join and leave between calls.

    The batch size is padded to a power of two with inactive rows, so a new batch-mate does not
    recompile. Rows under `full` grow the shared capacity bucket when they fill it; compressing
    rows are compressed to their budget when they reach budget + slack.
    """

    model: ToyLLM
    steps_per_call: int = 8
    rows: list[Row | None] = field(default_factory=list)
    cache: KVCache | None = None
    compressions: int = 0
    # Called as on_compress(row, seconds) after each decode-time compression; setting it makes the
    # batch wait for each compression to finish so that it can be timed.
    on_compress: Callable[[Row, float], None] | None = None

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def active_rows(self) -> list[Row]:
        return [r for r in self.rows if r is not None and r.active]

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else self.cache.capacity

    def add(self, cache: KVCache, row: Row) -> Row:
        """Insert a prefilled sequence (its unbatched cache and host state)."""
        # A compressing row grows to its trigger's bucket before its first compression anyway; giving
        # it that capacity now keeps the batch's capacity independent of when rows joined, so a batch
        # of such rows has one capacity and the shapes it compiles depend on the batch size alone.
        floor = capacity_bucket(row.cache_cfg.trigger) if row.cache_cfg.evicts else 0
        if cache.capacity < floor:
            cache = cache.resize(floor)
        if self.cache is None:
            self.cache = stack([cache])
            self.rows = [None]
        if cache.capacity < self.cache.capacity:
            cache = cache.resize(self.cache.capacity)
        elif cache.capacity > self.cache.capacity:
            self.cache = self.cache.resize(cache.capacity)
        free = [i for i, r in enumerate(self.rows) if r is None]
        if not free:
            self._grow_batch(2 * self.size)
            free = [i for i, r in enumerate(self.rows) if r is None]
        row.slot = free[0]
        self.rows[row.slot] = row
        self.cache = _set_row(self.cache, row.slot, cache)
        return row

    def remove(self, row: Row) -> KVCache:
        """Take a row out; returns its cache (unbatched), trimmed to the bucket its length needs."""
        cache = take_row(self.cache, np.int32(row.slot))
        self.rows[row.slot] = None
        floor = capacity_bucket(row.length + 1)
        if cache.capacity > floor:
            cache = cache.resize(floor)
        if all(r is None for r in self.rows):
            self.rows, self.cache = [], None
        elif sum(r is not None for r in self.rows) <= self.size // 4:
            self._compact()
        row.slot = -1
        return cache

    def _grow_batch(self, size: int) -> None:
        extra = size - self.size
        empty = KVCache.empty(self.model.cfg, self.cache.capacity, batch=extra)
        self.cache = concat(self.cache, empty)
        self.rows += [None] * extra

    def _compact(self) -> None:
        live = [r for r in self.rows if r is not None]
        # Always a quarter of the size (not the smallest power of two that fits), so that the
        # compaction compiles one shape per batch size.
        size = max(self.size // 4, 1)
        index = np.array([r.slot for r in live] + [live[0].slot] * (size - len(live)))
        self.cache = take_rows(self.cache, index)
        self.rows = live + [None] * (size - len(live))
        for i, r in enumerate(live):
            r.slot = i

    def _steps_now(self, active: list[Row]) -> int:
        """Steps every active row can take before one needs compression or more capacity."""
        if any(r.single_step for r in active):
            return 1
        limit = min(self.steps_per_call, max(r.remaining for r in active))
        for r in active:
            room = self.capacity - r.length
            if r.cache_cfg.evicts:
                room = min(room, r.cache_cfg.trigger - r.length)
            limit = min(limit, room)
        return max(limit, 1)

    def step(self) -> list[StepOutput]:
        """One jitted call of up to steps_per_call decode steps for all active rows."""
        active = self.active_rows
        if not active:
            return []
        need = max(r.length for r in active) + 1
        if need > self.capacity:
            self.cache = self.cache.resize(capacity_bucket(need))
        n_steps = self._steps_now(active)
        spec = SamplerSpec.for_rows(
            [(r.sampling.temperature, r.sampling.top_k, r.sampling.top_p) for r in active]
        )

        def column(get, dtype):
            return np.array([get(r) if r is not None else 0 for r in self.rows], dtype)

        keys = np.stack([r.key if r is not None else np.zeros(2, np.uint32) for r in self.rows])
        self.cache, out, logprobs, emitted, remaining, keys = decode_steps(
            self.model,
            self.cache,
            np.int32(n_steps),
            column(lambda r: r.pending, np.int32),
            column(lambda r: r.remaining, np.int32),
            keys,
            column(lambda r: r.sampling.temperature, np.float32),
            column(lambda r: r.sampling.top_k, np.int32),
            column(lambda r: r.sampling.top_p, np.float32),
            column(lambda r: r.eos, np.int32),
            max_steps=self.steps_per_call,
            spec=spec,
        )
        out, logprobs, emitted = np.asarray(out), np.asarray(logprobs), np.asarray(emitted)
        remaining, keys = np.asarray(remaining), np.asarray(keys)

        outputs = []
        for r in active:
            i = r.slot
            n = int(emitted[i].sum())
            r.length += n
            r.pending = int(out[i, n - 1])
            r.remaining = int(remaining[i])
            r.key = keys[i]
            outputs.append(StepOutput(r, out[i, :n].tolist(), logprobs[i, :n].tolist()))
            if r.cache_cfg.evicts and r.length >= r.cache_cfg.trigger:
                started = time.perf_counter()
                self.cache = compress_row(self.cache, np.int32(i), r.cache_cfg)
                if self.on_compress is not None:
                    self.cache.length.block_until_ready()
                    self.on_compress(r, time.perf_counter() - started)
                r.tokens_evicted += r.length - r.cache_cfg.budget
                r.compressions += 1
                self.compressions += 1
                r.length = r.cache_cfg.budget
        return outputs


@partial(jax.jit, donate_argnames=("batch",))
def _set_row(batch: KVCache, slot, row: KVCache) -> KVCache:
    return jax.tree.map(lambda x, y: x.at[slot].set(y), batch, row)


def new_key(seed: int | None) -> np.ndarray:
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    return np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)), np.uint32)


def first_token(logits: jax.Array, sampling: SamplingParams, key: np.ndarray) -> tuple[int, float, np.ndarray]:
    """Sample the first new token from the prefill's logits (same sampler as decoding)."""
    token, logprob, key = _first_token(logits, key, np.float32(sampling.temperature), np.int32(sampling.top_k),
                                       np.float32(sampling.top_p), spec=sampling.spec)
    return int(token), float(logprob), np.asarray(key)


@partial(jax.jit, static_argnames=("spec",))
def _first_token(logits, key, temperature, top_k, top_p, *, spec):
    key, sub = jax.random.split(key)
    token, logprob = sample_token(logits, sub, temperature, top_k, top_p, spec=spec)
    return token, logprob, key


# ------------------------------------------------------------------------------- convenience loop
@dataclass
class Generated:
    token: int
    logprob: float
    row: Row


def generate_tokens(model: ToyLLM, prompts: Sequence[Sequence[int]], cache_cfgs: Sequence[CacheConfig],
                    sampling: Sequence[SamplingParams], steps_per_call: int = 8,
                    max_chunk: int = 512) -> Iterator[Generated]:
    """Decode several prompts together (each with its own policy and sampling) and yield tokens as
    they are made. Stop strings are the caller's business (see `detokenize.TextStream`); a caller
    that stops a row early sets `row.remaining = 0`."""
    batch = DecodeBatch(model, steps_per_call=steps_per_call)
    for prompt, cache_cfg, params in zip(prompts, cache_cfgs, sampling, strict=True):
        cache_cfg.validate()
        params.validate()
        if not cache_cfg.evicts and len(prompt) + params.max_new_tokens > model.cfg.context_length:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model context ({model.cfg.context_length}) under the full cache; use a compressing policy"
            )
        result = prefill(model, prompt, None, cache_cfg, max_chunk=max_chunk)
        key = new_key(params.seed)
        token, logprob, key = first_token(result.logits, params, key)
        eos = -1 if params.ignore_eos else model.cfg.eos_token_id
        remaining = 0 if (token == eos or params.max_new_tokens == 1) else params.max_new_tokens - 1
        row = Row(cache_cfg, params, result.length, token, remaining, key, eos=eos,
                  single_step=bool(params.stop), tokens_evicted=result.evicted,
                  compressions=result.compressions)
        batch.add(result.cache, row)
        yield Generated(token, logprob, row)
    while batch.active_rows:
        for out in batch.step():
            for token, logprob in zip(out.tokens, out.logprobs, strict=True):
                yield Generated(token, logprob, out.row)

