"""This server next to llama.cpp's `llama-server`, through HTTP, one client for both, in one run.

Both serve SmolLM2-135M-Instruct as imported into weights/: toyllm in bfloat16, llama-server from
the F16 GGUF that `toyllm export-gguf` writes from the same checkpoint (into --gguf, if missing).
The client streams OpenAI completions (`POST /v1/completions`, stream, temperature 0,
`ignore_eos`, `max_tokens` --new-tokens) with prompts of --prompt-tokens common words (about a token
each; the same prompts for both servers, seeded), and times every request's first token (TTFT) and
the whole run:
- 1 stream: --requests-1 requests one after another;
- N streams (--streams): --requests-n requests, N in flight at once.
tokens/s = generated tokens / wall time of the phase (every request makes max_tokens tokens).

Rows, one server at a time on the otherwise idle machine:
- toyllm[full]: requests name the `full` cache (the `cache` extension); toyllm[default]: the server's
  default class (nothing named). One `toyllm serve` with its default settings serves both.
- llama-server[default] and llama-server[passive]: OpenMP threads spinning between parallel regions
  (the library default) and OMP_WAIT_POLICY=passive. --streams slots (`-np`) of --slot-tokens
  each, --threads threads (`-t`, `-tb`). XLA sizes its own pool from the cores: toyllm gets the same
  cores and no thread setting.
Each server's peak RSS (VmHWM of its process, after the run) is recorded; toyllm's /info adds its
peak by phase. The JSON records the CPU model and the load average before and after.

    benchmarks/build_llama_server.sh    # once: builds out/llama.cpp/build/bin/llama-server
    .venv/bin/python benchmarks/server_peers.py --json out/server_peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.loadtest import make_prompt
from server.subprocess_server import serve
from toyllm_core.machine import machine


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a running process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed completion: TTFT (first chunk with text), seconds, chunks with text, finish reason."""
    start = time.perf_counter()
    ttft, chunks, finish = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                finish = choice.get("finish_reason") or finish
    return {"ttft_s": ttft, "total_s": time.perf_counter() - start, "chunks": chunks, "finish": finish}


async def phase(url: str, bodies: list[dict], streams: int) -> dict:
    """Run every body, `streams` in flight at once; tokens/s over the phase's wall time."""
    gate = asyncio.Semaphore(streams)
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def gated(body):
            async with gate:
                return await one_request(client, url, body)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(b) for b in bodies))
        wall = time.perf_counter() - start
    tokens = sum(b["max_tokens"] for b in bodies)
    ttfts = sorted(r["ttft_s"] for r in results)
    return {"streams": streams, "requests": len(bodies), "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": float(np.percentile(ttfts, 99)), "ttft_max_s": ttfts[-1],
            "finish": sorted({r["finish"] for r in results}), "chunks_min": min(r["chunks"] for r in results)}


def measure(url: str, prompts: list[str], args, extra: dict) -> dict:
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    body = lambda p: {"model": model, "prompt": p, "max_tokens": args.new_tokens, "temperature": 0,
                      "stream": True, "ignore_eos": True, **extra}
    asyncio.run(phase(url, [body(prompts[0])], 1))  # warm: the first request's one-off costs
    one = asyncio.run(phase(url, [body(p) for p in prompts[: args.requests_1]], 1))
    many = asyncio.run(phase(url, [body(p) for p in prompts[: args.requests_n]], args.streams))
    return {"1": one, str(args.streams): many}


@contextlib.contextmanager
def llama_server(args, gguf: Path, env: dict, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(args.streams), "-c", str(args.streams * args.slot_tokens), "-t", str(args.threads),
           "-tb", str(args.threads), "--no-webui"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server not ready after 300 s")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "server_peers.json")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "weights" / "smollm2-135m-instruct")
    ap.add_argument("--gguf", type=Path, default=ROOT / "out" / "smollm2-135m-instruct-f16.gguf")
    ap.add_argument("--llama-server", type=Path, default=ROOT / "out" / "llama.cpp" / "build" / "bin" / "llama-server")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests-1", type=int, default=4)
    ap.add_argument("--requests-n", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--slot-tokens", type=int, default=2048, help="llama-server context per slot")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peers", default="toyllm,llama-server[default],llama-server[passive]")
    ap.add_argument("--toyllm-env", default="", help="Extra TOYLLM_* settings, as NAME=VALUE,...")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    prompts = [make_prompt(rng, args.prompt_tokens) for _ in range(max(args.requests_1, args.requests_n))]
    peers = args.peers.split(",")
    out = {"machine_before": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "rows": {}}
    logs = args.json.parent
    logs.mkdir(parents=True, exist_ok=True)
    if any(p.startswith("llama-server") for p in peers) and not args.gguf.exists():
        subprocess.run([sys.executable, "-m", "toyllm_core.cli", "export-gguf", str(args.checkpoint), "--out",
                        str(args.gguf), "--type", "f16"], check=True)
    for peer in peers:
        print(f"{peer} ...", flush=True)
        if peer == "toyllm":
            env = {"TOYLLM_CHECKPOINT": str(args.checkpoint)}
            env.update(dict(kv.split("=", 1) for kv in args.toyllm_env.split(",") if kv))
            with serve(env, logs / "server_peers-toyllm.log", timeout=900) as (url, proc):
                full = measure(url, prompts, args, {"cache": {"policy": "full"}})
                default = measure(url, prompts, args, {})
                info = httpx.get(url + "/info").json()
                out["rows"]["toyllm[full]"] = full
                out["rows"]["toyllm[default]"] = default
                out["toyllm"] = {"vm_hwm_bytes": vm_hwm(proc.pid), "peak_rss_bytes": info.get("peak_rss_bytes"),
                                 "classes": [c["name"] for c in info.get("cache_classes", [])]}
        else:
            policy = peer[peer.index("[") + 1 : -1]
            env = {"OMP_WAIT_POLICY": "passive"} if policy == "passive" else {}
            env["OMP_NUM_THREADS"] = str(args.threads)
            if policy != "passive":
                os.environ.pop("OMP_WAIT_POLICY", None)
            with llama_server(args, args.gguf, env, logs / f"server_peers-{policy}.log") as (url, proc):
                out["rows"][peer] = measure(url, prompts, args, {})
                out["rows"][peer]["vm_hwm_bytes"] = vm_hwm(proc.pid)
        print(json.dumps(out["rows"], indent=1)[-1500:], flush=True)
    out["machine_after"] = machine()
    rows = out["rows"]
    n = str(args.streams)
    best = {k: max((rows[p][k]["tokens_per_s"] for p in rows if p.startswith("llama-server")), default=None)
            for k in ("1", n)}
    ratios = {}
    for p in rows:
        if p.startswith("toyllm") and best["1"]:
            ratios[p] = {k: rows[p][k]["tokens_per_s"] / best[k] for k in ("1", n)}
    out["vs_llama_server_best"] = ratios
    out["scaling"] = {p: rows[p][n]["tokens_per_s"] / rows[p]["1"]["tokens_per_s"] for p in rows}
    args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps({"vs_llama_server_best": ratios, "scaling": out["scaling"]}, indent=1))


if __name__ == "__main__":
    main()
