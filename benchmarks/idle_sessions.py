"""Total KV-cache bytes a server holds for N idle sessions of about T tokens each, per cache policy.

    python benchmarks/idle_sessions.py --url http://127.0.0.1:8000 --sessions 100 --tokens 1024 \
        --policies snapkv,full --budget 64 --json out/idle_sessions.json

Each session gets one request: a prompt of T - 1 tokens and one generated token (so T tokens seen,
which a `full` cache can hold within a 1024-token context). The server's own gauges are read
before and after; sessions are deleted at the end.
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


def gauge(url: str, name: str, policy: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'{name}{{policy="{policy}"}}'):
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
        for policy in args.policies.split(","):
            cache = {"policy": policy} if policy == "full" else {"policy": policy, "budget": args.budget}
            # Sessions left by earlier runs count in the gauges too: measure what these sessions add.
            before = gauge(args.url, "toyllm_kv_cache_bytes", policy)
            full_before = gauge(args.url, "toyllm_kv_cache_full_equivalent_bytes", policy)
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
            report["policies"][policy] = {"cache_bytes": kept, "mean_tokens_seen": float(np.mean(seen)),
                                          "full_equivalent_bytes": full}
            print(f"{policy}: {args.sessions} idle sessions of ~{np.mean(seen):.0f} tokens hold {kept / 2**20:.2f} MiB "
                  f"of KV cache (full-cache equivalent {full / 2**20:.2f} MiB)")
            for sid in ids:
                c.delete(f"/sessions/{sid}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
