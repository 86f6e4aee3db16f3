"""The forms of a decode step's attention on XLA's CPU backend, at SmolLM2-135M's shapes (3 KV heads,
groups of 3, head_dim 64, 30 layers in a `lax.scan` over bfloat16 keys and values stored as their
bits): the two dots in bfloat16 (the cache's dtype), the keys and values converted to float32 first,
and a multiply-and-reduce without dots. Writes JSON with the CPU model and load average.

    .venv/bin/python benchmarks/attention_forms.py --json out/attention_forms.json
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
from toyllm_core.serving.model import attention_weights

KV, GROUP, HEAD_DIM, LAYERS = 3, 3, 64, 30


def attend_in(dtype):
    def attend(q, k, v, q_pos, k_pos):
        k, v = k.astype(dtype), v.astype(dtype)
        w = attention_weights(q, k, q_pos, k_pos)  # [B, kv, g, 1, S]
        return jax.lax.dot_general(w.astype(v.dtype), v, (((4,), (2,)), ((0, 1), (0, 1))),
                                   preferred_element_type=jnp.float32)
    return attend


def attend_reduce(q, k, v, q_pos, k_pos):
    s = jnp.sum(k.astype(jnp.float32)[:, :, None] * q[:, :, :, 0, None, :], axis=-1) / np.sqrt(HEAD_DIM)
    s = jnp.where((k_pos >= 0)[:, :, None, :], s, -1e30)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.sum(w[..., None] * v.astype(jnp.float32)[:, :, None], axis=3)


def over_layers(attend):
    @jax.jit
    def run(q, q_pos, kb, vb, k_pos):
        def body(acc, xs):
            k, v, kp = xs
            k, v = (jax.lax.bitcast_convert_type(a, jnp.bfloat16) for a in (k, v))
            return acc + jnp.sum(attend(q + acc, k, v, q_pos, kp)) * 1e-9, None
        return jax.lax.scan(body, jnp.float32(0), (kb, vb, k_pos))[0]
    return run


def interleaved_ms(fns: dict, *args, rounds: int = 15) -> dict:
    """Median ms per call of each of `fns`, called in turn round after round (this machine's speed
    drifts; alternating keeps the forms' ratios honest)."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) * 1e3 for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--shapes", default="1x1024,1x4096,16x256,16x1024", help="rows x slots, comma-separated")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    forms = {"bfloat16 dots": attend_in(jnp.bfloat16), "float32 dots": attend_in(jnp.float32),
             "multiply and reduce": attend_reduce}
    out: dict = {"machine": machine(), "ms_for_30_layers": {}}
    for shape in args.shapes.split(","):
        rows, slots = (int(n) for n in shape.split("x"))
        kv = [jax.lax.bitcast_convert_type(jnp.asarray(rng.normal(size=(LAYERS, rows, KV, slots, HEAD_DIM)),
                                                       jnp.bfloat16), jnp.uint16) for _ in range(2)]
        k_pos = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (LAYERS, rows, KV, slots))
        q = jnp.asarray(rng.normal(size=(rows, KV, GROUP, 1, HEAD_DIM)), jnp.float32)
        q_pos = jnp.full((rows, 1), slots, jnp.int32)
        out["ms_for_30_layers"][shape] = interleaved_ms({name: over_layers(f) for name, f in forms.items()},
                                                        q, q_pos, *kv, k_pos)
        print(shape, out["ms_for_30_layers"][shape], flush=True)
    out["machine_end"] = machine()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
