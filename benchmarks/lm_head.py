"""The tied output projection alone, three ways: x @ embed.T, x @ unembed (a contiguous [d, vocab]
copy, which ToyLLM.for_inference once kept) and embed @ x.T (what ToyLLM.logits computes now), at the shipped model's shape (GPT-2 vocabulary,
d_model 128), for N rows. Median of interleaved rounds, milliseconds.
    .venv/bin/python benchmarks/lm_head.py [--rows 1,2,4,16] [--rounds 5]"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from toyllm_core.machine import machine


def median_ms(fn, *args, n: int = 200) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--d-model", type=int, default=128)
    args = parser.parse_args()
    embed = jax.random.normal(jax.random.PRNGKey(0), (args.vocab, args.d_model), jnp.float32)
    unembed = jnp.asarray(np.ascontiguousarray(np.asarray(embed).T))
    forms = {"x @ embed.T": (jax.jit(lambda w, x: x @ w.T), embed),
             "x @ unembed": (jax.jit(lambda u, x: x @ u), unembed),
             "embed @ x.T": (jax.jit(lambda w, x: (w @ x.T).T), embed)}
    out = {}
    for n in (int(r) for r in args.rows.split(",")):
        x = jnp.ones((n, args.d_model), jnp.float32)
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.rounds):  # interleaved: this machine's timings drift
            for name, (fn, weights) in forms.items():
                times[name].append(median_ms(fn, weights, x))
        out[n] = {name: statistics.median(t) for name, t in times.items()}
        print(f"rows {n:3d}: " + "   ".join(f"{name} {ms:.3f} ms" for name, ms in out[n].items()))
    print(json.dumps({"rows_ms": out, "machine": machine()}))


if __name__ == "__main__":
    main()
