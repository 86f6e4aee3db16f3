"""Inter-token latency of a running stream while a long prompt is admitted next to it.

    python benchmarks/admission_itl.py --url http://127.0.0.1:8000 --max-new-tokens 600 \
        --lead-tokens 100 --prompt-tokens 4000 --json out/admission_itl.json

One streaming request (greedy, ignore_eos) is started; once it has received --lead-tokens tokens a
second, non-streaming request with a prompt of --prompt-tokens tokens (" the" repeated: one GPT-2 BPE
token each) and max_new_tokens=1 is sent concurrently. Every token event of the stream is timed on
arrival. The report gives the stream's inter-token gaps (ITL, first token excluded) overall and for
the gaps that overlap the admission window [long prompt sent, long prompt answered], the tokens the
stream received in that window, and the gaps between bursts (tokens arriving within --burst-ms of
the previous one form one burst: the server may deliver several tokens per decode call; a burst gap
is the time from one burst's first token to the next burst's first token). Before and after, the
server's /info and toyllm_jit_compilations_total (from /metrics) are read, with the CPU model and the
load averages of this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from toyllm_core.machine import cpu_model


class BenchError(Exception):
    """A failure reported as one line, exit status 1."""


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "mean": float(a.mean())}


def describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def get_json(client: httpx.AsyncClient, path: str) -> dict:
    try:
        r = await client.get(path)
    except httpx.HTTPError as e:
        raise BenchError(f"server unreachable at {client.base_url}{path}: {describe(e)}") from None
    if r.status_code != 200:
        raise BenchError(f"GET {path} answered {r.status_code}: {r.text[:200]}")
    return r.json()


async def jit_compilations(client: httpx.AsyncClient) -> float | None:
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError as e:
        raise BenchError(f"server unreachable at {client.base_url}/metrics: {describe(e)}") from None
    if r.status_code != 200:
        raise BenchError(f"GET /metrics answered {r.status_code}")
    for line in r.text.splitlines():
        if line.startswith("toyllm_jit_compilations_total"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def stream_tokens(client: httpx.AsyncClient, body: dict, arrivals: list[float], lead: int,
                        lead_reached: asyncio.Event) -> dict:
    """Run the streaming request, appending each token event's arrival time; returns the done payload."""
    event = None
    done = None
    try:
        async with client.stream("POST", "/generate", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise BenchError(f"streaming /generate answered {r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "token":
                        arrivals.append(time.perf_counter())
                        if len(arrivals) >= lead:
                            lead_reached.set()
                    elif event == "done":
                        done = json.loads(line[5:])
                    elif event == "error":
                        raise BenchError(f"the stream reported an error: {line[5:].strip()[:200]}")
    except httpx.HTTPError as e:
        raise BenchError(f"streaming /generate failed: {describe(e)}") from None
    finally:
        lead_reached.set()  # never leave the admission side waiting
    if done is None:
        raise BenchError(f"the stream ended without a done event after {len(arrivals)} tokens")
    return done


async def long_prompt(client: httpx.AsyncClient, body: dict) -> dict:
    sent = time.perf_counter()
    try:
        r = await client.post("/generate", json=body)
    except httpx.HTTPError as e:
        raise BenchError(f"long-prompt /generate failed: {describe(e)}") from None
    answered = time.perf_counter()
    if r.status_code != 200:
        raise BenchError(f"long-prompt /generate answered {r.status_code}: {r.text[:200]}")
    payload = r.json()
    return {"sent": sent, "answered": answered, "payload": payload}


def analyse(arrivals: list[float], sent: float, answered: float, burst_s: float) -> dict:
    t = np.asarray(arrivals)
    gaps = np.diff(t)
    # gap i spans (t[i], t[i + 1]); it overlaps the window when it ends after `sent` and starts before `answered`
    overlap = (t[1:] > sent) & (t[:-1] < answered)
    in_window = int(((t >= sent) & (t <= answered)).sum())
    longest = int(gaps.argmax()) if len(gaps) else None
    burst_starts = [arrivals[0]] if arrivals else []
    sizes = [1] if arrivals else []
    for g, a in zip(gaps, arrivals[1:], strict=True):
        if g <= burst_s:
            sizes[-1] += 1
        else:
            burst_starts.append(a)
            sizes.append(1)
    burst_gaps = np.diff(np.asarray(burst_starts)).tolist()
    b = np.asarray(burst_starts)
    burst_overlap = [g for g, s, e in zip(burst_gaps, b[:-1], b[1:], strict=True) if e > sent and s < answered]
    return {
        "itl_s": stats(gaps.tolist()),
        "itl_window_s": stats(gaps[overlap].tolist()),
        "itl_outside_window_s": stats(gaps[~overlap].tolist()),
        "tokens_in_window": in_window,
        "longest_gap": None if longest is None else {
            "gap_s": float(gaps[longest]), "after_token": longest,
            "start_rel_sent_s": float(t[longest] - sent), "end_rel_sent_s": float(t[longest + 1] - sent)},
        "bursts": {"count": len(burst_starts), "size": stats([float(s) for s in sizes]),
                   "gap_s": stats(burst_gaps), "gap_window_s": stats(burst_overlap)},
    }


async def run(args: argparse.Namespace) -> dict:
    load_start = os.getloadavg()
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=args.url, timeout=timeout) as client:
        info = await get_json(client, "/info")
        jit_before = await jit_compilations(client)
        stream_body = {"prompt": "Once upon a time", "max_new_tokens": args.max_new_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}
        long_body = {"prompt": " the" * args.prompt_tokens, "max_new_tokens": 1, "temperature": 0,
                     "stream": False}
        arrivals: list[float] = []
        lead_reached = asyncio.Event()
        started = time.perf_counter()
        stream_task = asyncio.create_task(stream_tokens(client, stream_body, arrivals, args.lead_tokens,
                                                        lead_reached))
        await lead_reached.wait()
        if stream_task.done() and stream_task.exception() is not None:
            raise stream_task.exception()
        if len(arrivals) < args.lead_tokens:
            stream_task.cancel()
            raise BenchError(f"the stream ended after {len(arrivals)} tokens, before --lead-tokens")
        lead_at = len(arrivals)
        long_task = asyncio.create_task(long_prompt(client, long_body))
        try:
            done, long_res = await asyncio.gather(stream_task, long_task)
        except BaseException:
            for task in (stream_task, long_task):
                task.cancel()
            raise
        jit_after = await jit_compilations(client)
    load_end = os.getloadavg()
    sent, answered = long_res["sent"], long_res["answered"]
    timings = long_res["payload"].get("timings", {})
    result = {
        "url": args.url,
        "params": {"max_new_tokens": args.max_new_tokens, "lead_tokens": args.lead_tokens,
                   "prompt_tokens": args.prompt_tokens, "burst_ms": args.burst_ms},
        "cpu_model": cpu_model(),
        "loadavg_start": list(load_start),
        "loadavg_end": list(load_end),
        "info": info,
        "jit_compilations_before": jit_before,
        "jit_compilations_after": jit_after,
        "stream": {"tokens": len(arrivals), "ttft_client_s": arrivals[0] - started,
                   "total_client_s": arrivals[-1] - started, "tokens_before_admission": lead_at,
                   "timings": done.get("timings"), "usage": done.get("usage")},
        "long_prompt": {"sent_rel_stream_start_s": sent - started, "client_latency_s": answered - sent,
                        "prefill_s": timings.get("prefill_s"), "ttft_s": timings.get("ttft_s"),
                        "timings": timings, "usage": long_res["payload"].get("usage")},
        **analyse(arrivals, sent, answered, args.burst_ms / 1000),
        "arrivals_rel_sent_s": [round(a - sent, 6) for a in arrivals],
    }
    return result


def summary(r: dict) -> str:
    def ms(s: dict) -> str:
        if not s["n"]:
            return "n=0"
        return (f"p50 {s['p50'] * 1e3:.2f}  p99 {s['p99'] * 1e3:.2f}  max {s['max'] * 1e3:.2f}  "
                f"mean {s['mean'] * 1e3:.2f} ms (n={s['n']})")

    lp = r["long_prompt"]
    lg = r["longest_gap"]

    def fmt(v: float | None) -> str:
        return "?" if v is None else f"{v:.3f}"

    lines = [
        f"cpu {r['cpu_model']}  load start {r['loadavg_start']}  end {r['loadavg_end']}",
        f"jit compilations {r['jit_compilations_before']} -> {r['jit_compilations_after']}",
        (f"stream: {r['stream']['tokens']} tokens; long prompt ({r['params']['prompt_tokens']} tokens) sent "
         f"after {r['stream']['tokens_before_admission']}, answered in {lp['client_latency_s']:.3f} s "
         f"(prefill_s {fmt(lp['prefill_s'])}, ttft_s {fmt(lp['ttft_s'])})"),
        f"ITL all        {ms(r['itl_s'])}",
        f"ITL admission  {ms(r['itl_window_s'])}",
        f"tokens received during admission: {r['tokens_in_window']}",
        f"longest gap {lg['gap_s'] * 1e3:.1f} ms after token {lg['after_token']}" if lg else "longest gap -",
        f"bursts {r['bursts']['count']} (size p50 {r['bursts']['size']['p50']}); burst gap {ms(r['bursts']['gap_s'])}",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--max-new-tokens", type=int, default=600)
    p.add_argument("--lead-tokens", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=4000)
    p.add_argument("--burst-ms", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.lead_tokens < 1 or args.lead_tokens >= args.max_new_tokens:
        p.error("--lead-tokens must be at least 1 and less than --max-new-tokens")
    try:
        result = asyncio.run(run(args))
    except BenchError as e:
        print(f"admission_itl: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    print(summary(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
