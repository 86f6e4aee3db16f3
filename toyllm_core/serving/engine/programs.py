"""Every program the engine compiles, listed in closed form from its cache classes, and the warm-up
that compiles them.

Per class: its decode state, a new prefill cache, each prefill chunk length at each attention span
of the prefill cache, the moves between the prefill cache, the decode slots and an idle session
(insert, extract, move, resize), compression (of the prefill cache, and of a decode row), and the
decode call at each compiled batch size and attention span of the decode rows (one program for
every sampling setting: the sampler picks its path at run time). A tiered class adds a
new turn's programs: the rewinding of the session's last reply, the recall of hot ∪ cold for each
cold-length bucket, the chunks of the prompt's last tokens against them, and the re-selection.
Plus the first-token sampler. No request can reach a shape outside this list: prompt lengths are
cut into the listed chunks, batch sizes are the listed buckets, and a cache configuration outside
the classes is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from ... import jit_stats
from ...machine import release_free_heap
from ..cache import empty_cache
from ..executables import ProgramStore
from ..model import ToyLLM
from ..sampling import first_token_program
from ..tiers import ColdTier
from . import steps
from .classes import (
    MAX_BATCH_ROWS,
    SHORT_PROMPT,
    CacheClass,
    batch_chunks,
    batch_signals,
    batch_sizes,
    chunk_sizes,
    row_buckets,
    spans,
)


@dataclass(frozen=True)
class Program:
    kind: str  # new-state, new-prefill, chunk, compress, fit, insert, extract, move, compress-rows, decode,
    # grow, truncate, recall, recall-chunk, reselect, batch-new, batch-chunk, batch-take, batch-insert, batch-row,
    # first-token

    cls: CacheClass | None
    size: int = 0  # chunk length, decode or batch rows, or the capacity grown from
    span: int = 0  # chunk, decode: the slots attended over
    width: int = 0  # batch-chunk: the prompts' padded length

    def __str__(self) -> str:
        return " ".join([self.kind] + ([self.cls.name] if self.cls else []) + ([str(self.size)] if self.size else [])
                        + ([f"span {self.span}"] if self.span else []) + ([f"x {self.width}"] if self.width else []))


def programs(classes: list[CacheClass], batch_rows: int = MAX_BATCH_ROWS) -> list[Program]:
    """Every program of an engine over `classes` that prefills up to `batch_rows` short prompts together."""
    out = []
    rows = batch_sizes(batch_rows)
    out += [Program(kind, None, k) for kind in ("batch-new", "batch-take") for k in rows]
    out += [Program("batch-chunk", None, k, width=n) for k in rows for n in batch_chunks()]
    full = sorted((c for c in classes if not c.evicts), key=lambda c: c.capacity)
    for cls in classes:
        out += [Program("new-state", cls), Program("new-prefill", cls)]
        out += [Program("chunk", cls, n, span) for span in cls.prefill_spans
                for n in chunk_sizes(cls.max_chunk) if n <= span]
        out += [Program("chunk", cls, cls.max_chunk, span) for span in cls.reconstruct_spans
                if span not in cls.prefill_spans]
        if cls.evicts:
            out += [Program("compress-rows", cls, n) for n in row_buckets(cls.slots)]
            out += [Program("compress", cls), Program("fit", cls),
                    Program("grow", cls, cls.capacity)]
            if cls.policy.reconstructs:  # a reconstruction pass: signals cleared, chunks run and cut off
                out.append(Program("clear", cls))
            if cls.tiered or cls.policy.reconstructs:
                out.append(Program("truncate", cls))  # the last reply rewound; a reconstruction cut off
            if cls.tiered:  # a new turn over hot ∪ cold: recalled per cold-length bucket
                out += [Program("recall", cls, n) for n in cls.cold_buckets]
                out += [Program("recall-chunk", cls, n) for n in chunk_sizes(cls.tail_chunk)]
                out.append(Program("reselect", cls))
        else:  # a full session moves up from a smaller full class
            out += [Program("grow", cls, small.capacity) for small in full if small.capacity < cls.capacity]
        # Rows go into and between decode slots by their live prefix (untouched pages stay so).
        out += [Program(kind, cls, span=span) for kind in ("insert", "move") for span in spans(cls.capacity)]
        out.append(Program("extract", cls))
        takes = [n for n in (1, SHORT_PROMPT) if cls.takes_short(n)]
        if takes:  # a short prompt's row of a batch into a decode slot, or as an idle cache
            out += [Program("batch-insert", cls), Program("batch-row", cls)]
        out += [Program("decode", cls, n, span) for n in row_buckets(cls.slots) for span in spans(cls.capacity)]
    out.append(Program("first-token", None))
    return out


def compile_program(model: ToyLLM, p: Program, steps_per_call: int, classes: list[CacheClass],
                    store: ProgramStore | None = None) -> None:
    """Build one program for its input shapes without running it: loaded whole from `store`'s
    directory, or lowered and compiled (or read from JAX's persistent compilation cache) and saved
    there. Caches are given as shapes only, so that warming a class does not allocate its decode
    state once per program."""
    store = store or ProgramStore()
    cls, cfg = p.cls, model.cfg

    def cache(batch: int, capacity: int):
        return jax.eval_shape(lambda: steps.new_cache(model, cls, batch, capacity))

    def build(fn, *args, **kwargs):
        store.build(fn, *args, **kwargs)

    if p.kind.startswith("batch"):
        wants = batch_signals(classes)
        batch = lambda: jax.eval_shape(lambda: steps.new_batch_cache(model, p.size, wants))
        row = lambda: jax.eval_shape(lambda: steps.new_batch_cache(model, 1, wants))
        if p.kind == "batch-new":
            build(empty_cache, cfg, p.size, SHORT_PROMPT, model.dtype, wants)
        elif p.kind == "batch-chunk":
            build(steps.prefill_batch, model, batch(), np.zeros((p.size, p.width), np.int32),
                  np.zeros(p.size, np.int32), span=SHORT_PROMPT)
        elif p.kind == "batch-take":
            build(steps.batch_take, batch(), np.int32(0))
        elif p.kind == "batch-insert":
            build(steps.insert_batch_row, cache(cls.slots, cls.capacity), np.int32(0), row(), cls=cls)
        else:
            build(steps.batch_row, row(), cls=cls)
        return
    state, prefill = (lambda: cache(cls.slots, cls.capacity)), (lambda: cache(1, cls.prefill_capacity))
    if p.kind == "new-state":
        build(empty_cache, cfg, cls.slots, cls.capacity, model.dtype, cls.policy.signals)
    elif p.kind == "new-prefill":
        build(empty_cache, cfg, 1, cls.prefill_capacity, model.dtype, cls.policy.signals)
    elif p.kind == "chunk":
        build(steps.prefill_chunk, model, prefill(), np.zeros((1, p.size), np.int32), np.array([p.size], np.int32),
              span=p.span)
    elif p.kind == "compress":
        build(steps.compress_cache, prefill(), cls=cls)
    elif p.kind == "fit":
        build(steps.resize, prefill(), capacity=cls.capacity)
    elif p.kind == "grow":
        build(steps.resize, cache(1, p.size), capacity=cls.prefill_capacity)
    elif p.kind == "insert":
        build(steps.insert_row, state(), np.int32(0), prefill(), cls=cls, span=p.span)
    elif p.kind == "extract":
        build(steps.extract_row, state(), np.int32(0))
    elif p.kind == "move":
        build(steps.move_row, state(), np.int32(1 % cls.slots), np.int32(0), span=p.span)
    elif p.kind == "clear":
        build(steps.clear_signals, prefill())
    elif p.kind == "truncate":
        build(steps.truncate, prefill(), np.int32(0))
    elif p.kind == "recall":
        cold = ColdTier.empty(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cls.policy.cold_bits).upload(p.size)
        build(steps.recall, prefill(), cold, cls=cls)
    elif p.kind == "recall-chunk":
        build(steps.prefill_chunk, model, cache(1, cls.recall_capacity), np.zeros((1, p.size), np.int32),
              np.array([p.size], np.int32), span=cls.recall_capacity)
    elif p.kind == "reselect":
        recalled = cache(1, cls.recall_capacity)
        build(steps.reselect, recalled, jax.ShapeDtypeStruct(recalled.pos.shape, np.int32), cls=cls)
    elif p.kind == "compress-rows":
        build(steps.compress_rows, state(), np.zeros(p.size, np.int32), cls=cls)
    elif p.kind == "decode":
        inputs = np.zeros((p.size, len(steps.DECODE_INPUTS)), np.int32)
        build(steps.decode_steps, model, state(), np.int32(1), inputs, n_rows=p.size, max_steps=steps_per_call,
              span=p.span)
    elif p.kind == "first-token":
        build(first_token_program, jax.ShapeDtypeStruct((cfg.vocab_size,), np.float32),
              jax.ShapeDtypeStruct((2,), np.uint32), np.float32(1), np.int32(1), np.float32(1), np.bool_(False))
    else:
        raise ValueError(f"unknown program kind {p.kind!r}")


def _drop_lowering_cache() -> None:
    try:
        from jax._src.interpreters import pxla
        pxla._cached_lowering_to_hlo.cache_clear()
    except (ImportError, AttributeError):
        pass


def warm_up(model: ToyLLM, classes: list[CacheClass], steps_per_call: int,
            log: Callable[[str], None] = print, every_s: float = 5.0, batch_rows: int = MAX_BATCH_ROWS,
            store: ProgramStore | None = None) -> dict:
    """Compile every program, logging progress (`warm-up: 12/46 programs, 38 s`) at least every
    `every_s` seconds; returns {"programs", "compilations" (programs built: compiled or read from the
    persistent compilation cache), "cache_hits" (read), "loaded" (read whole from `store`'s directory,
    neither traced nor compiled), "saved" (written there), "seconds", "per_kind": {kind: seconds}}.
    One at a time: compiling on a thread per core saved ~15% of a warm start here, and a test
    process that had done so later aborted inside an XLA compile."""
    todo = programs(classes, batch_rows)
    store = store or ProgramStore()
    loaded_before, saved_before = store.loaded, store.saved
    started = last = time.perf_counter()
    compiled_before, hits_before = jit_stats.compilations(), jit_stats.cache_hits()
    per_kind: dict[str, float] = {}
    for i, p in enumerate(todo, 1):
        t0 = time.perf_counter()
        compile_program(model, p, steps_per_call, classes, store)
        now = time.perf_counter()
        per_kind[p.kind] = per_kind.get(p.kind, 0.0) + now - t0
        if now - last >= every_s or i == len(todo):
            log(f"warm-up: {i}/{len(todo)} programs, {now - started:.0f} s")
            last = now
        if i % 16 == 0:  # keeps the warm-up's own peak down (trimming the heap as often cost ~2 s)
            _drop_lowering_cache()
    _drop_lowering_cache()
    release_free_heap()
    seconds = time.perf_counter() - started
    return {"programs": len(todo), "compilations": jit_stats.compilations() - compiled_before,
            "cache_hits": jit_stats.cache_hits() - hits_before,
            "loaded": store.loaded - loaded_before, "saved": store.saved - saved_before,
            "seconds": seconds, "per_kind": per_kind}
