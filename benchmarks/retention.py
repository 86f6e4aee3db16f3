"""The playground's retention route on a long SmolLM2 session: its time and size.

    python benchmarks/retention.py --json out/retention.json

Starts the default server, makes one session of about `--tokens` tokens (random words, one turn, a
few generated tokens), then times GET /sessions/{id}/retention `--repeats` times from this client
(whole: every token's text; and `texts_from` the end: what the playground asks for after a turn).
Goals: at most 50 ms and 64 KB at 4,096 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from server.subprocess_server import serve
from toyllm_core.machine import machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("weights/smollm2-135m-instruct"))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    words = ["river", "music", "hills", "road", "lantern", "harbor", "meadow", "copper", "falcon", "violet"]
    prompt = " ".join(np.random.default_rng(0).choice(words, a.tokens - 8).tolist())
    env = {"TOYLLM_CHECKPOINT": str(a.checkpoint), "TOYLLM_SESSION_DIR": "", "TOYLLM_MAX_PROMPT_TOKENS": "8192"}
    report = {"machine": machine()}
    with serve(env, Path("out") / "retention_server.log") as (url, _), httpx.Client(base_url=url, timeout=600) as c:
        done = c.post("/generate", json={"prompt": prompt, "max_new_tokens": 8, "stream": False}).json()
        sid = done["session_id"]
        report["session"] = done["cache"]
        for name, params in (("whole", {}), ("new_texts_only", {"texts_from": done["cache"]["tokens_seen"]})):
            times, size = [], 0
            for _ in range(a.repeats):
                started = time.perf_counter()
                r = c.get(f"/sessions/{sid}/retention", params=params)
                times.append(1000 * (time.perf_counter() - started))
                r.raise_for_status()
                size = len(r.content)
            report[name] = {"ms_p50": statistics.median(times), "ms_max": max(times), "bytes": size}
            print(f"{name}: p50 {statistics.median(times):.1f} ms, max {max(times):.1f} ms, {size / 1024:.1f} KiB "
                  f"({done['cache']['tokens_seen']} tokens)")
    report["machine_after"] = machine()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
