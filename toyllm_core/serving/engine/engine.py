"""The engine: fixed decode slots per cache class, and the one recipe that starts a sequence.

Shaped like JetStream's engine API, over pure jitted steps (`steps`):

    job = engine.begin(prompt_ids, cls, sampling, cache, length)   # reserve a slot
    while not engine.prefill(job, limit):                          # one chunk per call
        ...                                                        # (decode other rows in between)
    seq = engine.start(job)       # first token sampled; the row joins a decode slot if it goes on
    outputs = engine.step()       # one decode call per class with active rows: tokens for every slot
    cache, length = engine.free(seq)                               # the row's cache, for its session

Each class's decode state is one cache of `slots` rows x `capacity` slots, allocated when the class
first takes a row, and kept. Occupied rows stay packed at the front (a freed row's slot takes the last occupied row), so a decode
call runs the smallest compiled batch size that covers them. Compressing rows are compressed in
place when they reach budget + slack. The engine knows nothing of HTTP or threads: the server's
engine thread, `toyllm generate`, the benchmarks and the evaluation all drive this object.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import jax
import numpy as np

from .. import backend
from ..backend import release_zero_pages
from ..cache import KVCache
from ..model import ToyLLM
from ..sampling import SamplingParams, first_token, new_key
from ..tiers import ColdChunk, ColdTier, cold_bucket
from . import steps
from .classes import (
    MAX_BATCH_ROWS,
    MIN_CHUNK,
    RECALL_TAIL,
    SHORT_PROMPT,
    CacheClass,
    batch_chunks,
    batch_signals,
    batch_sizes,
    next_piece,
    row_bucket,
    span_for,
)


@dataclass(eq=False)
class Prefill:
    """A prompt being prefilled (one piece per `Engine.prefill` call)."""

    cls: CacheClass
    tokens: np.ndarray  # [n] int32, the whole prompt
    sampling: SamplingParams
    cache: KVCache | None  # one row at the class's prefill capacity (allocated at the first piece)
    length: int  # live slots in it
    eos: int
    done: int = 0  # prompt tokens prefilled so far
    logits: jax.Array | None = None  # after the last prompt token, once done
    evicted: int = 0  # tokens evicted per layer and KV head by compressions in this prefill
    compressions: int = 0
    user: object = None
    cold: ColdTier | None = None  # the session's cold tier (a tiered class), on the host
    spill: list[tuple[ColdChunk, int]] = field(default_factory=list)  # evicted here, not yet in `cold`: (chunk, row)
    recalled: float = 0.0  # tokens per layer and KV head the re-selection brought back from cold
    reselections: int = 0
    dropped: int = 0  # cold entries per layer and KV head dropped at the tier's bound
    # The prompt's last `tail` tokens are prefilled against hot ∪ cold (0: the prompt is compressed
    # as a whole, nothing to recall). `origin`: each slot of the recalled cache's index in the cold
    # tier (-1: not from it).
    tail: int = 0
    origin: jax.Array | None = None
    hot_length: int = 0  # live slots in the prefill cache before the recall
    # A short new prompt may prefill with others in one call (`Engine.prefill_short`); it then sits
    # in row `batch[1]` of the batch cache `batch[0]` until it starts.
    short: bool = False
    batch: tuple[KVCache, int] | None = None
    # The session's tokens before `tokens` (what a reconstruction pass repeats, with the prompt).
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def finished(self) -> bool:
        return self.done == len(self.tokens)


@dataclass(eq=False)
class Sequence:
    """A generating sequence (host mirror of its decode row)."""

    cls: CacheClass
    sampling: SamplingParams
    length: int  # live cache slots
    pending: int  # sampled token, not yet in the cache
    remaining: int  # tokens it may still produce
    key: np.ndarray  # [2] uint32 PRNG key
    eos: int = -1
    first_logprob: float = 0.0
    first_top: list[tuple[int, float]] | None = None  # the first token's alternatives, when asked
    slot: int = -1  # decode row, -1 when not in one
    single_step: bool = False  # the host must see every token before the next (stop strings)
    tokens_evicted: int = 0
    compressions: int = 0
    idle_cache: KVCache | None = None  # its cache when it never joined a slot
    user: object = None
    cold: ColdTier | None = None  # its cold tier as the prefill left it (a tiered class)
    spill: list[tuple[ColdChunk, int]] = field(default_factory=list)  # evicted while decoding: (chunk, row)
    recalled: float = 0.0
    reselections: int = 0
    dropped: int = 0

    @property
    def active(self) -> bool:
        return self.remaining > 0

    def cold_tier(self) -> ColdTier | None:
        """Its whole cold tier (what the prefill left + what decoding evicted), on the host: what a
        session keeps. Copies the decode-time evictions off the device."""
        if self.cold is None:
            return None
        self.cold, self.spill = self.cold.extend(self.spill), []
        return self.cold


@dataclass
class StepOutput:
    seq: Sequence
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None = None  # per token: its alternatives (id, logprob), when asked


class DecodeFailed(RuntimeError):
    """Decode calls failed for some classes. Those classes got fresh decode states (their donated
    caches cannot be trusted) and their rows are out of the engine; `outputs` are the other
    classes' results of the same step, `failures` [(class, the rows it held, the error)]."""

    def __init__(self, outputs: list[StepOutput], failures: list[tuple[CacheClass, list[Sequence], Exception]]):
        super().__init__("; ".join(f"{cls.name}: {e}" for cls, _, e in failures))
        self.outputs, self.failures = outputs, failures


class _CompletionWatcher:
    """Times device work without waiting for it: a daemon thread waits for each watched array and
    calls back with the seconds from `started` to its completion. (JAX runs a backend's programs in
    the order they were dispatched, so work dispatched right after a synchronisation point starts
    at once.)"""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def watch(self, array: jax.Array, started: float, callback: Callable[[float], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="toyllm-completions", daemon=True)
            self._thread.start()
        self._queue.put((array, started, callback))

    def _run(self) -> None:
        while True:
            array, started, callback = self._queue.get()
            try:
                array.block_until_ready()
            except Exception:  # noqa: BLE001, S112 - a failed step is the engine's to report, not the timer's
                continue
            callback(time.perf_counter() - started)


class _ClassState:
    """One class's decode state: the batched cache and who sits in each slot. The cache is allocated
    when the class first takes a row (or at start-up: `Engine.allocate_states`), and kept."""

    def __init__(self, model: ToyLLM, cls: CacheClass):
        self.model, self.cls = model, cls
        self._cache: KVCache | None = None
        self.rows: list[Sequence] = []  # occupied slots, packed: rows[i].slot == i
        self.reserved = 0  # prefills under way that will take a slot
        self.prefilling = 0  # prefill caches held (at most cls.prefill_rows)

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = release_zero_pages(steps.new_cache(self.model, self.cls, self.cls.slots,
                                                             self.cls.capacity))
        return self._cache

    @cache.setter
    def cache(self, value: KVCache) -> None:
        self._cache = value

    @property
    def allocated(self) -> bool:
        return self._cache is not None

    @property
    def free_slots(self) -> int:
        return self.cls.slots - len(self.rows) - self.reserved



class Engine:
    def __init__(self, model: ToyLLM, classes: list[CacheClass], steps_per_call: int = 4,
                 on_compress: Callable[[CacheClass, int, float], None] | None = None, batch_rows: int = MAX_BATCH_ROWS,
                 repeat_prompt: list[int] | None = None):
        if len({c.name for c in classes}) != len(classes):
            raise ValueError("cache classes must be distinct")
        # The instruction a reconstruction pass puts before the context it repeats (KVzip): the
        # token ids of "Repeat the previous context exactly." as the model's chat renders a user
        # turn (the server passes them); none: the context alone.
        self.repeat_prompt = np.asarray(repeat_prompt or [], np.int32)
        for c in classes:
            if c.policy.reconstructs and len(self.repeat_prompt) > c.max_chunk // 2:
                raise ValueError(f"the repeat prompt ({len(self.repeat_prompt)} tokens) must fit half a "
                                 f"prefill chunk ({c.max_chunk})")
        self.model = model
        self.eos = model.cfg.eos_token_id  # the token that ends a sequence (unless it ignores EOS)
        self.classes = list(classes)
        self.steps_per_call = steps_per_call
        # Called as on_compress(cls, rows, seconds) once each decode-time compression call (of `rows`
        # rows of class `cls`) has finished (from a watcher thread: the engine does not wait for it).
        self.on_compress = on_compress
        self._watcher = _CompletionWatcher()
        self._states = {c: _ClassState(model, c) for c in classes}
        self.batch_rows = min(batch_rows, MAX_BATCH_ROWS)  # short prompts prefilled together, at most

    def allocate_states(self) -> None:
        """Allocate every class's decode state now, where new caches' pages are lazy (the host
        backend: `backend.release_zero_pages`). A state then costs resident memory only as its rows
        fill, but XLA writes its zeros first: a transient of the whole state (1 GiB by default), best
        taken at start-up, before the warm-up, when the process holds least. Elsewhere states stay
        allocated on first use, so that a class no request uses costs no device memory."""
        if backend.current().lazy_zero_pages:
            for state in self._states.values():
                state.cache  # noqa: B018 - the property allocates

    # ------------------------------------------------------------------------------- classes
    def free_slots(self, cls: CacheClass) -> int:
        return self._states[cls].free_slots

    def takes_short(self, cls: CacheClass, n_tokens: int, cache: KVCache | None = None,
                    cold: ColdTier | None = None) -> bool:
        """Whether a prompt of n_tokens (on a session's cache and cold tier, if any) is a short new
        prompt: it may prefill with others (`prefill_short`) and needs no prefill row."""
        return cache is None and not (cold is not None and cold.length) and cls.takes_short(n_tokens)

    def free_prefill_rows(self, cls: CacheClass) -> int:
        """Prompts of this class that may start prefilling now (each holds a prefill cache)."""
        state = self._states[cls]
        return cls.prefill_rows - state.prefilling

    @property
    def running(self) -> int:
        return sum(len(s.rows) for s in self._states.values())

    def capacity_bytes(self) -> int:
        """Bytes of the decode states allocated so far (a class's, once it first takes a row)."""
        return sum(c.slots * c.capacity for c, s in self._states.items() if s.allocated) * self.model.kv_bytes_per_token

    # ------------------------------------------------------------------------------- prefill
    def begin(self, tokens, cls: CacheClass, sampling: SamplingParams, cache: KVCache | None = None,
              length: int = 0, user: object = None, cold: ColdTier | None = None,
              rewind_to: int | None = None, history=None) -> Prefill:
        """Start prefilling `tokens` for a sequence of class `cls` (reserving a decode slot and a
        prefill row), on a session's idle cache (one row, at the capacity of this class or of a
        smaller full class) and cold tier, or on new ones. `rewind_to` (a tiered class): first drop
        every position from there on from both tiers (`tokens` then start at that position).
        `history`: the session's tokens before `tokens`, for a class whose policy reconstructs."""
        tokens = np.asarray(tokens, np.int32)
        if len(tokens) == 0:
            raise ValueError("a prompt needs at least one token")
        if cls.tokens is not None and length + len(tokens) > cls.tokens:
            raise ValueError(f"{length} cached + {len(tokens)} prompt tokens exceed the class's {cls.tokens}")
        state = self._states[cls]
        short = self.takes_short(cls, len(tokens), cache, cold) and rewind_to is None
        if state.free_slots < 1:
            raise RuntimeError(f"no free decode slot in cache class {cls.name}")
        if not short and state.prefilling >= cls.prefill_rows:
            raise RuntimeError(f"no free prefill row in cache class {cls.name}")
        if cls.tiered and cold is None:
            cfg = self.model.cfg
            cold = ColdTier.empty(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cls.policy.cold_bits)
        if cache is None:
            cache = None if short else release_zero_pages(steps.new_cache(self.model, cls, 1, cls.prefill_capacity))
        elif cache.capacity != cls.prefill_capacity:
            cache = steps.resize(cache, capacity=cls.prefill_capacity)
        if rewind_to is not None and cls.tiered:
            cache = steps.truncate(cache, np.int32(rewind_to))
            cold = cold.before(rewind_to)
            length = int(np.asarray(cache.length)[0])  # (indexing on the device would compile)
        state.reserved += 1
        state.prefilling += not short
        eos = -1 if sampling.ignore_eos else (self.eos if sampling.eos_id is None else sampling.eos_id)
        job = Prefill(cls, tokens, sampling, cache, length, eos, user=user, cold=cold if cls.tiered else None,
                      short=short)
        if cls.policy.reconstructs and history is not None:
            job.history = np.asarray(history, np.int32)
        if cls.tiered:
            # Recall when there is a cold tier, or when the prompt will be compressed before it is
            # whole (it does not fit the prefill window): either way, what the turn's question
            # needs may have gone cold.
            overflows = length + len(tokens) > cls.policy.kept_slots + cls.prefill_window
            if cold.length or overflows:
                job.tail = min(RECALL_TAIL, len(tokens))
        return job

    def prefill(self, job: Prefill, limit: int | None = None) -> bool:
        """Run the next piece of the prompt (at most `limit` tokens, but the tail whole); True once
        all of it is in.

        A session with a cold tier prefills all but the prompt's last `tail` tokens against its hot
        cache; then it recalls hot ∪ cold into one cache, prefills the last tokens against all of it
        and re-selects the hot set with their queries: the question chooses with the whole history
        in view, and the first generated token sees it too."""
        cls = job.cls
        if job.cache is None:  # a short prompt prefilled on its own after all
            job.cache = release_zero_pages(steps.new_cache(self.model, cls, 1, cls.prefill_capacity))
        limit = limit or cls.max_chunk
        head = len(job.tokens) - job.tail
        if job.done < head:
            piece = next_piece(cls, job.length, head - job.done, limit)
            if piece.compress_first:
                self._compress_prefill(job)
            self._run_piece(job, piece.real, piece.padded)
        else:
            # The whole tail in this call (at most RECALL_TAIL tokens), so that one recalled cache at
            # most exists at a time.
            self._recall(job)
            while not job.finished:
                real = min(len(job.tokens) - job.done, cls.tail_chunk)
                self._run_piece(job, real, max(MIN_CHUNK, 1 << (real - 1).bit_length()))
        if job.finished and cls.evicts:
            if job.tail:
                self._reselect(job)
            elif job.length > cls.policy.budget:
                self._compress_prefill(job)
        return job.finished

    def _run_piece(self, job: Prefill, real: int, padded: int) -> None:
        chunk = np.zeros((1, padded), np.int32)
        chunk[0, :real] = job.tokens[job.done : job.done + real]
        # A recalled cache (hot ∪ cold) is read whole; a prefill cache up to what the chunk fills.
        span = job.cls.recall_capacity if job.origin is not None else \
            job.cls.prefill_span(job.length + padded)
        job.logits, job.cache = steps.prefill_chunk(self.model, job.cache, chunk, np.array([real], np.int32),
                                                    span=span)
        job.length += real
        job.done += real

    def _compress_prefill(self, job: Prefill) -> None:
        """Compress the prefill cache (a tiered class keeps what it evicts, to go cold)."""
        cls, policy = job.cls, job.cls.policy
        if policy.reconstructs:
            self._reconstruct(job)
        job.cache, chunk = steps.compress_cache(job.cache, cls=cls)
        if chunk is not None and job.cold is not None:
            job.spill.append((chunk, 0))
        job.evicted += _evicted(policy, job.length, job.compressions)
        job.compressions += 1
        job.length = min(job.length, policy.kept_slots)

    def _reconstruct(self, job: Prefill) -> None:
        """KVzip's scoring pass over the prefill cache: the signals cleared, then the context (the
        session's tokens and the prompt so far, as much as a prefill cache holds) repeated in
        pieces, each the repeat prompt and the next part of the context, run against the cache as
        a prompt chunk of `max_chunk` and cut off again. What stays is what the pieces' queries
        recorded (`AttentionPeak`)."""
        cls = job.cls
        context = np.concatenate([job.history, job.tokens[: job.done]])
        context = context[-(cls.policy.kept_slots + cls.prefill_window):]
        step = cls.max_chunk - len(self.repeat_prompt)
        span = next(s for s in cls.reconstruct_spans if s >= job.length + cls.max_chunk)
        job.cache = steps.clear_signals(job.cache)
        end = np.int32(np.asarray(job.cache.next_pos)[0])  # (indexing on the device would compile)
        for lo in range(0, len(context), step):
            piece = np.concatenate([self.repeat_prompt, context[lo : lo + step]])
            padded = max(MIN_CHUNK, 1 << (len(piece) - 1).bit_length())
            # A full piece over the reconstruction span; a short last one as a prompt chunk of its size.
            at = span if padded == cls.max_chunk else cls.prefill_span(job.length + padded)
            chunk = np.zeros((1, padded), np.int32)
            chunk[0, : len(piece)] = piece
            _, job.cache = steps.prefill_chunk(self.model, job.cache, chunk, np.array([len(piece)], np.int32),
                                               span=at)
            job.cache = steps.truncate(job.cache, end)

    def _recall(self, job: Prefill) -> None:
        """Hot ∪ cold as one cache at the class's recall capacity (the cold tier uploaded)."""
        cls = job.cls
        cold, dropped = job.cold.extend(job.spill).drop_oldest(cls.cold_tokens)
        job.spill, job.dropped, job.cold = [], job.dropped + dropped, cold
        job.hot_length = job.length
        job.cache, job.origin = steps.recall(job.cache, cold.upload(cold_bucket(cls.cold_tokens, cold.length)),
                                               cls=cls)
        job.length = int(np.asarray(job.cache.length)[0])  # (indexing on the device would compile)

    def _reselect(self, job: Prefill) -> None:
        """The hot set chosen again over the recalled cache; the rest is the new cold tier."""
        cls, policy = job.cls, job.cls.policy
        job.cache, chunk, back = steps.reselect(job.cache, job.origin, cls=cls)
        back = np.asarray(back)[:, 0]
        job.recalled += float(back.sum()) / (back.shape[0] * back.shape[1])
        job.cold, dropped = job.cold.reselected(back, chunk).drop_oldest(cls.cold_tokens)
        job.dropped += dropped
        job.reselections += 1
        job.origin = None
        job.evicted += _evicted(policy, job.hot_length + job.tail, job.compressions)
        job.compressions += 1
        job.length = min(job.length, policy.kept_slots)

    def start(self, job: Prefill) -> Sequence:
        """After the last piece: sample the first token (the same sampler as decoding) and, if the
        sequence goes on, put it in a decode slot. Returns the sequence; its first token is
        `seq.pending` (with `seq.first_logprob`)."""
        if not job.finished:
            raise ValueError("the prompt is not prefilled yet")
        state = self._states[job.cls]
        params = job.sampling
        # Sampled before the reservation is given up: if it fails, the job can be cancelled as is.
        token, logprob, top, key = first_token(job.logits, params, new_key(params.seed))
        state.reserved -= 1
        state.prefilling -= not job.short
        remaining = 0 if (token == job.eos or params.max_new_tokens == 1) else params.max_new_tokens - 1
        seq = Sequence(job.cls, params, job.length, token, remaining, key, eos=job.eos, first_logprob=logprob,
                       first_top=top if params.top_logprobs else None,
                       single_step=bool(params.stop), tokens_evicted=job.evicted, compressions=job.compressions,
                       user=job.user, cold=job.cold, spill=job.spill, recalled=job.recalled,
                       reselections=job.reselections, dropped=job.dropped)
        cls = job.cls
        if seq.active:
            seq.slot = len(state.rows)
            state.rows.append(seq)
            if job.batch is not None:
                row = steps.batch_take(job.batch[0], np.int32(job.batch[1]))
                state.cache = steps.insert_batch_row(state.cache, np.int32(seq.slot), row, cls=cls)
            else:
                state.cache = steps.insert_row(state.cache, np.int32(seq.slot), job.cache, cls=cls,
                                               span=span_for(cls.capacity, job.length))
        elif job.batch is not None:
            seq.idle_cache = steps.batch_row(steps.batch_take(job.batch[0], np.int32(job.batch[1])), cls=cls)
        else:
            seq.idle_cache = job.cache if cls.capacity == cls.prefill_capacity else \
                steps.resize(job.cache, capacity=cls.capacity)
        job.cache = job.batch = None
        return seq

    def cancel(self, job: Prefill) -> None:
        """Abandon a prefill under way (its client went away); its reserved slot is free again."""
        state = self._states[job.cls]
        state.reserved -= 1
        state.prefilling -= not job.short
        job.cache = job.batch = None

    def prefill_short(self, jobs: list[Prefill]) -> None:
        """Prefill short new prompts (`job.short`, at most `batch_rows`, of any classes) whole, together
        in one call; each then starts as any prefilled job does."""
        if not jobs or len(jobs) > self.batch_rows or not all(j.short and j.done == 0 for j in jobs):
            raise ValueError(f"1 to {self.batch_rows} short prompts, none started")
        rows = next(b for b in batch_sizes(self.batch_rows) if b >= len(jobs))
        width = next(c for c in batch_chunks() if c >= max(len(j.tokens) for j in jobs))
        tokens = np.zeros((rows, width), np.int32)
        n_valid = np.zeros(rows, np.int32)
        for i, job in enumerate(jobs):
            tokens[i, : len(job.tokens)] = job.tokens
            n_valid[i] = len(job.tokens)
        batch = steps.new_batch_cache(self.model, rows, self.batch_signals)
        logits, batch = steps.prefill_batch(self.model, batch, tokens, n_valid, span=SHORT_PROMPT)
        logits = np.asarray(logits)  # rows on the host: slicing on the device would compile
        for i, job in enumerate(jobs):
            job.logits, job.batch = logits[i], (batch, i)
            job.done = job.length = len(job.tokens)

    @property
    def batch_signals(self) -> tuple:
        """What a short-prompt batch records: every class's signals (scores, the longest query ring)."""
        return batch_signals(self.classes)

    # -------------------------------------------------------------------------------- decode
    def step(self) -> list[StepOutput]:
        """One jitted call of up to steps_per_call decode steps for each class with active rows.

        A class whose call fails is rebuilt empty (its prefills under way keep their reserved
        slots) and reported by `DecodeFailed` after the other classes have stepped."""
        outputs, failures = [], []
        for cls, state in list(self._states.items()):
            if any(r.active for r in state.rows):
                try:
                    outputs += self._step_class(state)
                except Exception as e:  # noqa: BLE001 - reported to the caller with the rows it affects
                    fresh = _ClassState(self.model, cls)
                    fresh.reserved, fresh.prefilling = state.reserved, state.prefilling
                    self._states[cls] = fresh
                    for r in state.rows:
                        r.slot, r.remaining = -1, 0
                    failures.append((cls, list(state.rows), e))
        if failures:
            raise DecodeFailed(outputs, failures)
        return outputs

    def _step_class(self, state: _ClassState) -> list[StepOutput]:
        cls, rows = state.cls, state.rows
        n_rows = row_bucket(cls.slots, len(rows))
        active = [r for r in rows if r.active]
        n_steps = self._steps_now(active)
        # Attend over what the active rows fill by the end of the call (inactive rows write nothing).
        span = span_for(cls.capacity, max(r.length for r in active) + n_steps)
        pad = [0] * (n_rows - len(rows))

        def column(get):
            return [get(r) for r in rows] + pad

        keys = np.zeros((n_rows, 2), np.uint32)
        for r in rows:
            keys[r.slot] = r.key
        vocab = self.model.cfg.vocab_size
        inputs = steps.decode_inputs(
            column(lambda r: r.pending), column(lambda r: r.remaining), keys,
            column(lambda r: r.sampling.temperature), column(lambda r: min(r.sampling.top_k, vocab)),  # >= vocab: off
            column(lambda r: r.sampling.top_p), column(lambda r: r.eos), column(lambda r: r.sampling.top_logprobs))
        state.cache, bundle, top_ids, top_lps = steps.decode_steps(
            self.model, state.cache, np.int32(n_steps), inputs, n_rows=n_rows, max_steps=self.steps_per_call,
            span=span)
        got = steps.DecodeOutputs.read(bundle, self.steps_per_call)
        if any(r.sampling.top_logprobs for r in active):  # host copies (slicing on device would compile)
            top_ids, top_lps = np.asarray(top_ids), np.asarray(top_lps)

        outputs = []
        for r in active:
            i = r.slot
            n = int(got.emitted[i].sum())
            r.length += n
            r.pending = int(got.tokens[i, n - 1])
            r.remaining = int(got.remaining[i])
            r.key = got.keys[i]
            top = None
            if r.sampling.top_logprobs:
                k = r.sampling.top_logprobs
                ids, lps = top_ids[i, :n, :k].tolist(), top_lps[i, :n, :k].tolist()
                top = [list(zip(a, b, strict=True)) for a, b in zip(ids, lps, strict=True)]
            outputs.append(StepOutput(r, got.tokens[i, :n].tolist(), got.logprobs[i, :n].tolist(), top))
        self._compress_due(state, active)
        return outputs

    def _compress_due(self, state: _ClassState, rows: list[Sequence]) -> None:
        """Compress every row that has reached its trigger, in one call (not waited for: the watcher
        times it from its completion)."""
        cls = state.cls
        due = [r for r in rows if cls.evicts and r.length >= cls.policy.trigger]
        if not due:
            return
        k = row_bucket(cls.slots, len(due))
        slots = np.array([r.slot for r in due] + [due[0].slot] * (k - len(due)), np.int32)
        started = time.perf_counter()
        state.cache, chunk, done = steps.compress_rows(state.cache, slots, cls=cls)
        if self.on_compress is not None:
            # Not a leaf of the state: the next decode call donates (frees) those under the watcher.
            self._watcher.watch(done, started, partial(self.on_compress, cls, len(due)))
        for i, r in enumerate(due):
            if chunk is not None and r.cold is not None:
                r.spill.append((chunk, i))
            r.tokens_evicted += _evicted(cls.policy, r.length, r.compressions)
            r.compressions += 1
            r.length = min(r.length, cls.policy.kept_slots)

    def stop(self, seq: Sequence) -> None:
        """End a sequence at its next step (a stop string, a client gone): it generates no more and
        leaves its slot when freed."""
        seq.remaining = 0

    def room(self, seq: Sequence) -> int:
        """Decode steps the sequence can take before it must compress (or is at its capacity)."""
        cls = seq.cls
        return (cls.policy.trigger if cls.evicts else cls.capacity) - seq.length

    def force(self, cls: CacheClass, tokens: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Teacher forcing (evaluation): every occupied row of class `cls`, in slot order, is fed
        tokens [rows, k] instead of its samples, scoring targets [rows, k]; rows compress as decoding
        does. k must not exceed any row's `room`. Returns (NLL [rows, k], argmax-correct [rows, k])."""
        state = self._states[cls]
        rows = state.rows
        if tokens.shape[0] != len(rows) or tokens.shape[1] > min(self.room(r) for r in rows):
            raise ValueError("teacher forcing needs one row of tokens per occupied slot, within their room")
        n_rows = row_bucket(cls.slots, len(rows))
        pad = ((0, n_rows - len(rows)), (0, 0))
        state.cache, nll, correct = steps.forced_steps(self.model, state.cache, np.pad(tokens, pad).astype(np.int32),
                                                       np.pad(targets, pad).astype(np.int32), n_rows=n_rows)
        for r in rows:
            r.length += tokens.shape[1]
        self._compress_due(state, rows)
        return np.asarray(nll, np.float64)[: len(rows)], np.asarray(correct)[: len(rows)]

    def kept_positions(self, seq: Sequence) -> np.ndarray:
        """Original positions a decoding sequence keeps: [layers, kv_heads, length] (a device read)."""
        return np.asarray(self._states[seq.cls].cache.pos)[:, seq.slot, :, : seq.length]

    def _steps_now(self, active: list[Sequence]) -> int:
        """Steps every active row can take before one needs compression (or hits its capacity)."""
        if any(r.single_step for r in active):
            return 1
        limit = min(self.steps_per_call, max(r.remaining for r in active), *(self.room(r) for r in active))
        return max(limit, 1)

    def free(self, seq: Sequence) -> tuple[KVCache, int]:
        """Take a sequence out of its slot; returns its cache (one row at the class capacity) and its
        live length. The last occupied row moves into the freed slot."""
        if seq.slot < 0:
            cache, seq.idle_cache = seq.idle_cache, None
            return cache, seq.length
        state = self._states[seq.cls]
        cache = steps.extract_row(state.cache, np.int32(seq.slot))
        last = state.rows.pop()
        if last is not seq:
            state.cache = steps.move_row(state.cache, np.int32(last.slot), np.int32(seq.slot),
                                         span=span_for(seq.cls.capacity, last.length))
            last.slot = seq.slot
            state.rows[seq.slot] = last
        seq.slot = -1
        return cache, seq.length

    def reset(self) -> None:
        """Drop every row and prefill (after a failure): fresh decode states."""
        self._states = {c: _ClassState(self.model, c) for c in self.classes}

    # ---------------------------------------------------------------------- one-call recipe
    def run_prefill(self, tokens, cls: CacheClass, sampling: SamplingParams, cache: KVCache | None = None,
                    length: int = 0, user: object = None) -> Sequence:
        """begin + every prefill piece + start: the whole recipe, for callers that do not interleave."""
        job = self.begin(tokens, cls, sampling, cache, length, user)
        while not self.prefill(job):
            pass
        return self.start(job)


def _evicted(policy, length: int, compressions: int) -> int:
    """Tokens a compression of a row of `length` slots evicts, on average per layer and KV head.
    Every compression leaves `budget` live slots on average; a policy that spreads its budget
    unevenly leaves them among `kept_slots` (the rest empty), which were not tokens."""
    live = length - (policy.kept_slots - policy.budget if compressions else 0)
    return max(live - policy.budget, 0)
