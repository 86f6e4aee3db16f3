"""The engine thread: it admits requests, prefills them chunk by chunk between decode calls, and
decodes every running one together, through the core `Engine` (fixed decode slots per cache class).

Request flow:
1. A route validates a request, resolves its cache class, tokenizes its prompt, reserves its
   session and calls `submit`; the request waits in a bounded queue (full: `QueueFull`, the route
   answers 429).
2. Each engine iteration admits waiting requests whose class has a free decode slot, up to
   `max_running` at once (continuous batching), and starts their prefill: the session's pending
   token, then the new prompt, against the session's cache.
3. Short new prompts (no session cache, up to 256 tokens) are prefilled together, whole, in one call
   (while other rows decode: at most `interleave_tokens` of them). Otherwise it runs ONE prefill
   piece of the oldest admitted prompt, at most `interleave_chunk` tokens, while other rows decode,
   so a long prompt never stalls the running streams for more than one piece (when none decode: a
   piece of up to `max_chunk` tokens of every admitted prompt). When a prompt is all in, its first
   token is sampled and the sequence joins a decode slot.
4. Then one jitted call of up to `steps_per_call` decode steps for every running sequence; each new
   token goes to its request's sink as text (incremental detokenization with stop strings).
   Sequences that are finished or whose client went away retire: the cache goes back to the session,
   and the session is released.

The engine knows nothing of HTTP: a request's `sink` is any callable taking events (`TokenOut`,
`Finished` or `Failed`); the routes turn them into SSE or JSON. No JAX work ever runs on the asyncio
event loop, because only this thread touches the model and the caches; nothing compiles here
either, since every shape the core engine can reach was compiled at warm-up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from toyllm_core.serving.detokenize import TextStream
from toyllm_core.serving.engine import CacheClass, DecodeFailed, Prefill, Sequence
from toyllm_core.serving.engine import Engine as CoreEngine
from toyllm_core.serving.sampling import SamplingParams

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
    top: list[tuple[int, float]] | None = None  # the likeliest alternatives (id, logprob), when asked


@dataclass
class Finished:
    finish_reason: str  # length | stop | eos | cancelled
    generated_text: str
    prompt_tokens: int
    completion_tokens: int  # the tokens sent as `TokenOut`s: the end-of-text token is not one
    cache: dict  # Session.stats()
    timings: dict
    tail: str = ""  # the end of generated_text that no TokenOut carried (held back until the end of text)

    @property
    def usage(self) -> dict:
        """OpenAI's usage object (every route reports it the same way)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Failed:
    message: str
    status: int = 500  # what a non-streaming answer says: 500 for a fault, 503 when shutting down


SHUTTING_DOWN = "the server is shutting down"


@dataclass(eq=False)
class GenerationRequest:
    session: Session
    cls: CacheClass  # the class it runs in (a full session may move up to a larger one)
    prompt_ids: list[int]
    sampling: SamplingParams
    sink: Callable[[object], None]
    ephemeral: bool = False  # no session to keep (the OpenAI endpoint): drop the cache at the end
    chat: list[dict] | None = None  # a chat turn's messages: kept in the session with the reply appended
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Engine-side state.
    text: TextStream | None = None
    job: Prefill | None = None
    row: Sequence | None = None
    generated: int = 0  # tokens sent (the end-of-text token is not)
    tail: str = ""  # text the end-of-text token released (it has no TokenOut to carry it)
    started: float = 0.0
    prefill_s: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, core: CoreEngine, tokenizer, store: SessionStore, metrics: Metrics, *,
                 max_running: int = 32, queue_size: int = 64, interleave_chunk: int = 64,
                 interleave_tokens: int = 256):
        self.core = core
        self.tokenizer = tokenizer
        self.store = store
        self.metrics = metrics
        self.max_running = max_running
        self.queue_size = queue_size
        self.interleave_chunk = interleave_chunk
        self.interleave_tokens = interleave_tokens
        core.on_compress = self._compressed
        self._waiting: deque[GenerationRequest] = deque()
        self._admitted = 0  # taken from the queue, not yet prefilling: still counted against the bound
        self._prefilling: list[GenerationRequest] = []
        self._running: list[GenerationRequest] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._closed = False  # draining: no new request is taken, those already in go on
        # When a list: what the loop did, in order: ("prefill", request, tokens) per prefill piece and
        # ("decode", [requests]) per decode call (tests assert the interleaving from it).
        self.trace: list | None = None
        self._thread = threading.Thread(target=self._loop, name="toyllm-engine", daemon=True)

    # ------------------------------------------------------------------ called from other threads
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Take no new requests (the server drains before it stops); those already in go on."""
        with self._wake:
            self._closed = True

    @property
    def idle(self) -> bool:
        """Nothing waits, prefills or decodes."""
        with self._wake:
            return not (self._waiting or self.running)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; every request still in gets a `Failed` "the server is shutting down"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        return len(self._running) + len(self._prefilling) + self._admitted

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def capacity_bytes(self) -> int:
        """Bytes allocated for the decode slots of every cache class."""
        return self.core.capacity_bytes()

    def has_room(self) -> bool:
        return len(self._waiting) + self.running < self.max_running + self.queue_size

    def submit(self, request: GenerationRequest) -> None:
        with self._wake:
            if self._stopping or self._closed:
                raise EngineStopped(SHUTTING_DOWN)
            if len(self._waiting) + self.running >= self.max_running + self.queue_size:
                raise QueueFull(f"{self.running} requests running and {len(self._waiting)} waiting; retry later")
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
                while not (self._waiting or self._prefilling or self._running or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = deque(self._take_admissible())
                self._admitted = len(admitted)
            try:
                while admitted:  # each leaves the count once it is prefilling (or answered)
                    self._begin(admitted[0])
                    admitted.popleft()
                    self._admitted = len(admitted)
                self._retire_cancelled()
                # Short new prompts together in one call; then one piece of the oldest other prompt
                # while streams decode (they wait for it), unless short ones just took that turn; when
                # none decodes, a piece of every admitted prompt, so that a burst starts together.
                short = [r for r in self._prefilling if r.job.short]
                batched = bool(short) and self._prefill_short(short)
                others = [r for r in self._prefilling if not r.job.short]
                limit = self.interleave_chunk if self._running else None
                for request in others[: 0 if batched and self._running else 1 if self._running else None]:
                    self._prefill_piece(request, limit)
                if self._running:
                    self._decode()
            except Exception as e:
                log.exception("engine step failed")
                for request in admitted:  # taken from the queue but never begun: answer them too
                    self._fail(request, f"internal error in the decode loop: {e}")
                self._admitted = 0
                self._fail_all(f"internal error in the decode loop: {e}")
        self._fail_all(SHUTTING_DOWN, status=503)
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            self._fail(request, SHUTTING_DOWN, status=503)

    def _take_admissible(self) -> list[GenerationRequest]:
        """Waiting requests (in order) whose class has a free decode slot and a free prefill row, within
        max_running."""
        taken, free = [], {}
        for request in list(self._waiting):
            if self.running + len(taken) >= self.max_running:
                break
            cls, session = request.cls, request.session
            free.setdefault(cls, [self.core.free_slots(cls), self.core.free_prefill_rows(cls)])
            # A short new prompt needs a decode slot only; any other a prefill row too.
            short = self.core.takes_short(cls, len(session.feed(request.prompt_ids)), session.cache, session.cold)
            if free[cls][0] > 0 and (short or free[cls][1] > 0):
                free[cls][0] -= 1
                free[cls][1] -= not short
                taken.append(request)
                self._waiting.remove(request)
        return taken

    def _begin(self, request: GenerationRequest) -> None:
        session = request.session
        if request.cancelled.is_set():
            self.store.release(session)
            request.sink(Failed("cancelled before it started"))
            return
        request.started = time.perf_counter()
        self.metrics.queue_time.observe(request.started - request.arrived)
        try:  # the prefill holds the session's tiers now
            request.job = session.begin(self.core, request.prompt_ids, request.sampling, request.cls, user=request)
        except Exception as e:
            log.exception("prefill failed")
            self._discard(request, f"prefill failed ({e}); the session was discarded")
            return
        self._prefilling.append(request)

    def _prefill_short(self, requests: list[GenerationRequest]) -> bool:
        """Prefill the oldest short prompts together (while streams decode, at most interleave_tokens
        of them) and start them; True if any ran."""
        taken, tokens = [], 0
        for request in requests[: self.core.batch_rows]:
            n = len(request.job.tokens)
            if taken and self._running and tokens + n > self.interleave_tokens:
                break
            taken.append(request)
            tokens += n
        try:
            self.core.prefill_short([r.job for r in taken])
        except Exception as e:
            log.exception("prefill failed")
            for request in taken:
                self._prefilling.remove(request)
                self.core.cancel(request.job)
                self._discard(request, f"prefill failed ({e}); the session was discarded")
            return True
        for request in taken:
            if self.trace is not None:
                self.trace.append(("prefill", request, len(request.job.tokens)))
            self._prefilling.remove(request)
            self._start_or_discard(request)
        return True

    def _prefill_piece(self, request: GenerationRequest, limit: int | None) -> None:
        job = request.job
        before = job.done
        try:
            finished = self.core.prefill(job, limit)
        except Exception as e:
            log.exception("prefill failed")
            self._prefilling.remove(request)
            self.core.cancel(job)
            self._discard(request, f"prefill failed ({e}); the session was discarded")
            return
        if self.trace is not None:
            self.trace.append(("prefill", request, job.done - before))
        if finished:
            self._prefilling.remove(request)
            self._start_or_discard(request)

    def _start_or_discard(self, request: GenerationRequest) -> None:
        job = request.job
        try:
            self._start(request)
        except Exception as e:
            log.exception("starting a sequence failed")
            if request.row is None:
                self.core.cancel(job)
            else:
                if request in self._running:
                    self._running.remove(request)
                self.core.free(request.row)
            self._discard(request, f"could not start generating ({e}); the session was discarded")

    def _start(self, request: GenerationRequest) -> None:
        session, job = request.session, request.job
        seq = self.core.start(job)
        request.job, request.row = None, seq
        session.started(seq, request.prompt_ids)
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        request.prefill_s = time.perf_counter() - request.started
        self.metrics.prefill_duration.observe(request.prefill_s)
        request.text = TextStream(self.tokenizer, tuple(request.sampling.stop))
        self._emit(request, seq.pending, seq.first_logprob, seq.first_top)
        if seq.active:
            self._running.append(request)
        else:
            self._finish(request)

    def _decode(self) -> None:
        active = sum(r.row.active for r in self._running)
        started = time.perf_counter()
        try:
            outputs = self.core.step()
        except DecodeFailed as e:
            # Only the rows of the failed classes are lost; every other stream goes on.
            outputs = e.outputs
            for cls, rows, error in e.failures:
                log.error("decode call of class %s failed: %s", cls.name, error, exc_info=error)
                for request in [r.user for r in rows]:
                    self._running.remove(request)
                    self._discard(request, f"internal error while decoding ({error}); the session was discarded")
        elapsed = time.perf_counter() - started
        if self.trace is not None:
            self.trace.append(("decode", [o.seq.user for o in outputs]))
        steps = max((len(o.tokens) for o in outputs), default=1)
        for _ in range(steps):
            self.metrics.decode_step.observe(elapsed / steps)
            self.metrics.batch_size.observe(active)
        for out in outputs:
            request: GenerationRequest = out.seq.user
            try:
                for i, (token, logprob) in enumerate(zip(out.tokens, out.logprobs, strict=True)):
                    # Rows with stop strings decode one token per call, so nothing is cached past a stop.
                    if not request.text.stopped:
                        self._emit(request, token, logprob, out.top[i] if out.top else None)
                request.session.length = out.seq.length
            except Exception as e:
                log.exception("streaming a token failed")
                self._running.remove(request)
                self.core.free(request.row)
                self._discard(request, f"internal error while streaming ({e}); the session was discarded")
        for request in [r for r in self._running if not r.row.active]:
            self._retire(request)

    def _emit(self, request: GenerationRequest, token: int, logprob: float,
              top: list[tuple[int, float]] | None = None) -> None:
        """Hand one generated token to the request (the row already holds it as pending). The
        end-of-text token (end of turn) is the session's like any other, but not the client's: no
        `TokenOut`, not in completion_tokens nor in the generated-tokens counter (as OpenAI, vLLM)."""
        now = time.perf_counter()
        row = request.row
        request.session.emitted(token)
        eos = token == row.eos  # row.eos is -1 when the request ignores it
        text = "" if eos else request.text.push(token)
        if request.text.stopped:
            self.core.stop(row)
        final = request.text.stopped or eos or request.generated + 1 >= request.sampling.max_new_tokens
        if final:
            text += request.text.finish()
        if request.generated == 0:
            request.first_token_at = now
            self.metrics.ttft.observe(now - request.arrived)
        else:
            self.metrics.itl.observe(now - request.last_token_at)
        request.last_token_at = now
        if eos:
            request.tail = text  # text held back for a stop string (or a split character), released now
            return
        self.metrics.generation_tokens.inc()
        request.sink(TokenOut(request.generated, int(token), text, float(logprob), top))
        request.generated += 1

    def _retire_cancelled(self) -> None:
        for request in [r for r in self._prefilling if r.cancelled.is_set()]:
            # The prompt never got in: the session keeps what it had before this request, if anything.
            self._prefilling.remove(request)
            self.core.cancel(request.job)
            self._discard(request, "cancelled while its prompt was prefilled; the session was discarded")
        for request in [r for r in self._running if r.cancelled.is_set()]:
            self.core.stop(request.row)
            self._retire(request, cancelled=True)

    def _retire(self, request: GenerationRequest, cancelled: bool = False) -> None:
        self._running.remove(request)
        self._finish(request, cancelled)

    def _finish(self, request: GenerationRequest, cancelled: bool = False) -> None:
        session, row = request.session, request.row
        session.finish(self.core, row, keep=not request.ephemeral)  # the tiers come back to the session
        if cancelled:
            reason = "cancelled"
        elif request.text.stopped:
            reason = "stop"
        elif row.eos >= 0 and row.pending == row.eos:
            reason = "eos"
        else:
            reason = "length"
        if row.compressions:  # the prefill's and the decoding's
            policy = session.policy.name
            self.metrics.compressions.labels(policy).inc(row.compressions)
            self.metrics.evicted.labels(policy).inc(row.tokens_evicted)
        if row.reselections:
            self.metrics.reselections.labels(session.policy.name).inc(row.reselections)
            self.metrics.recalled.labels(session.policy.name).inc(row.recalled)
        if request.chat is not None:
            session.replied(request.chat, request.text.text)
        self.store.release(session, turned=True)  # written to the session backend behind
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
                              session.stats(), timings, request.tail))

    def _compressed(self, cls: CacheClass, rows: int, seconds: float) -> None:
        self.metrics.compression_duration.labels(cls.policy.name).observe(seconds)

    def _fail(self, request: GenerationRequest, message: str, status: int = 500) -> None:
        self.store.release(request.session)
        request.sink(Failed(message, status))

    def _discard(self, request: GenerationRequest, message: str, status: int = 500) -> None:
        """A request whose session cannot be trusted any more: drop the session, tell the client."""
        request.session.discard()
        self.store.discard(request.session)
        self._fail(request, message, status)

    def _fail_all(self, message: str, status: int = 500) -> None:
        for request in self._running + self._prefilling:
            self._discard(request, message, status)
        self._running, self._prefilling = [], []
        self.core.reset()
