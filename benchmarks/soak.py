"""Soak test of a running server: well-behaved multi-turn clients next to a hostile one, for minutes.

    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid $(pgrep -f 'toyllm serve' | head -1) \
        --duration 600 --clients 16 --turns 4 --max-new-tokens 32 --json out/soak.json

Well-behaved clients loop until --duration is over. Half of them hold multi-turn `/generate` sessions
(streaming; the first turn creates the session, whose id the X-Session-ID response header carries,
later turns send it back), the other half multi-turn `/v1/chat/completions` sessions (POST /sessions
first, `session_id` in the body, streaming, the whole conversation sent each turn as OpenAI clients
do). Prompts are 20-40 words of plain English, temperature 0.7 with a seed per request. After a
session's last turn the client reads GET /sessions/{id}/cache once (must be 200) and deletes the
session (must be 204). Every token event or content chunk is timed on arrival: TTFT and every
inter-token interval. A non-2xx answer, a stream without its final event (`event: done` /
`data: [DONE]`), an error event or an exception is an error of a well-behaved client.

The hostile client (--hostile, on by default) loops over requests the server must refuse or survive
(out-of-range seeds, top_k, temperature and cache configs, unsupported OpenAI fields, oversized and
chunked bodies, invalid UTF-8, a ~900 KB prompt, a proxy's X-New-Session-ID header sent by a
client, a mid-stream disconnect, a second request on a busy session, the cache read and DELETE of a
busy session, unknown sessions, 30 distinct cache configs in a row), ~0.2 s apart, and records for
each kind the statuses seen and any answer that was a 5xx, unexpected, or took over 30 s. It
deletes the sessions it creates (retrying on 409).

With --pid the server's resident memory (VmRSS of /proc/PID/status) is sampled every 5 s. At the
end, once every client has finished and deleted its sessions, /metrics gives the live cache bytes
(all policies), active sessions and running requests, which should all be back to 0.

Exit status 0 when the well-behaved clients saw no error, the hostile one no 5xx or unexpected
status, and the cache bytes are back to 0; 1 otherwise (2: bad arguments or unreachable server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from toyllm_core.machine import cpu_model, machine

# Plain English prose; prompts are 20-40 consecutive words of these sentences in a random order.
_SENTENCES = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp before the ships came in.",
    "Most rivers in the region flood in early spring, when the snow on the mountains begins to melt.",
    "She opened the letter slowly, afraid of what her brother might have written after so many years.",
    "The city council voted to build a new library near the station, with a reading room for children.",
    "Bread rises because yeast turns sugar into gas, which is trapped in the stretchy dough.",
    "After the storm the fishermen mended their nets on the beach and talked about the price of fuel.",
    "A good map shows not only roads and towns but also the hills, forests and streams between them.",
    "The orchestra tuned their instruments while the audience slowly found their seats in the dark hall.",
    "Farmers in the valley grow wheat, barley and potatoes, and keep a few cows for milk and cheese.",
    "The museum has a large collection of coins from the Roman period, found in fields near the river.",
    "When the train was late again, the passengers on the platform began to complain to each other.",
    "Honey bees visit thousands of flowers every day and carry pollen from one plant to the next.",
    "The history of the town goes back to a small market where traders met to sell wool and salt.",
    "He learned to play the piano as a child, and later he wrote songs for a band in his home town.",
    "In winter the lake freezes so hard that people walk across it and children skate near the shore.",
    "The new bridge was finished in the autumn, two years after the old wooden one was washed away.",
    "Scientists measured the temperature of the sea at different depths to study how the water moves.",
    "Her garden was full of roses, tomatoes and tall sunflowers that turned to follow the sun.",
    "The school football team won the final match of the season after a long and difficult game.",
    "Many birds fly south in the autumn and return in the spring to build their nests in the same trees.",
    "The teacher asked the students to write a short story about a journey they would like to take.",
    "During the war the castle was used as a hospital, and later it became a school for young girls.",
    "The baker starts work at four in the morning so that fresh bread is ready when the shop opens.",
    "A small boat carried the letters and food to the island once a week when the weather was calm.",
]
_WORDS = " ".join(_SENTENCES).split()
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in a few sentences."}

ATTACKER_ID = "attacker-chosen-id-0123456789abcdef"
BURST_S = 0.001  # consecutive tokens closer than this arrived in one burst
SLOW_S = 30.0  # a hostile request slower than this is reported
DELETE_PATIENCE_S = 120.0  # how long the hostile client retries DELETE on 409
JSON = {"content-type": "application/json"}


class BenchError(Exception):
    """A failure reported as one line, exit status 2."""


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


def make_prompt(rng: np.random.Generator) -> str:
    """20-40 words of consecutive English prose, starting anywhere in a random order of sentences."""
    order = rng.permutation(len(_SENTENCES))
    words = " ".join(_SENTENCES[i] for i in order).split()
    n = int(rng.integers(20, 41))
    start = int(rng.integers(0, len(words) - n))
    return " ".join(words[start:start + n])


def scrape(text: str) -> dict:
    """The gauges the report needs (cache bytes summed over policies) and the compilation counter."""
    out = {"toyllm_kv_cache_bytes": 0.0, "toyllm_sessions_active": None, "toyllm_requests_running": None,
           "toyllm_requests_waiting": None, "toyllm_jit_compilations_total": None,
           "kv_cache_bytes_by_policy": {}}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        if name == "toyllm_kv_cache_bytes":
            out["toyllm_kv_cache_bytes"] += float(value)
            policy = labels.rstrip("}").partition("=")[2].strip('"')
            out["kv_cache_bytes_by_policy"][policy] = float(value)
        elif name in out:
            out[name] = float(value)
    return out


async def read_metrics(client: httpx.AsyncClient) -> dict:
    r = await client.get("/metrics")
    if r.status_code != 200:
        raise BenchError(f"GET /metrics answered {r.status_code}")
    return scrape(r.text)


# ------------------------------------------------------------------- well-behaved clients
@dataclass
class Request:
    kind: str  # generate | chat
    client: int
    turn: int
    started: float  # perf_counter
    status: int | None = None
    completed: bool = False  # the final event arrived and no error event
    error: str = ""
    ttft_s: float | None = None
    arrivals: list[float] = field(default_factory=list)  # perf_counter of every token event / content chunk
    usage: dict | None = None

    @property
    def itl_s(self) -> list[float]:
        return np.diff(self.arrivals).tolist() if len(self.arrivals) > 1 else []


@dataclass
class Well:
    """What the well-behaved clients saw."""

    requests: list[Request] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)  # session operations: "POST /sessions 201", ...
    errors: int = 0
    messages: list[str] = field(default_factory=list)  # the first 20
    sessions: int = 0
    chat_reprefilled: int = 0  # continued chat turns whose prompt was the whole conversation again

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < 20:
            self.messages.append(f"{time.strftime('%H:%M:%S')} {message}")


async def generate_turn(client: httpx.AsyncClient, well: Well, cid: int, turn: int, body: dict,
                        session_id: str | None) -> tuple[Request, str | None]:
    """One streaming /generate; returns the record and the session id of the answer."""
    headers = {"X-Session-ID": session_id} if session_id else {}
    rec = Request("generate", cid, turn, time.perf_counter())
    got_id = None
    event = None
    errored = False
    try:
        async with client.stream("POST", "/generate", json=body, headers=headers) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                rec.error = f"/generate answered {r.status_code}: {r.text[:200]}"
            else:
                got_id = r.headers.get("x-session-id")
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        if event == "token":
                            now = time.perf_counter()
                            if rec.ttft_s is None:
                                rec.ttft_s = now - rec.started
                            rec.arrivals.append(now)
                        elif event == "done":
                            rec.completed = not errored
                            try:
                                rec.usage = json.loads(line[5:]).get("usage")
                            except ValueError:
                                pass
                        elif event == "error":
                            errored = True
                            rec.completed = False
                            rec.error = f"/generate error event: {line[5:].strip()[:200]}"
                if not rec.completed and not rec.error:
                    rec.error = f"/generate stream ended without `event: done` after {len(rec.arrivals)} tokens"
                if got_id is None and not rec.error:
                    rec.error = "/generate answered without an X-Session-ID header"
    except httpx.HTTPError as e:
        rec.completed = False
        rec.error = f"/generate: {describe(e)} after {len(rec.arrivals)} tokens"
    well.requests.append(rec)
    if rec.error:
        well.error(f"client {cid} turn {turn}: {rec.error}")
    return rec, got_id


async def chat_turn(client: httpx.AsyncClient, well: Well, cid: int, turn: int,
                    body: dict) -> tuple[Request, str]:
    """One streaming chat completion; returns the record and the reply's text."""
    rec = Request("chat", cid, turn, time.perf_counter())
    reply = []
    errored = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                rec.error = f"/v1/chat/completions answered {r.status_code}: {r.text[:200]}"
            else:
                async for line in r.aiter_lines():
                    if line.startswith("event:") and line[6:].strip() == "error":
                        errored = True
                        rec.error = "/v1/chat/completions sent `event: error`"
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        rec.completed = not errored
                        continue
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        errored = True
                        rec.error = f"/v1/chat/completions sent a chunk that is not JSON: {data[:200]}"
                        continue
                    if "error" in chunk:
                        errored = True
                        rec.completed = False
                        rec.error = f"/v1/chat/completions error chunk: {data[:200]}"
                        continue
                    if chunk.get("usage"):
                        rec.usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            now = time.perf_counter()
                            if rec.ttft_s is None:
                                rec.ttft_s = now - rec.started
                            rec.arrivals.append(now)
                            reply.append(text)
                if not rec.completed and not rec.error:
                    rec.error = (f"/v1/chat/completions stream ended without `data: [DONE]` after "
                                 f"{len(rec.arrivals)} chunks")
    except httpx.HTTPError as e:
        rec.completed = False
        rec.error = f"/v1/chat/completions: {describe(e)} after {len(rec.arrivals)} chunks"
    well.requests.append(rec)
    if rec.error:
        well.error(f"client {cid} turn {turn}: {rec.error}")
    return rec, "".join(reply)


async def end_session(client: httpx.AsyncClient, well: Well, cid: int, session_id: str, inspect: bool) -> None:
    """GET the session's cache once (after a clean last turn) and DELETE it."""
    try:
        if inspect:
            r = await client.get(f"/sessions/{session_id}/cache")
            well.ops[f"GET /sessions/{{id}}/cache {r.status_code}"] += 1
            if r.status_code != 200:
                well.error(f"client {cid}: GET /sessions/{{id}}/cache answered {r.status_code}: {r.text[:200]}")
        # After a failed turn the session may still be busy for a moment.
        deadline = time.perf_counter() + (0 if inspect else 30)
        while True:
            r = await client.delete(f"/sessions/{session_id}")
            if r.status_code == 409 and time.perf_counter() < deadline:
                await asyncio.sleep(0.2)
                continue
            break
        well.ops[f"DELETE /sessions/{{id}} {r.status_code}"] += 1
        if r.status_code != 204:
            well.error(f"client {cid}: DELETE /sessions/{{id}} answered {r.status_code}: {r.text[:200]}")
    except httpx.HTTPError as e:
        well.error(f"client {cid}: session clean-up: {describe(e)}")


async def generate_client(client: httpx.AsyncClient, well: Well, cid: int, args, deadline: float) -> None:
    rng = np.random.default_rng([args.seed, cid])
    while time.perf_counter() < deadline:
        session_id = None
        clean = True
        well.sessions += 1
        for turn in range(args.turns):
            if turn and time.perf_counter() >= deadline:
                break
            prompt = make_prompt(rng)
            body = {"prompt": prompt if turn == 0 else " " + prompt, "max_new_tokens": args.max_new_tokens,
                    "temperature": 0.7, "seed": int(rng.integers(2**63)), "stream": True}
            if session_id:
                body["session_id"] = session_id
            rec, got = await generate_turn(client, well, cid, turn, body, session_id)
            session_id = session_id or got
            if rec.error:
                clean = False
                break
        if session_id:
            await end_session(client, well, cid, session_id, inspect=clean)
        elif not clean:
            await asyncio.sleep(0.5)  # refused outright: do not spin


async def chat_client(client: httpx.AsyncClient, well: Well, cid: int, args, deadline: float,
                      model: str) -> None:
    rng = np.random.default_rng([args.seed, cid])
    while time.perf_counter() < deadline:
        try:
            r = await client.post("/sessions", json={})
            well.ops[f"POST /sessions {r.status_code}"] += 1
            if r.status_code != 201:
                well.error(f"client {cid}: POST /sessions answered {r.status_code}: {r.text[:200]}")
                await asyncio.sleep(0.5)
                continue
            session_id = r.json()["session_id"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            well.error(f"client {cid}: POST /sessions: {describe(e)}")
            await asyncio.sleep(0.5)
            continue
        well.sessions += 1
        messages = [SYSTEM] if rng.random() < 0.5 else []
        sent_before = 0  # prompt + completion tokens of the earlier turns
        clean = True
        for turn in range(args.turns):
            if turn and time.perf_counter() >= deadline:
                break
            messages.append({"role": "user", "content": make_prompt(rng)})
            body = {"model": model, "messages": messages, "session_id": session_id, "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": args.max_new_tokens,
                    "temperature": 0.7, "seed": int(rng.integers(2**63))}
            rec, reply = await chat_turn(client, well, cid, turn, body)
            if rec.error:
                clean = False
                break
            if rec.usage:
                # A continued turn prefills only the new messages; the whole conversation again means the
                # server did not recognise the messages the session holds.
                if turn and rec.usage.get("prompt_tokens", 0) > sent_before:
                    well.chat_reprefilled += 1
                sent_before += rec.usage.get("prompt_tokens", 0) + rec.usage.get("completion_tokens", 0)
            messages.append({"role": "assistant", "content": reply})
        await end_session(client, well, cid, session_id, inspect=clean)


# ------------------------------------------------------------------- the hostile client
@dataclass
class Kind:
    count: int = 0
    statuses: Counter = field(default_factory=Counter)
    problems: int = 0
    first_problems: list[str] = field(default_factory=list)
    max_s: float = 0.0

    def to_json(self) -> dict:
        return {"count": self.count, "statuses": dict(sorted(self.statuses.items())), "problems": self.problems,
                "max_s": round(self.max_s, 4), "first_problems": self.first_problems}


class Hostile:
    def __init__(self, client: httpx.AsyncClient, info: dict, model: str | None, deadline: float, rng):
        self.client, self.info, self.model, self.deadline, self.rng = client, info, model, deadline, rng
        self.kinds: dict[str, Kind] = {}
        self.server_errors = 0  # 5xx
        self.unexpected = 0
        self.slow = 0
        self.sessions_created = 0
        self.sessions_deleted = 0
        self.disconnect_freed_s: list[float] = []  # disconnect -> the session could be deleted
        self.burst_windows: list[tuple[float, float]] = []  # the 30-config bursts (perf_counter)
        self.notes: list[str] = []  # observations beyond a status code (the first 20)
        limits = info.get("limits", {})
        self.max_body = int(limits.get("max_body_bytes", 1_000_000))
        self.default_cache = info.get("default_cache", {})
        self.warmed = [{k: v for k, v in c.items() if k not in ("name", "slots", "capacity", "max_tokens")}
                       for c in info.get("cache_classes", [])]

    # -- bookkeeping
    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(f"{time.strftime('%H:%M:%S')} {text}")

    def record(self, kind: str, status: int | str, expected: set, took: float, note: str = "") -> None:
        k = self.kinds.setdefault(kind, Kind())
        k.count += 1
        k.statuses[str(status)] += 1
        k.max_s = max(k.max_s, took)
        problem = []
        if isinstance(status, int) and status >= 500:
            self.server_errors += 1
            problem.append(f"{status} (5xx)")
        elif status not in expected or note:
            self.unexpected += 1
            problem.append(note or f"{status}, expected {' or '.join(map(str, sorted(expected)))}")
        if took > SLOW_S:
            self.slow += 1
            problem.append(f"took {took:.1f} s")
        if problem:
            k.problems += 1
            if len(k.first_problems) < 5:
                k.first_problems.append(f"{time.strftime('%H:%M:%S')} " + "; ".join(problem))

    async def call(self, kind: str, expected: set, method: str, path: str, **kw) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            r = await self.client.request(method, path, **kw)
        except httpx.HTTPError as e:
            self.record(kind, type(e).__name__, expected, time.perf_counter() - started)
            return None
        self.record(kind, r.status_code, expected, time.perf_counter() - started)
        return r

    async def delete(self, session_id: str) -> float | None:
        """DELETE a session, retrying on 409; the seconds it took, None if it never went."""
        started = time.perf_counter()
        while True:
            try:
                r = await self.client.delete(f"/sessions/{session_id}")
            except httpx.HTTPError as e:
                self.record("hostile_cleanup_delete", type(e).__name__, {204}, time.perf_counter() - started)
                return None
            if r.status_code == 409 and time.perf_counter() - started < DELETE_PATIENCE_S:
                await asyncio.sleep(0.2)
                continue
            self.record("hostile_cleanup_delete", r.status_code, {204}, time.perf_counter() - started)
            if r.status_code == 204:
                self.sessions_deleted += 1
                return time.perf_counter() - started
            return None

    async def cleanup(self, r: httpx.Response | None) -> None:
        """Delete the session an answer created (its X-Session-ID)."""
        if r is not None and r.status_code < 300 and r.headers.get("x-session-id"):
            self.sessions_created += 1
            await self.delete(r.headers["x-session-id"])

    def is_warmed(self, spec: dict) -> bool:
        name = spec.get("policy", self.default_cache.get("policy"))
        base = dict(self.default_cache) if name == self.default_cache.get("policy") else {}
        wanted = {**base, **spec, "policy": name}
        # Parameters left out take the policy's defaults, which /info does not list: a class matching every
        # parameter given counts as warmed.
        return any(all(c.get(k) == v for k, v in wanted.items()) for c in self.warmed)

    def prompt(self) -> str:
        return make_prompt(self.rng)

    def gen(self, **fields) -> dict:
        return {"prompt": self.prompt(), "max_new_tokens": 4, "stream": False, **fields}

    def completion(self, **fields) -> dict:
        return {"model": self.model or "unknown", "prompt": self.prompt(), "max_tokens": 4, **fields}

    # -- the steps
    def field_bounds(self) -> list:
        steps = [
            ("generate_seed_2**64", {422}, self.gen(seed=2**64)),
            ("generate_seed_2**63", {200}, self.gen(seed=2**63)),
            ("generate_top_k_2**31", {422}, self.gen(top_k=2**31)),
            ("generate_top_k_2**31-1", {200}, self.gen(top_k=2**31 - 1)),
            ("generate_temperature_1e9", {422}, self.gen(temperature=1e9)),
            ("generate_cache_budget_65536", {422}, self.gen(cache={"budget": 65536})),
        ]
        spec = {"policy": "snapkv", "budget": 4096}
        steps.append(("generate_cache_snapkv_4096", {200} if self.is_warmed(spec) else {422},
                      self.gen(cache=spec)))
        out = []
        for kind, expected, body in steps:
            out.append((kind, expected, "POST", "/generate", {"json": body}))
        for kind, fields in [("completions_seed_2**64", {"seed": 2**64}),
                             ("completions_top_k_2**31", {"top_k": 2**31}),
                             ("completions_best_of_2", {"best_of": 2}),
                             ("completions_frequency_penalty_1", {"frequency_penalty": 1}),
                             ("completions_logit_bias", {"logit_bias": {"50256": -100}})]:
            out.append((kind, {422}, "POST", "/v1/completions", {"json": self.completion(**fields)}))
        out.append(("chat_logit_bias", {422}, "POST", "/v1/chat/completions",
                    {"json": {"model": self.model or "unknown", "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 4, "logit_bias": {"50256": -100}}}))
        return out

    async def simple(self, kind: str, expected: set, method: str, path: str, kw: dict) -> None:
        r = await self.call(kind, expected, method, path, **kw)
        await self.cleanup(r)

    async def bodies(self) -> None:
        total = 20 * 2**20
        size_20 = max(total, 2 * self.max_body)

        async def chunks():
            sent = 0
            piece = b'{"prompt": "' + b"a" * (64 * 1024 - 12)
            while sent < size_20:
                yield piece if sent == 0 else b"a" * (64 * 1024)
                sent += 64 * 1024
            yield b'"}'

        await self.simple("body_20MB_chunked", {413}, "POST", "/generate",
                          {"content": chunks(), "headers": JSON})
        await self.pause()
        body = json.dumps({"prompt": "the " * (2 * 2**20 // 4), "max_new_tokens": 4, "stream": False}).encode()
        await self.simple("body_2MB_content_length", {413} if len(body) > self.max_body else {400},
                          "POST", "/generate", {"content": body, "headers": JSON})
        await self.pause()
        await self.simple("body_invalid_utf8", {422}, "POST", "/generate",
                          {"content": b'{"prompt": "caf\xe9 \xff\xfe", "max_new_tokens": 4}',
                           "headers": JSON})
        await self.pause()
        words = (" ".join(_WORDS) + " ") * (900_000 // (len(" ".join(_WORDS)) + 1) + 1)
        body = json.dumps({"prompt": words[:900_000], "max_new_tokens": 4, "stream": False}).encode()
        await self.simple("prompt_900KB", {413} if len(body) > self.max_body else {400}, "POST", "/generate",
                          {"content": body, "headers": JSON})

    async def proxy_header(self) -> None:
        headers = {"X-New-Session-ID": ATTACKER_ID}
        for kind, path, kw, expected in [
                ("x_new_session_id_sessions", "/sessions", {"json": {}}, {201}),
                ("x_new_session_id_generate", "/generate", {"json": self.gen()}, {200})]:
            started = time.perf_counter()
            try:
                r = await self.client.post(path, headers=headers, **kw)
            except httpx.HTTPError as e:
                self.record(kind, type(e).__name__, expected, time.perf_counter() - started)
                continue
            sid = r.headers.get("x-session-id")
            if path == "/sessions" and r.status_code == 201:
                sid = r.json().get("session_id", sid)
            note = ""
            if sid == ATTACKER_ID:
                note = f"the server named the session {ATTACKER_ID!r} as the client asked"
            self.record(kind, r.status_code, expected, time.perf_counter() - started, note)
            if sid and r.status_code < 300:
                self.sessions_created += 1
                await self.delete(sid)
            await self.pause()

    async def disconnect(self) -> None:
        """A streaming /generate closed after 3 token events; then how long until its session is free."""
        kind = "disconnect_mid_stream"
        started = time.perf_counter()
        sid = None
        tokens = 0
        status: int | str = "no answer"
        try:
            body = {"prompt": self.prompt(), "max_new_tokens": 512, "ignore_eos": True, "temperature": 0.7,
                    "stream": True}
            async with self.client.stream("POST", "/generate", json=body) as r:
                status = r.status_code
                sid = r.headers.get("x-session-id")
                event = None
                if r.status_code == 200:
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "token":
                            tokens += 1
                            if tokens >= 3:
                                break
                else:
                    await r.aread()
        except httpx.HTTPError as e:
            status = type(e).__name__
        closed = time.perf_counter()
        self.record(kind, status, {200}, closed - started,
                    "" if status != 200 or tokens >= 3 else f"the stream ended after {tokens} tokens")
        if sid:
            self.sessions_created += 1
            freed = await self.delete(sid)
            if freed is not None:
                self.disconnect_freed_s.append(freed)

    async def busy_session(self) -> None:
        """A long stream holds a session; meanwhile a second request on it (409), its cache (200 or 409) and
        its DELETE (409); then the stream is closed and the session deleted."""
        started = time.perf_counter()
        # 2048 tokens: still running when the checks arrive, however fast the server (it is closed after them).
        body = {"prompt": self.prompt(), "max_new_tokens": 2048, "ignore_eos": True, "temperature": 0.7,
                "stream": True}
        sid = None
        try:
            async with self.client.stream("POST", "/generate", json=body) as r:
                sid = r.headers.get("x-session-id")
                if r.status_code != 200:
                    await r.aread()
                    self.record("busy_session_holder", r.status_code, {200}, time.perf_counter() - started)
                    return
                event, finished = None, False
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "token":
                        break
                    elif line.startswith("data:") and event in ("done", "error"):
                        finished = True
                        break
                self.record("busy_session_holder", r.status_code, {200}, time.perf_counter() - started,
                            "the stream ended before its first token" if finished else "")
                if finished or not sid:
                    return
                second = self.call("concurrent_same_session", {409}, "POST", "/generate",
                                   json=self.gen(session_id=sid), headers={"X-Session-ID": sid})
                cache = self.call("cache_while_generating", {200, 409}, "GET", f"/sessions/{sid}/cache")
                delete = self.call("delete_busy_session", {409}, "DELETE", f"/sessions/{sid}")
                results = await asyncio.gather(second, cache, delete)
                if results[2] is not None and results[2].status_code == 204:
                    sid = None  # deleted under the running stream (reported as unexpected)
                    # Was it still running? (2048 tokens outlast these checks, unless this client lagged.)
                    more, last = 0, "the end of the stream"
                    async for line in r.aiter_lines():
                        if line.startswith("event: token"):
                            more += 1
                        elif line.startswith(("event: done", "event: error")):
                            last = line
                            break
                    self.note(f"a busy session was deleted (204); its stream then sent {more} more tokens "
                              f"and {last}")
        except httpx.HTTPError as e:
            self.record("busy_session_holder", type(e).__name__, {200}, time.perf_counter() - started)
        if sid:
            self.sessions_created += 1
            await self.delete(sid)

    async def unknown(self) -> None:
        sid = "no-such-session-" + os.urandom(8).hex()
        for kind, method, path, kw in [
                ("unknown_session_generate", "POST", "/generate",
                 {"json": self.gen(session_id=sid), "headers": {"X-Session-ID": sid}}),
                ("unknown_session_chat", "POST", "/v1/chat/completions",
                 {"json": {"model": self.model or "unknown", "session_id": sid, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Hi"}]}}),
                ("unknown_session_get", "GET", f"/sessions/{sid}", {}),
                ("unknown_session_cache", "GET", f"/sessions/{sid}/cache", {}),
                ("unknown_session_delete", "DELETE", f"/sessions/{sid}", {})]:
            await self.call(kind, {404}, method, path, **kw)
            await self.pause()

    def configs(self) -> list[dict]:
        """30 distinct cache configs the server has not warmed."""
        out, i = [], 0
        candidates = []
        for n in range(40):
            candidates += [{"policy": "snapkv", "budget": 1000 + 7 * n},
                           {"policy": "h2o", "budget": 1001 + 7 * n},
                           {"policy": "streaming", "budget": 1002 + 7 * n},
                           {"policy": "snapkv", "budget": 96 + n, "slack": 5 + n % 7, "window_size": 3 + n % 5}]
        while len(out) < 30 and i < len(candidates):
            if not self.is_warmed(candidates[i]):
                out.append(candidates[i])
            i += 1
        return out

    async def cache_configs(self) -> None:
        start = time.perf_counter()
        for spec in self.configs():
            r = await self.call("distinct_cache_config", {422}, "POST", "/generate", json=self.gen(cache=spec))
            await self.cleanup(r)
        self.burst_windows.append((start, time.perf_counter()))

    async def pause(self) -> None:
        await asyncio.sleep(0.2)

    async def run(self) -> None:
        while time.perf_counter() < self.deadline:
            for kind, expected, method, path, kw in self.field_bounds():
                await self.simple(kind, expected, method, path, kw)
                await self.pause()
                if time.perf_counter() >= self.deadline:
                    return
            for step in (self.bodies, self.proxy_header, self.disconnect, self.busy_session, self.unknown,
                         self.cache_configs):
                await step()
                await self.pause()
                if time.perf_counter() >= self.deadline:
                    return

    def to_json(self) -> dict:
        return {"requests": sum(k.count for k in self.kinds.values()), "server_errors_5xx": self.server_errors,
                "unexpected": self.unexpected, "slow_over_30s": self.slow,
                "sessions_created": self.sessions_created, "sessions_deleted": self.sessions_deleted,
                "disconnect_to_session_free_s": percentiles(self.disconnect_freed_s),
                "kinds": {name: k.to_json() for name, k in sorted(self.kinds.items())}, "notes": self.notes}


# ------------------------------------------------------------------- memory
async def sample_rss(pid: int, samples: list[tuple[float, float]], t0: float, stop: asyncio.Event,
                     every_s: float = 5.0) -> None:
    while True:
        rss = read_rss_mb(pid)
        if rss is not None:
            samples.append((time.perf_counter() - t0, rss))
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
            return
        except TimeoutError:
            pass


def read_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB -> MB (MiB)
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_summary(samples: list[tuple[float, float]]) -> dict | None:
    if not samples:
        return None
    t = np.asarray([s[0] for s in samples])
    mb = np.asarray([s[1] for s in samples])
    second = t >= t[-1] / 2
    slope = None
    if second.sum() >= 2 and np.ptp(t[second]) > 0:
        slope = float(np.polyfit(t[second] / 60, mb[second], 1)[0])
    return {"first_mb": float(mb[0]), "max_mb": float(mb.max()), "last_mb": float(mb[-1]),
            "slope_second_half_mb_per_min": slope, "n": len(samples),
            "samples": [[round(float(a), 1), round(float(b), 1)] for a, b in samples]}


# ------------------------------------------------------------------- the run
async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with (httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout, limits=limits) as client,
                httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout) as hostile_client):
        try:
            r = await client.get("/info")
        except httpx.HTTPError as e:
            raise BenchError(f"server unreachable at {args.url}: {describe(e)}") from None
        if r.status_code != 200:
            raise BenchError(f"GET /info answered {r.status_code}: {r.text[:200]}")
        info = r.json()
        if not info.get("ready"):
            raise BenchError("the server is not ready (GET /info says ready: false)")
        chat_clients = args.clients // 2
        if chat_clients and not info.get("chat", {}).get("template"):
            raise BenchError("the served model has no chat template, so /v1/chat/completions cannot be soaked: "
                             "start the server with TOYLLM_CHAT_TEMPLATE=FILE")
        r = await client.get("/v1/models")
        if r.status_code != 200:
            raise BenchError(f"GET /v1/models answered {r.status_code}: {r.text[:200]}")
        model = r.json()["data"][0]["id"]
        before = await read_metrics(client)

        well = Well()
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        rss: list[tuple[float, float]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(args.pid, rss, t0, stop)) if args.pid else None
        hostile = Hostile(hostile_client, info, model, deadline, np.random.default_rng([args.seed, 10**6]))
        tasks = [generate_client(client, well, i, args, deadline) for i in range(args.clients - chat_clients)]
        tasks += [chat_client(client, well, i, args, deadline, model)
                  for i in range(args.clients - chat_clients, args.clients)]
        if args.hostile:
            tasks.append(hostile.run())
        print(f"soak: {args.clients - chat_clients} /generate and {chat_clients} chat clients"
              f"{' and a hostile one' if args.hostile else ''} for {args.duration:.0f} s against {args.url}",
              flush=True)
        await asyncio.gather(*tasks)
        clients_done_s = time.perf_counter() - t0
        # Everything is deleted: the live gauges should settle at 0 (a cancelled stream frees its session
        # at the server's next decode step).
        settle_until = time.perf_counter() + args.settle_s
        while True:
            after = await read_metrics(client)
            if (after["toyllm_kv_cache_bytes"] == 0 and not after["toyllm_requests_running"]
                    and not after["toyllm_sessions_active"]) or time.perf_counter() >= settle_until:
                break
            await asyncio.sleep(0.5)
        settled_s = time.perf_counter() - t0 - clients_done_s
        if args.pid:
            stop.set()
            await sampler
            last = read_rss_mb(args.pid)
            if last is not None:
                rss.append((time.perf_counter() - t0, last))
    ended_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_end = os.getloadavg()

    reqs = well.requests
    completed = [q for q in reqs if q.completed]
    itl = [x for q in completed for x in q.itl_s]
    bursts = []
    for a, b in hostile.burst_windows:
        bursts += [g for q in reqs for g, s, e in zip(q.itl_s, q.arrivals[:-1], q.arrivals[1:], strict=False)
                   if e > a and s < b]
    tokens = sum(len(q.arrivals) for q in reqs)
    window = args.window_s or max(10.0, args.duration / 10)
    timeline = []
    for w in range(int(np.ceil(args.duration / window))):
        lo, hi = t0 + w * window, t0 + (w + 1) * window
        sel = [q for q in reqs if lo <= q.started < hi]  # by request start
        gaps = [x for q in sel for x in q.itl_s]
        timeline.append({"from_s": w * window, "requests": len(sel), "errors": sum(1 for q in sel if q.error),
                         "tokens": sum(len(q.arrivals) for q in sel), "itl_s": percentiles(gaps),
                         "ttft_s": percentiles([q.ttft_s for q in sel if q.ttft_s is not None])})
    args_json = {k: v for k, v in vars(args).items() if k != "json"}
    args_json["api_key"] = "***" if args.api_key else None
    return {
        "url": args.url, "args": args_json, "started_at": started_at, "ended_at": ended_at,
        "cpu_model": cpu_model(), "loadavg_start": list(load_start), "loadavg_end": list(load_end),
        "machine": machine(), "note": "the load generator shares the machine with the server unless --url "
                                     "points elsewhere",
        "model": model, "server_info": info,
        "clients_done_s": clients_done_s, "settled_after_s": settled_s,
        "well_behaved": {
            "generate_clients": args.clients - chat_clients, "chat_clients": chat_clients,
            "sessions": well.sessions, "requests": len(reqs), "completed": len(completed),
            "errors": well.errors,
            "error_messages": well.messages, "session_ops": dict(sorted(well.ops.items())),
            "by_kind": {kind: {"requests": sum(1 for q in reqs if q.kind == kind),
                               "errors": sum(1 for q in reqs if q.kind == kind and q.error),
                               "tokens": sum(len(q.arrivals) for q in reqs if q.kind == kind)}
                        for kind in ("generate", "chat")},
            "statuses": dict(Counter(str(q.status) for q in reqs)),
            "tokens": tokens, "tokens_per_s": tokens / clients_done_s if clients_done_s else None,
            "itl_s": percentiles(itl),
            # Tokens arrive in bursts (several decode steps per call): the gaps between bursts alone.
            "itl_between_bursts_s": percentiles([x for x in itl if x > BURST_S]),
            "ttft_s": percentiles([q.ttft_s for q in completed if q.ttft_s is not None]),
            "itl_during_cache_config_bursts_s": percentiles(bursts),
            "chat_turns_reprefilled": well.chat_reprefilled,
            "timeline": timeline,
            "requests_detail": [{"kind": q.kind, "client": q.client, "turn": q.turn,
                                 "start_s": round(q.started - t0, 3), "status": q.status,
                                 "completed": q.completed, "error": q.error or None,
                                 "ttft_s": None if q.ttft_s is None else round(q.ttft_s, 5),
                                 "tokens": len(q.arrivals), "itl_ms": [round(x * 1e3, 2) for x in q.itl_s]}
                                for q in reqs],
        },
        "hostile": hostile.to_json() if args.hostile else None,
        "rss": rss_summary(rss),
        "metrics_before": before,
        "metrics_after": after,
    }


def verdict(r: dict) -> list[str]:
    """Why the run failed (empty: it passed)."""
    out = []
    w = r["well_behaved"]
    if w["errors"]:
        out.append(f"{w['errors']} well-behaved errors")
    h = r["hostile"]
    if h and (h["server_errors_5xx"] or h["unexpected"]):
        out.append(f"hostile: {h['server_errors_5xx']} 5xx, {h['unexpected']} unexpected")
    if r["metrics_after"]["toyllm_kv_cache_bytes"] != 0:
        out.append(f"cache bytes {r['metrics_after']['toyllm_kv_cache_bytes']:.0f} after every session was "
                   "deleted")
    return out


def report(r: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.1f}"

    w, h, m = r["well_behaved"], r["hostile"], r["metrics_after"]
    itl, ttft, burst = w["itl_s"], w["ttft_s"], w["itl_during_cache_config_bursts_s"]
    bursty = w["itl_between_bursts_s"]
    rows = [
        ("well-behaved clients", (f"{w['generate_clients']} /generate + {w['chat_clients']} chat, "
                                  f"{w['sessions']} sessions")),
        ("requests (completed)", f"{w['requests']} ({w['completed']})"),
        ("errors", str(w["errors"])),
        ("tokens", f"{w['tokens']} ({(w['tokens_per_s'] or 0):.1f}/s)"),
        ("ITL p50/p90/p99/max ms", " / ".join(ms(itl[k]) for k in ("p50", "p90", "p99", "max"))),
        ("ITL between bursts p50/p99 ms", f"{ms(bursty['p50'])} / {ms(bursty['p99'])}"),
        ("TTFT p50/p99 ms", f"{ms(ttft['p50'])} / {ms(ttft['p99'])}"),
        ("ITL in config bursts p99/max", f"{ms(burst['p99'])} / {ms(burst['max'])} ms (n={burst['n']})"),
        ("chat turns re-prefilled", str(w["chat_turns_reprefilled"])),
        ("session ops", ", ".join(f"{k}: {v}" for k, v in w["session_ops"].items()) or "-"),
    ]
    if h:
        rows.append(("hostile requests", (f"{h['requests']}: {h['server_errors_5xx']} 5xx, {h['unexpected']} "
                                          f"unexpected, {h['slow_over_30s']} over 30 s; sessions "
                                          f"{h['sessions_deleted']}/{h['sessions_created']} deleted")))
        d = h["disconnect_to_session_free_s"]
        if d["n"]:
            rows.append(("disconnect -> session free", f"p50 {d['p50']:.2f} s, max {d['max']:.2f} s"))
    s = r["rss"]
    if s:
        slope = s["slope_second_half_mb_per_min"]
        slope = "-" if slope is None else f"{slope:+.2f}"
        rows.append(("RSS first/max/last MB", (f"{s['first_mb']:.0f} / {s['max_mb']:.0f} / {s['last_mb']:.0f}; "
                                               f"slope (2nd half) {slope} MB/min, {s['n']} samples")))
    rows += [
        ("final kv cache bytes", f"{m['toyllm_kv_cache_bytes']:.0f}"),
        ("final sessions / running", f"{m['toyllm_sessions_active']:.0f} / {m['toyllm_requests_running']:.0f}"),
        ("jit compilations", (f"{r['metrics_before']['toyllm_jit_compilations_total']} -> "
                              f"{m['toyllm_jit_compilations_total']}")),
        ("cpu, load", f"{r['cpu_model']}; load {r['loadavg_start']} -> {r['loadavg_end']}"),
        ("run", f"{r['started_at']} -> {r['ended_at']}"),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"{a:<{width}}  {b}" for a, b in rows]
    if h:
        lines.append("")
        lines.append(f"{'hostile kind':<34} {'n':>4}  {'max s':>6}  statuses")
        for name, k in h["kinds"].items():
            flag = "  <-- " + "; ".join(k["first_problems"][:2]) if k["problems"] else ""
            lines.append(f"{name:<34} {k['count']:>4}  {k['max_s']:>6.2f}  "
                         f"{', '.join(f'{s}x{n}' for s, n in k['statuses'].items())}{flag}")
    if h and h["notes"]:
        lines.append("")
        lines += [f"hostile note: {n}" for n in h["notes"]]
    if w["error_messages"]:
        lines.append("")
        lines.append("first well-behaved errors:")
        lines += [f"  {e}" for e in w["error_messages"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, help="The server's process id: its VmRSS is sampled every 5 s.")
    p.add_argument("--duration", type=float, default=600.0, help="Seconds the clients keep going.")
    p.add_argument("--clients", type=int, default=16, help="Well-behaved clients (half /generate, half chat).")
    p.add_argument("--turns", type=int, default=4, help="Turns per session.")
    p.add_argument("--max-new-tokens", type=int, default=32, help="Per turn.")
    p.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--api-key", default=os.environ.get("TOYLLM_API_KEY") or None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="Seconds per request.")
    p.add_argument("--settle-s", type=float, default=30.0, help="How long to wait for the gauges to reach 0.")
    p.add_argument("--window-s", type=float, help="Timeline window [default: a tenth of --duration, at "
                   "least 10 s].")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.clients < 1 or args.turns < 1 or args.duration <= 0 or args.max_new_tokens < 1:
        p.error("--clients, --turns, --max-new-tokens and --duration must be positive")
    if args.pid is not None and read_rss_mb(args.pid) is None:
        p.error(f"no process {args.pid} (or no VmRSS in /proc/{args.pid}/status)")
    try:
        result = asyncio.run(run(args))
    except BenchError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    print(report(result))
    failed = verdict(result)
    result["passed"] = not failed
    result["failures"] = failed
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    print("PASS" if not failed else "FAIL: " + "; ".join(failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
