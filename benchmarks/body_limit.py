"""A huge chunked upload against a live server: how fast it is refused (413), and how long /health
takes meanwhile (the event loop must stay free). Starts `toyllm serve` on the tiny random model.

    .venv/bin/python benchmarks/body_limit.py --mb 20 --json out/body_limit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_utils import live_server  # the tests' helper that starts `toyllm serve`

from toyllm_core.machine import machine

CHUNK = 65536


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=20, help="Body size in MiB, sent chunked (no Content-Length).")
    p.add_argument("--json", type=Path, help="Write the result here.")
    args = p.parse_args()
    log = Path("out/body_limit.server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with live_server({"TOYLLM_PRESET": "tiny", "TOYLLM_WARMUP": "false"}, log) as url:
        def body():
            yield b'{"prompt": "'
            for _ in range(args.mb * 2**20 // CHUNK):
                yield b"x" * CHUNK
            yield b'"}'

        health, stop = [], threading.Event()

        def probe():
            with httpx.Client(base_url=url) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    c.get("/health")
                    health.append(time.perf_counter() - t)
                    time.sleep(0.002)

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(0.05)
        started = time.perf_counter()
        r = httpx.post(url + "/generate", content=body(), headers={"content-type": "application/json"}, timeout=120)
        took = time.perf_counter() - started
        stop.set()
        prober.join()
    result = {"body_mib": args.mb, "status": r.status_code, "seconds_to_answer": took,
              "health_probes": len(health), "health_max_ms": 1e3 * max(health),
              "health_p50_ms": 1e3 * sorted(health)[len(health) // 2], "machine": machine()}
    print(f"{args.mb} MiB chunked: {r.status_code} in {took:.3f} s; /health during it: {len(health)} probes, "
          f"max {result['health_max_ms']:.1f} ms, p50 {result['health_p50_ms']:.1f} ms "
          f"({result['machine']['cpu_model']}, load {result['machine']['load_average']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
