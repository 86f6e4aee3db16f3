"""The forms of a decode-step matmul on XLA's CPU backend, at SmolLM2-135M's MLP shape: float32 vs
bfloat16 weights, one row vs two, and a layer's weights sliced out of the stacked array inside a
`lax.scan` (as bfloat16, or as its uint16 bits). Writes JSON with the CPU model and load average.

    .venv/bin/python benchmarks/matmul_forms.py --json out/matmul_forms.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from toyllm_core.machine import machine
from toyllm_core.serving.model import linear


def median_us(fn, *args, n: int = 100, rounds: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / n * 1e6)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w32 = jnp.asarray(rng.normal(size=(1536, 576)), jnp.float32)
    w16 = w32.astype(jnp.bfloat16)
    dn = (((1,), (1,)), ((), ()))
    raw = jax.jit(lambda x, w: jax.lax.dot_general(x.astype(w.dtype), w, dn, preferred_element_type=jnp.float32))
    out: dict = {"machine": machine(), "shape": [1536, 576], "dot_us": {}}
    for rows in (1, 2, 16):
        x = jnp.ones((rows, 576), jnp.float32)
        out["dot_us"][str(rows)] = {"float32": median_us(raw, x, w32), "bfloat16": median_us(raw, x, w16),
                                    "bfloat16 via linear()": median_us(jax.jit(linear), x, w16)}
    stacked32 = jnp.asarray(rng.normal(size=(args.layers, 1536, 576)), jnp.float32)
    stacked16 = stacked32.astype(jnp.bfloat16)
    bits = jax.lax.bitcast_convert_type(stacked16, jnp.uint16)

    def scanned(as_bits: bool):
        def run(x, ws):
            def body(x, w):
                w = jax.lax.bitcast_convert_type(w, jnp.bfloat16) if as_bits else w
                return x + linear(x, w)[:, :576], None

            return jax.lax.scan(body, x, ws)[0]

        return jax.jit(run)

    x = jnp.ones((1, 576), jnp.float32)
    out["scan_us_per_layer"] = {
        "float32": median_us(scanned(False), x, stacked32, n=10) / args.layers,
        "bfloat16": median_us(scanned(False), x, stacked16, n=10) / args.layers,
        "bfloat16 sliced as uint16": median_us(scanned(True), x, bits, n=10) / args.layers,
    }
    out["machine_end"] = machine()
    print(json.dumps(out, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
