"""`toyllm loadtest`: N concurrent SSE streams over M requests against a running server.

Each worker takes the next conversation (a fresh session, or `turns` requests continuing one
session), times every token as it arrives, and the report gives TTFT, inter-token and end-to-end
latency percentiles, aggregate generated tokens/s, and errors by type. Before and after the run it
reads the server's /metrics, so the report also has the engine's own mean decode step time and the
number of XLA compilations during the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from toyllm_core.machine import machine

# Common English words: about one token each under byte-level BPE, so prompt length ~ word count.
_WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "he", "it", "an", "were", "are", "which", "this", "be", "or", "first", "new", "after", "also", "had", "its", "their", "one", "two", "has", "but", "not", "have", "they", "city", "school", "year", "war", "time", "world", "state", "river", "people", "family", "history", "music", "church", "team", "game", "house", "made", "other", "all", "most"]


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    total_s: float = 0.0
    tokens: int = 0
    session_id: str | None = None


def make_prompt(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(_WORDS, words).tolist())


async def _one(client: httpx.AsyncClient, body: dict) -> RequestResult:
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    # The header too, so that a session-routing proxy (deploy/nginx) finds the session's replica.
    headers = {"X-Session-ID": body["session_id"]} if "session_id" in body else {}
    try:
        async with client.stream("POST", "/generate", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                try:
                    kind = r.json()["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    kind = "unknown"
                result.error = f"http_{r.status_code}_{kind}"
                return result
            result.session_id = r.headers.get("x-session-id")
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "token":
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.tokens += 1
                elif line.startswith("data:") and event == "done":
                    result.ok = True
                elif line.startswith("data:") and event == "error":
                    result.error = "stream_error"
    except httpx.HTTPError as e:
        result.error = type(e).__name__
    result.total_s = time.perf_counter() - start
    if not result.ok and not result.error:
        result.error = "incomplete_stream"
    return result


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "n": 0}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": len(values)}


def _scrape(text: str) -> dict[str, float]:
    wanted = {"toyllm_jit_compilations_total", "toyllm_decode_step_duration_seconds_sum",
              "toyllm_decode_step_duration_seconds_count", "toyllm_generation_tokens_total"}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


async def run(url: str, concurrency: int, requests: int, prompt_tokens: int = 64, max_new_tokens: int = 128,
              policy: str | None = "snapkv", budget: int | None = 64, turns: int = 1, temperature: float = 0.0,
              api_key: str | None = None, timeout_s: float = 600.0, seed: int = 0,
              ignore_eos: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = np.random.default_rng(seed)
    conversations = [[make_prompt(rng, prompt_tokens) for _ in range(turns)] for _ in range(-(-requests // turns))]
    cache = {k: v for k, v in {"policy": policy, "budget": budget}.items() if v is not None}
    results: list[RequestResult] = []
    queue = list(range(len(conversations)))
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:
        before = _scrape((await client.get("/metrics")).text)

        async def worker():
            while queue and len(results) < requests:
                turns_ = conversations[queue.pop(0)]
                session_id = None
                for prompt in turns_:
                    if len(results) >= requests:
                        return
                    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
                            "seed": int(rng.integers(1 << 30))}
                    if ignore_eos:  # only when asked: servers before the field existed reject unknown fields
                        body["ignore_eos"] = True
                    if session_id is None:
                        body["cache"] = cache
                    else:
                        body["session_id"] = session_id
                    result = await _one(client, body)
                    results.append(result)
                    if not result.ok:
                        break
                    session_id = result.session_id

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = _scrape((await client.get("/metrics")).text)

    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    steps = after.get("toyllm_decode_step_duration_seconds_count", 0) - before.get(
        "toyllm_decode_step_duration_seconds_count", 0)
    step_s = after.get("toyllm_decode_step_duration_seconds_sum", 0) - before.get(
        "toyllm_decode_step_duration_seconds_sum", 0)
    tokens = sum(r.tokens for r in results)
    return {
        "url": url, "concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": errors,
        "prompt_words": prompt_tokens, "max_new_tokens": max_new_tokens, "turns": turns,
        "ignore_eos": ignore_eos, "cache": cache, "temperature": temperature, "wall_s": wall,
        "generated_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_s": _percentiles([r.ttft_s for r in ok]),
        "itl_s": _percentiles([x for r in ok for x in r.itl_s]),
        "e2e_s": _percentiles([r.total_s for r in ok]),
        "server": {
            "decode_step_mean_s": step_s / steps if steps else None,
            "decode_steps": steps,
            "jit_compilations_before": before.get("toyllm_jit_compilations_total"),
            "jit_compilations_after": after.get("toyllm_jit_compilations_total"),
        },
        "note": "the load generator runs on the same machine as the server unless --url points elsewhere",
        "machine": machine(),  # the load generator's
    }


def format_report(r: dict) -> str:
    def ms(p):
        return "-" if p["p50"] is None else f"{p['p50'] * 1e3:.1f} / {p['p95'] * 1e3:.1f} / {p['p99'] * 1e3:.1f}"

    s = r["server"]
    step = "-" if s["decode_step_mean_s"] is None else f"{s['decode_step_mean_s'] * 1e3:.2f} ms"
    lines = [
        (f"concurrency {r['concurrency']}, {r['requests']} requests ({r['ok']} ok), {r['wall_s']:.1f} s: "
        f"{r['generated_tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s"),
        f"  TTFT  p50/p95/p99 ms: {ms(r['ttft_s'])}",
        f"  ITL   p50/p95/p99 ms: {ms(r['itl_s'])}  (mean {(r['itl_s']['mean'] or 0) * 1e3:.2f} ms)",
        f"  E2E   p50/p95/p99 ms: {ms(r['e2e_s'])}",
        (f"  server: mean decode step {step}; jit compilations {s['jit_compilations_before']:.0f} -> "
        f"{s['jit_compilations_after']:.0f}"),
    ]
    if r["errors"]:
        lines.append("  errors: " + json.dumps(r["errors"]))
    return "\n".join(lines)
