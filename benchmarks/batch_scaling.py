"""How far batching can raise decode throughput on this machine: the decode step at batch 1 and 16,
the tied output projection alone at 1 and 16 rows (the real `ToyLLM.logits`), and the machine's
float32 matrix-multiply rate, with the model-level throughput ratio of 16 rows to 1 they imply
(before any HTTP work). Run it alone: anything else on the cores skews it.
    .venv/bin/python benchmarks/batch_scaling.py --checkpoint weights/toyllm-base [--json out/scaling.json]"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from lm_head import median_ms

from toyllm_core.checkpoint import load
from toyllm_core.lab.bench import decode_latency
from toyllm_core.machine import machine
from toyllm_core.serving.policies import make_policy


def matmul_gflops(n: int = 2048) -> float:
    """The best this machine does on float32 (a large square matrix product through XLA)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    return 2 * n**3 / median_ms(jax.jit(jnp.matmul), a, a, n=10) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="weights/toyllm-base")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--target", type=float, default=6.0, help="throughput ratio to compare against")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = load(args.checkpoint)[0].for_inference()
    cfg = model.cfg
    cache_cfg = make_policy("snapkv", budget=64)

    def output_layer_flops(rows: int) -> int:
        return 2 * rows * cfg.d_model * cfg.vocab_size

    out: dict = {"checkpoint": args.checkpoint, "context": args.context, "policy": cache_cfg.name,
                 "budget": cache_cfg.budget, "matmul_gflops": matmul_gflops(), "machine": machine()}
    logits = jax.jit(lambda m, h: m.logits(h))
    for rows in (1, args.batch):
        h = jax.random.normal(jax.random.PRNGKey(rows), (rows, cfg.d_model), jnp.float32)
        head_ms = median_ms(logits, model, h)
        step = decode_latency(model, cache_cfg, rows, args.context, steps=32, repeats=5)
        out[f"batch_{rows}"] = {"step_ms": step.median_ms_per_step, "output_layer_ms": head_ms,
                                "output_layer_gflops": output_layer_flops(rows) / head_ms / 1e6}
    one, many = out["batch_1"], out[f"batch_{args.batch}"]
    out["throughput_ratio"] = args.batch * one["step_ms"] / many["step_ms"]
    # What the target needs, and what the output layer alone costs at the machine's best rate.
    out["step_ms_needed_for_target"] = args.batch * one["step_ms"] / args.target
    out["output_layer_ms_at_matmul_rate"] = output_layer_flops(args.batch) / out["matmul_gflops"] / 1e6
    print(f"float32 matmul (2048^2, XLA): {out['matmul_gflops']:.0f} GFLOP/s")
    for rows in (1, args.batch):
        r = out[f"batch_{rows}"]
        print(f"batch {rows:3d}: decode step {r['step_ms']:.2f} ms; output layer alone {r['output_layer_ms']:.2f} ms "
              f"({r['output_layer_gflops']:.0f} GFLOP/s)")
    print(f"{args.batch} rows vs 1: {out['throughput_ratio']:.2f}x the tokens/s; {args.target:g}x needs a batch-"
          f"{args.batch} step of {out['step_ms_needed_for_target']:.2f} ms, and the output layer alone takes "
          f"{out['output_layer_ms_at_matmul_rate']:.2f} ms even at the matmul rate above")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
