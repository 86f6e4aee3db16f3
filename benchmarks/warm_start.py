"""A cold start and a warm start of the default server: seconds from `toyllm serve` to `/ready` 200,
the warm-up's programs (loaded whole from the program store, or built), the store's size on disk,
and the peak resident memory by phase that /info reports.

    python benchmarks/warm_start.py --json out/warm_start.json

The first start gets an empty store (a fresh temporary directory), the second the same one.
Extra `TOYLLM_*` settings come from the environment, as for `toyllm serve`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx

from server.subprocess_server import serve
from toyllm_core.machine import machine


def _start(env: dict, log: Path, timeout: float) -> dict:
    started = time.perf_counter()
    with serve(env, log, timeout) as (url, _):
        ready = time.perf_counter() - started
        info = httpx.get(url + "/info", timeout=10).json()
    warm = info["warmup"]
    return {"ready_s": round(ready, 2), "warmup_s": round(warm["seconds"], 2), "programs": warm["programs"],
            "built": warm["compilations"], "read_from_cache": warm["cache_hits"],
            "loaded_whole": warm.get("loaded", 0),
            "peak_rss_bytes": info["peak_rss_bytes"], "store_bytes": warm["compile_cache_bytes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--timeout", type=float, default=600)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"TOYLLM_COMPILE_CACHE_DIR": str(Path(tmp) / "xla")}
        cold = _start(env, Path(tmp) / "cold.log", a.timeout)
        warm = _start(env, Path(tmp) / "warm.log", a.timeout)
        size = warm["store_bytes"]
    out = {"cold": cold, "warm": warm, "compile_cache_bytes": size, "machine": machine()}
    print(f"cold start: ready in {cold['ready_s']} s ({cold['built']} programs compiled); warm start: ready in "
          f"{warm['ready_s']} s ({warm['loaded_whole']} programs loaded whole, {warm['built']} built); "
          f"program store {size / 2**20:.1f} MiB")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
