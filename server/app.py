"""The FastAPI app: `create_app(settings)` builds it; the lifespan loads the checkpoint, starts the
engine, warms it up (compiles the serving shapes), and only then lets /ready answer 200."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import jax
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from toyllm_core.chat import ChatTemplate
from toyllm_core.machine import memory_maps, peak_rss_bytes, reset_peak_rss
from toyllm_core.serving.engine import Engine as CoreEngine
from toyllm_core.serving.engine import plan_classes, warm_up
from toyllm_core.serving.executables import ProgramStore
from toyllm_core.serving.policies import make_policy, parse_policy, policy_class, policy_names
from toyllm_core.serving.policies.kvzip import repeat_prompt_ids
from toyllm_core.weights import load_model

from .engine import Engine
from .errors import install
from .metrics import Metrics
from .middleware import RequestGuard
from .persistence import Persistence, open_backend
from .pressure import PressureRelief
from .routes import generate, health, openai, sessions
from .schemas import SEED_LIMIT
from .sessions import SessionStore
from .settings import Settings
from .state import ServerState

log = logging.getLogger("toyllm.server")


def _start(state: ServerState) -> None:
    """Load, start the engine and warm up (runs in a worker thread: it takes seconds to minutes)."""
    s = state.settings
    started = time.perf_counter()
    loaded = load_model(None if s.preset else s.checkpoint, s.preset, s.dtype, s.quant)
    model, tokenizer, name, digest = loaded.model, loaded.tokenizer, loaded.name, loaded.sha256
    peak_rss = {"load": peak_rss_bytes()}
    reset_peak_rss()  # each phase's own peak
    state.model, state.tokenizer, state.model_name, state.checkpoint_sha256 = model, tokenizer, name, digest
    source = s.chat_template.read_text() if s.chat_template is not None else None
    state.chat = ChatTemplate.of(tokenizer, source)
    if state.chat is not None:
        state.end_of_turn = state.chat.end_of_turn(tokenizer)
    cfg = model.cfg
    state.default_policy = make_policy(s.cache_policy, **_default_params(s))
    policies = [state.default_policy] + [parse_policy(text) for text in s.cache_classes]
    full_tokens = s.full_cache_tokens or [n for n in (2048,) if n < cfg.context_length] + [cfg.context_length]
    if max(full_tokens) > cfg.context_length:
        raise ValueError(f"full_cache_tokens {full_tokens} go past the model context ({cfg.context_length})")
    if s.interleave_chunk > s.max_prefill_chunk:
        raise ValueError("interleave_chunk must not exceed max_prefill_chunk")
    window = s.prefill_window or max(s.max_prefill_chunk, s.max_prompt_tokens + s.cache_slack)
    state.classes = plan_classes(policies, model.kv_bytes_per_token, s.max_concurrent_requests,
                                 s.decode_state_bytes, s.max_prefill_chunk, full_tokens, window,
                                 s.prefill_state_bytes, s.cold_tokens)
    memory = [c.memory(model.kv_bytes_per_token) for c in state.classes]
    m = state.metrics
    state.store = SessionStore(s.max_sessions, s.session_ttl_s, s.max_cache_bytes, model.kv_bytes_per_token,
                               on_created=m.sessions_created.inc,
                               on_evicted=lambda reason: m.sessions_evicted.labels(reason).inc(),
                               client_max_sessions=s.client_max_sessions,
                               client_max_cache_bytes=s.client_max_cache_bytes)
    backend_url = s.session_store or (str(Path(s.session_dir).expanduser()) if s.session_dir else None)
    stored = 0
    if backend_url:
        holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        state.store.persistence = Persistence(open_backend(backend_url, s.session_ttl_s), state.classes,
                                              model.kv_bytes_per_token, holder, f"{name}/{digest}/{s.dtype}/{s.quant}",
                                              s.session_lease_s, on_saved=m.sessions_saved.inc)
        state.store.on_loaded = m.sessions_loaded.inc
        state.store.persistence.start()
        stored = len(state.store.persistence.backend.list())
        log.info("sessions are stored in %s (%d there now)", "Redis" if s.session_store else backend_url, stored)
    state.pressure = PressureRelief(state.store, on_step=m.pressure_step)
    state.store.on_pressure = state.pressure.wake
    core = CoreEngine(model, state.classes, steps_per_call=s.steps_per_call, batch_rows=s.max_concurrent_requests,
                      repeat_prompt=repeat_prompt_ids(tokenizer, state.chat))
    core.allocate_states()
    state.engine = Engine(core, tokenizer, state.store, m, max_running=s.max_concurrent_requests,
                          queue_size=s.queue_size, interleave_chunk=s.interleave_chunk,
                          interleave_tokens=s.interleave_tokens)
    state.info = {
        "model": {"name": name, "vocab_size": cfg.vocab_size, "context_length": cfg.context_length,
                  "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                  "n_kv_heads": cfg.n_kv_heads, "parameters": cfg.num_params(), "dtype": s.dtype,
                  "quant": s.quant, "weight_bytes": model.weight_bytes},
        "checkpoint": {"path": None if s.preset else str(s.checkpoint), "sha256": digest},
        "chat": {"template": state.chat is not None, "end_of_turn_token_id": state.end_of_turn},
        "kv_bytes_per_token": model.kv_bytes_per_token,
        "policies": policy_names(),
        "default_cache": state.default_policy.describe(),
        "cache_classes": [c.describe(model.kv_bytes_per_token) for c in state.classes],
        # Decode slots are allocated when a class first decodes; prefill caches while prompts prefill (at most
        # prefill_rows per class), a new turn's recalled cache (hot ∪ cold) while it prefills (one at a time).
        "memory": {"decode_bytes": sum(m["decode_bytes"] for m in memory),
                   "prefill_bytes": sum(m["prefill_bytes"] for m in memory),
                   "reselect_bytes": max(m["reselect_bytes"] for m in memory)},
        "sessions": {"store": "redis" if s.session_store else "directory" if backend_url else None,
                     "stored_at_start": stored},
        "limits": {"max_sessions": s.max_sessions, "session_ttl_s": s.session_ttl_s,
                   "max_cache_bytes": s.max_cache_bytes, "max_concurrent_requests": s.max_concurrent_requests,
                   "queue_size": s.queue_size, "max_prompt_tokens": s.max_prompt_tokens,
                   "max_new_tokens": s.max_new_tokens, "max_body_bytes": s.max_body_bytes},
        "backend": {"platform": jax.default_backend(), "devices": [str(d) for d in jax.devices()]},
        "peak_rss_bytes": peak_rss,  # by phase; /info adds "serving" (since ready)
        "engine": {"steps_per_call": s.steps_per_call, "max_prefill_chunk": s.max_prefill_chunk,
                   "interleave_chunk": s.interleave_chunk, "interleave_tokens": s.interleave_tokens,
                   "prefill_window": window,
                   "cold_tokens": s.cold_tokens},
    }
    if s.warmup:
        store = _program_store(s.compile_cache_dir)
        report = warm_up(model, state.classes, s.steps_per_call, log=log.info,
                         batch_rows=state.engine.core.batch_rows, store=store)
        report["compile_cache_dir"] = s.compile_cache_dir or None
        report["compile_cache_bytes"] = store.disk_bytes()
        maps = memory_maps()
        if maps is not None:
            report["memory_maps"], report["max_map_count"] = maps
            if maps[0] > maps[1] * 3 // 4:
                log.warning("the compiled programs hold %d of the %d memory maps a process may have "
                            "(vm.max_map_count); more cache classes could crash a compile: raise it "
                            "(sysctl -w vm.max_map_count=262144)", *maps)
        state.info["warmup"] = report
        peak_rss["warm_up"] = peak_rss_bytes()
        log.info("warm-up: %d programs (%d loaded whole, %d compiled) in %.1f s",
                 report["programs"], report["loaded"], report["compilations"], report["seconds"])
    reset_peak_rss()  # from here on, /info's "serving"
    state.pressure.start()
    state.engine.start()
    log.info("%s ready in %.1f s", name, time.perf_counter() - started)


def _program_store(compile_cache_dir: str) -> ProgramStore:
    """Where a start keeps its built programs whole, so the next start loads them without tracing
    or compiling; memory only (every start compiles) without a compile cache directory."""
    if compile_cache_dir:
        try:
            return ProgramStore(Path(compile_cache_dir) / "programs")
        except OSError as e:
            log.warning("cannot keep built programs in %s (%s): compiling every program", compile_cache_dir, e)
    return ProgramStore()


def _default_params(s: Settings) -> dict:
    """The default cache's parameters from the settings (only those its policy takes)."""
    given = {"budget": s.cache_budget, "sink_size": s.cache_sink_size, "window_size": s.cache_window_size,
             "slack": s.cache_slack, "cold_bits": s.cache_cold_bits}
    fields = policy_class(s.cache_policy).__dataclass_fields__
    return {k: v for k, v in given.items() if k in fields}


async def _expire_sessions(state: ServerState) -> None:
    while True:
        await asyncio.sleep(min(30.0, state.settings.session_ttl_s / 4))
        if state.store is not None:
            await run_in_threadpool(state.store.expire)  # may sweep the session store: disk or network


def _exact_openapi(app: FastAPI) -> dict:
    """FastAPI's OpenAPI document, with the seed bound written exactly: FastAPI types numeric bounds
    as floats, and 2^64 as a float prints as 1.8446744073709552e+19, a bound 384 past the real one."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)

        def exact(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if key.endswith(("aximum", "inimum")) and value == float(SEED_LIMIT):
                        node[key] = SEED_LIMIT
                    else:
                        exact(value)
            elif isinstance(node, list):
                for item in node:
                    exact(item)

        exact(schema)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServerState(settings=settings, metrics=Metrics())
    state.metrics.watch(state.live)
    state.metrics.init_labels(policy_names())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so that /health and /ready answer while the model warms up.
        async def start():
            try:
                await run_in_threadpool(_start, state)
                state.ready = True
            except Exception as e:  # noqa: BLE001 - reported by /health, /ready and the log
                state.load_error = str(e)
                log.error("cannot start: %s", e)
                if state.request_exit is not None:  # under `toyllm serve`: exit non-zero, as orchestrators expect
                    state.request_exit()

        loading = asyncio.create_task(start())
        expiring = asyncio.create_task(_expire_sessions(state))
        try:
            yield
        finally:
            state.shutting_down = True
            expiring.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await loading
            if state.engine is not None:
                await run_in_threadpool(state.engine.stop)
            if state.pressure is not None:
                state.pressure.stop()
            if state.store is not None and state.store.persistence is not None:
                await run_in_threadpool(state.store.persistence.stop)  # every finished turn written

    # Swagger UI and ReDoc from assets packaged on PyPI (fastapi-offline): /docs works offline.
    app = FastAPIOffline(title="ToyLLM Serve", version="0.1.0", lifespan=lifespan,
                         description="A small-model inference server with KV-cache compression.")
    app.state.toyllm = state
    app.openapi = partial(_exact_openapi, app)
    install(app)
    # The playground: static files inside the package (no CDN; it calls this server's API only).
    app.mount("/playground", StaticFiles(directory=Path(__file__).parent / "playground", html=True), name="playground")
    for module in (health, generate, sessions, openai):
        app.include_router(module.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Session-ID"])
    app.add_middleware(RequestGuard, state=state)  # outermost: the body limit holds before anything reads
    return app
