"""The engine: one thread that prefills new requests and decodes all running ones together.

Request flow:
1. A route validates a request, tokenizes its prompt, reserves its session and calls `submit`;
   the request waits in a bounded queue (full: `QueueFull`, the route answers 429).
2. Between decode calls the engine thread admits waiting requests, up to `max_concurrent_requests`
   running at once (continuous batching). Admitting one prefills the session's pending token and
   the new prompt against the session's cache (chunked into power-of-two buckets, compressed when
   the policy's budget is exceeded), samples the first token and inserts the sequence into the
   shared `DecodeBatch`.
3. Each engine iteration runs one jitted call of up to `steps_per_call` decode steps for every
   running sequence, hands each new token to its request's sink as text (incremental detokenization
   with stop strings) and retires sequences that are finished or whose client went away; a retired
   sequence's cache goes back to its session, and the session is released.

The engine knows nothing of HTTP: a request's `sink` is any callable taking events
(`TokenOut`, `Finished` or `Failed`); the routes turn them into SSE or JSON. No JAX work ever runs on
the asyncio event loop, because only this thread touches the model and the caches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from toyllm_core.detokenize import TextStream
from toyllm_core.generate import (
    DecodeBatch,
    Row,
    SamplingParams,
    first_token,
    new_key,
    prefill,
    warm_prefill,
)
from toyllm_core.model import ToyLLM
from toyllm_core.policies import CacheConfig

from .metrics import Metrics
from .sessions import Session, SessionStore

log = logging.getLogger("toyllm.engine")


class QueueFull(RuntimeError):
    pass


class EngineStopped(RuntimeError):
    pass


@dataclass
class TokenOut:
    index: int
    id: int
    text: str
    logprob: float


@dataclass
class Finished:
    finish_reason: str  # length | stop | eos | cancelled
    generated_text: str
    prompt_tokens: int
    completion_tokens: int
    cache: dict  # Session.stats()
    timings: dict


@dataclass
class Failed:
    message: str


@dataclass(eq=False)
class GenerationRequest:
    session: Session
    prompt_ids: list[int]
    sampling: SamplingParams
    sink: Callable[[object], None]
    ephemeral: bool = False  # no session to keep (the OpenAI endpoint): drop the cache at the end
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Engine-side state.
    text: TextStream | None = None
    row: Row | None = None
    generated: int = 0
    started: float = 0.0
    prefill_s: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, model: ToyLLM, tokenizer, store: SessionStore, metrics: Metrics, *,
                 max_running: int = 32, queue_size: int = 64, steps_per_call: int = 4, max_chunk: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.metrics = metrics
        self.max_running = max_running
        self.queue_size = queue_size
        self.max_chunk = max_chunk
        self.eos = model.cfg.eos_token_id
        self.batch = DecodeBatch(model, steps_per_call=steps_per_call, on_compress=self._compressed)
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[GenerationRequest] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="toyllm-engine", daemon=True)

    # ------------------------------------------------------------------ called from other threads
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def capacity_bytes(self) -> int:
        """Bytes allocated by the decode batch's cache (running requests' caches)."""
        return self.batch.size * self.batch.capacity * self.model.cfg.kv_bytes_per_token

    def has_room(self) -> bool:
        return len(self._waiting) + len(self._running) < self.max_running + self.queue_size

    def submit(self, request: GenerationRequest) -> None:
        with self._wake:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) + len(self._running) >= self.max_running + self.queue_size:
                raise QueueFull(f"{self.max_running} requests running and {len(self._waiting)} waiting; retry later")
            self._waiting.append(request)
            self._wake.notify()

    def wake(self) -> None:
        """Make the loop look at cancellations now (a client went away while its request waited)."""
        with self._wake:
            self._wake.notify()

    # ----------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._running or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                while self._waiting and len(self._running) + len(admitted) < self.max_running:
                    admitted.append(self._waiting.popleft())
            try:
                for request in admitted:
                    self._admit(request)
                self._retire_cancelled()
                if self._running:
                    self._decode()
            except Exception as e:
                log.exception("engine step failed")
                self._fail_all(f"internal error in the decode loop: {e}")
        self._fail_all("the server is shutting down")
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            self._fail(request, "the server is shutting down")

    def _admit(self, request: GenerationRequest) -> None:
        session = request.session
        if request.cancelled.is_set():
            self.store.release(session)
            request.sink(Failed("cancelled before it started"))
            return
        request.started = time.perf_counter()
        self.metrics.queue_time.observe(request.started - request.arrived)
        feed = ([session.pending] if session.pending is not None else []) + request.prompt_ids
        try:
            result = prefill(self.model, feed, session.cache, session.cache_cfg, session.length, self.max_chunk)
        except Exception as e:
            log.exception("prefill failed")
            session.cache, session.length = None, 0
            self.store.discard(session)
            self._fail(request, f"prefill failed ({e}); the session was discarded")
            return
        session.cache = None  # donated into the prefill; the result holds it now
        session.tokens.extend(request.prompt_ids)
        session.pending = None
        session.length = result.length
        if result.compressions:
            policy = session.cache_cfg.policy
            self.metrics.compressions.labels(policy).inc(result.compressions)
            self.metrics.evicted.labels(policy).inc(result.evicted)
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        sampling = request.sampling
        token, logprob, key = first_token(result.logits, sampling, new_key(sampling.seed))
        request.prefill_s = time.perf_counter() - request.started
        self.metrics.prefill_duration.observe(request.prefill_s)
        request.text = TextStream(self.tokenizer, tuple(sampling.stop))
        eos = -1 if sampling.ignore_eos else self.eos
        remaining = 0 if token == eos else sampling.max_new_tokens - 1
        request.row = Row(session.cache_cfg, sampling, result.length, token, remaining, key, eos=eos,
                          single_step=bool(sampling.stop), user=request)
        self._emit(request, token, logprob)
        if not request.row.active:
            self._finish(request, result.cache)
            return
        self.batch.add(result.cache, request.row)
        self._running.append(request)

    def _decode(self) -> None:
        active = len(self.batch.active_rows)
        started = time.perf_counter()
        outputs = self.batch.step()
        elapsed = time.perf_counter() - started
        steps = max((len(o.tokens) for o in outputs), default=1)
        for _ in range(steps):
            self.metrics.decode_step.observe(elapsed / steps)
            self.metrics.batch_size.observe(active)
        for out in outputs:
            request: GenerationRequest = out.row.user
            for token, logprob in zip(out.tokens, out.logprobs, strict=True):
                # Rows with stop strings decode one token per call, so nothing is cached past a stop.
                if not request.text.stopped:
                    self._emit(request, token, logprob)
            request.session.length = out.row.length
        for request in [r for r in self._running if not r.row.active]:
            self._retire(request)

    def _emit(self, request: GenerationRequest, token: int, logprob: float) -> None:
        """Hand one generated token to the request (the row already holds it as pending)."""
        now = time.perf_counter()
        row = request.row
        request.session.tokens.append(token)
        request.session.pending = token
        text = "" if token == row.eos else request.text.push(token)
        if request.text.stopped:
            row.remaining = 0
        final = request.text.stopped or token == row.eos or request.generated + 1 >= request.sampling.max_new_tokens
        if final:
            text += request.text.finish()
        if request.generated == 0:
            request.first_token_at = now
            self.metrics.ttft.observe(now - request.arrived)
        else:
            self.metrics.itl.observe(now - request.last_token_at)
        request.last_token_at = now
        self.metrics.generation_tokens.inc()
        request.sink(TokenOut(request.generated, int(token), text, float(logprob)))
        request.generated += 1

    def _retire_cancelled(self) -> None:
        for request in [r for r in self._running if r.cancelled.is_set()]:
            request.row.remaining = 0
            self._retire(request, cancelled=True)

    def _retire(self, request: GenerationRequest, cancelled: bool = False) -> None:
        self._running.remove(request)
        cache = self.batch.remove(request.row)
        self._finish(request, cache, cancelled)

    def _finish(self, request: GenerationRequest, cache, cancelled: bool = False) -> None:
        session, row = request.session, request.row
        session.length = row.length
        session.pending = row.pending
        session.turns += 1
        if cancelled:
            reason = "cancelled"
        elif request.text.stopped:
            reason = "stop"
        elif row.eos >= 0 and row.pending == row.eos:
            reason = "eos"
        else:
            reason = "length"
        if row.compressions:
            policy = session.cache_cfg.policy
            self.metrics.compressions.labels(policy).inc(row.compressions)
            self.metrics.evicted.labels(policy).inc(row.tokens_evicted)
        # DecodeBatch.remove already trimmed the cache to the bucket its kept tokens need.
        session.cache = None if request.ephemeral else cache
        self.store.release(session)
        now = time.perf_counter()
        total = now - request.arrived
        self.metrics.finished.labels(reason).inc()
        self.metrics.request_duration.observe(total)
        decode_s = now - request.first_token_at
        timings = {"queue_s": request.started - request.arrived, "prefill_s": request.prefill_s,
                   "ttft_s": request.first_token_at - request.arrived, "total_s": total,
                   "tokens_per_s": (request.generated - 1) / decode_s if request.generated > 1 and decode_s > 0
                   else 0.0}
        request.sink(Finished(reason, request.text.text, len(request.prompt_ids), request.generated,
                              session.stats(), timings))

    def _compressed(self, row: Row, seconds: float) -> None:
        self.metrics.compression_duration.labels(row.cache_cfg.policy).observe(seconds)

    def _fail(self, request: GenerationRequest, message: str) -> None:
        self.store.release(request.session)
        request.sink(Failed(message))

    def _fail_all(self, message: str) -> None:
        for request in list(self._running):
            self._running.remove(request)
            request.session.cache, request.session.length = None, 0
            self.store.discard(request.session)
            self._fail(request, message)
        self.batch = DecodeBatch(self.model, steps_per_call=self.batch.steps_per_call, on_compress=self._compressed)

    # ---------------------------------------------------------------------------------- warm-up
    def warmup(self, default_cfg: CacheConfig, max_prompt: int, log_fn=log.info) -> None:
        """Compile the shapes serving will use for the default cache configuration: every prefill
        shape (see `plan_prefill`), then synthetic requests through this engine in batches growing to
        `max_running` and shrinking again, for greedy, sampled and top-k/top-p sampled decoding.
        Call it before the server takes requests: the prefill part runs outside the engine thread."""
        vocab = self.model.cfg.vocab_size
        rng = np.random.default_rng(0)
        decode = default_cfg.trigger + 8 if default_cfg.evicts else 32  # past one decode-time compression

        def run(sessions, prompts, params):
            done = threading.Semaphore(0)
            failed = []

            def sink(event):
                if isinstance(event, Failed):
                    failed.append(event.message)
                if isinstance(event, Finished | Failed):
                    done.release()

            for session, prompt, p in zip(sessions, prompts, params, strict=True):
                session.busy = True
                self.submit(GenerationRequest(session, prompt, p, sink))
            for _ in prompts:
                done.acquire()
            if failed:
                raise RuntimeError(f"warm-up request failed: {failed[0]}")

        def session():
            return Session("warmup", default_cfg, self.model.cfg.kv_bytes_per_token)

        started = time.perf_counter()
        if default_cfg.evicts:
            # Every shape prefill can reach for any session state and prompt length (bounded because
            # the cache is); run on the engine thread's behalf here, before the engine serves anyone.
            n = warm_prefill(self.model, default_cfg, max_prompt, self.max_chunk)
            log_fn(f"warm-up: {n} prefill shapes in {time.perf_counter() - started:.1f} s")
        else:  # a full cache grows with the conversation: warm the common prompt buckets
            greedy = SamplingParams(max_new_tokens=decode, temperature=0, ignore_eos=True)
            for n in (8, 16, 32, 64, 128, 256, 512, 1024):
                if n <= min(max_prompt, self.max_chunk):
                    s = session()
                    for _turn in range(2):  # a new session, then the same session continued
                        run([s], [rng.integers(0, vocab, n).tolist()], [greedy])
        samplers = [{"temperature": 0}, {"temperature": 1.0}, {"temperature": 1.0, "top_k": 40, "top_p": 0.9}]
        for sampler in samplers:
            size = 1
            while True:  # every power-of-two batch size up to max_running; rows leave one by one
                size = min(size, self.max_running)
                run([session() for _ in range(size)], [rng.integers(0, vocab, 64).tolist() for _ in range(size)],
                    [SamplingParams(max_new_tokens=decode + 2 * i, ignore_eos=True, seed=i, **sampler)
                     for i in range(size)])
                if size == self.max_running:
                    break
                size *= 2
        log_fn(f"warm-up done in {time.perf_counter() - started:.1f} s")
