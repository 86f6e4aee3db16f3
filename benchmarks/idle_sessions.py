"""Total KV-cache bytes a server holds for N idle sessions of about T tokens each, per cache policy.

    python benchmarks/idle_sessions.py --url http://127.0.0.1:8000 --sessions 100 --tokens 1024 \
        --policies snapkv,full --budget 64 --json out/idle_sessions.json

Each session gets one request: a prompt of T - 1 tokens and one generated token (so T tokens seen,
which a `full` cache can hold within a 1024-token context). The server's own gauges are read
before and after (kept bytes, their full-cache equivalent, and the bytes allocated for them), and
checked against the arithmetic: sessions x tokens x the model's KV bytes per token (from /info) for
full caches; sessions x the class's row capacity x bytes per token for what is allocated. Sessions
are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
import numpy as np

from server.loadtest import make_prompt
from toyllm_core.machine import machine


def gauge(url: str, name: str, policy: str | None = None) -> float:
    prefix = name + (f'{{policy="{policy}"}}' if policy else " ")
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--policies", default="snapkv,full")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    report = {"sessions": args.sessions, "tokens": args.tokens, "budget": args.budget, "policies": {},
              "machine": machine()}
    with httpx.Client(base_url=args.url, timeout=600) as c:
        info = c.get("/info").json()
        per_token = info["kv_bytes_per_token"]
        report["kv_bytes_per_token"] = per_token
        for policy in args.policies.split(","):
            cache = {"policy": policy} if policy == "full" else {"policy": policy, "budget": args.budget}
            # Sessions left by earlier runs count in the gauges too: measure what these sessions add.
            before = gauge(args.url, "toyllm_kv_cache_bytes", policy)
            full_before = gauge(args.url, "toyllm_kv_cache_full_equivalent_bytes", policy)
            allocated_before = gauge(args.url, "toyllm_kv_cache_capacity_bytes")
            ids, seen = [], []
            for _ in range(args.sessions):
                words = args.tokens - 1
                while True:  # about one token per word; trim until the prompt fits exactly
                    r = c.post("/generate", json={"prompt": make_prompt(rng, words), "max_new_tokens": 1,
                                                  "temperature": 0, "stream": False, "cache": cache})
                    if r.status_code == 200:
                        break
                    words -= 8
                    if words <= 0:
                        sys.exit(f"error: {r.status_code} {r.text}")
                done = r.json()
                ids.append(done["session_id"])
                seen.append(done["cache"]["tokens_seen"] + 1)  # + the generated token, pending
            kept = gauge(args.url, "toyllm_kv_cache_bytes", policy) - before
            full = gauge(args.url, "toyllm_kv_cache_full_equivalent_bytes", policy) - full_before
            allocated = gauge(args.url, "toyllm_kv_cache_capacity_bytes") - allocated_before
            # The row capacity of the class these sessions live in (a full session sits in the smallest
            # full class that holds it: no single capacity).
            capacity = None if policy == "full" else next(
                (k["capacity"] for k in info["cache_classes"] if k["policy"] == policy and k.get("budget") == args.budget),
                None)
            arithmetic_full = sum(seen) * per_token
            report["policies"][policy] = {
                "cache_bytes": kept, "mean_tokens_seen": float(np.mean(seen)), "full_equivalent_bytes": full,
                "allocated_bytes": allocated, "full_equivalent_arithmetic": arithmetic_full,
                "row_capacity": capacity,
                "allocated_arithmetic": None if capacity is None else args.sessions * capacity * per_token,
                "allocated_over_full": allocated / arithmetic_full}
            print(f"{policy}: {args.sessions} idle sessions of ~{np.mean(seen):.0f} tokens hold {kept / 2**20:.2f} MiB "
                  f"of KV cache in {allocated / 2**20:.2f} MiB allocated (full-cache equivalent {full / 2**20:.2f} "
                  f"MiB; arithmetic {arithmetic_full / 2**20:.2f} MiB): allocated / full = "
                  f"1/{arithmetic_full / max(allocated, 1):.1f}")
            for sid in ids:
                c.delete(f"/sessions/{sid}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
