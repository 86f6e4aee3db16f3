"""Engine-core measurements, written as one JSON (the CPU model and load average in it):

- compile time of the decode and prefill programs at 4 and 30 layers (SmolLM2-135M's dimensions);
- warm-up of a server's default cache classes: program count and wall time (smollm2-135m, toyllm-base);
- decode ms/token at batch 1 and 16, float32 vs bfloat16, contexts 1024 and 4096;
- batch 1 against its floor: weight bytes read per step / this machine's memory read bandwidth.

    .venv/bin/python benchmarks/engine_core.py --json out/engine_core.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from toyllm_core import checkpoint as ckpt
from toyllm_core.config import get_preset
from toyllm_core.machine import machine
from toyllm_core.serving.backend import to_bits
from toyllm_core.serving.engine import CacheClass, plan_classes, warm_up
from toyllm_core.serving.engine import steps as engine_steps
from toyllm_core.serving.model import ToyLLM
from toyllm_core.serving.policies import make_policy

STEPS_PER_CALL = 4


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth: the best of `repeats` sums over a float32 array much larger than the
    caches (NumPy's sum is vectorised and bound by memory)."""
    x = np.ones(int(gib * 2**30 / 4), np.float32)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bytes_read_per_step(model: ToyLLM) -> int:
    """Bytes a decode step reads: every block weight, the final norm and the output projection."""
    leaves = jax.tree.leaves(model.blocks) + [model.norm.weight, model.embed]
    return sum(x.size * x.dtype.itemsize for x in leaves)


def compile_times(layers: int, repeats: int = 3) -> dict:
    """Seconds to compile (XLA compile of the lowered program, nothing run) the batch-16 decode call and a 512-token
    prefill chunk, SmolLM2-135M's dimensions with `layers` layers; the best of `repeats`."""
    cfg = get_preset("smollm2-135m").replace(n_layers=layers)
    model = ToyLLM(cfg, jax.random.PRNGKey(0)).astype(jnp.bfloat16).for_inference()
    cls = CacheClass.make(make_policy("snapkv"), 16, 512)
    state = engine_steps.new_cache(model, cls, cls.slots, cls.capacity)
    prefill = engine_steps.new_cache(model, cls, 1, cls.prefill_capacity)
    calls = {
        "decode_16": lambda: engine_steps.decode_steps.lower(
            model, state, np.int32(1), np.zeros((16, len(engine_steps.DECODE_INPUTS)), np.int32), n_rows=16,
            max_steps=STEPS_PER_CALL),
        "chunk_512": lambda: engine_steps.prefill_chunk.lower(model, prefill, np.zeros((1, 512), np.int32),
                                                              np.array([512], np.int32)),
    }
    out = {}
    for name, lower in calls.items():
        best = float("inf")
        for _ in range(repeats):
            jax.clear_caches()  # or the second compile is a cache hit
            lowered = lower()
            t = time.perf_counter()
            lowered.compile()
            best = min(best, time.perf_counter() - t)
        out[f"{name}_s"] = best
    return out


def filled_state(model: ToyLLM, cls: CacheClass, rows: int, context: int):
    """A decode state whose first `rows` rows hold `context` random keys and values."""
    cache = engine_steps.new_cache(model, cls, cls.slots, cls.capacity)
    rng = np.random.default_rng(0)
    k = rng.normal(size=cache.k.shape).astype(np.float32)
    k = to_bits(jnp.asarray(k, model.dtype))  # stored as the cache stores them
    pos = np.where(np.arange(cls.capacity) < context, np.arange(cls.capacity), -1).astype(np.int32)
    pos = np.broadcast_to(pos, cache.pos.shape).copy()
    pos[:, rows:] = -1
    length = np.where(np.arange(cls.slots) < rows, context, 0).astype(np.int32)
    return cache.__class__(k=k, v=jnp.array(k), pos=jnp.asarray(pos), length=jnp.asarray(length),
                           next_pos=jnp.asarray(length))


def decode_ms(model: ToyLLM, batch: int, context: int, calls: int = 6) -> dict:
    cls = CacheClass.make(make_policy("full"), batch, 512, context + STEPS_PER_CALL * (calls + 1))
    state = filled_state(model, cls, batch, context)
    z = np.zeros(batch, np.int32)
    inputs = engine_steps.decode_inputs(z, np.full(batch, 10**6, np.int32), np.zeros((batch, 2), np.uint32),
                                        np.zeros(batch, np.float32), z, np.ones(batch, np.float32), z - 1, z)
    times = []
    for i in range(calls + 1):
        t = time.perf_counter()
        state, out, *_ = engine_steps.decode_steps(model, state, np.int32(STEPS_PER_CALL), inputs, n_rows=batch,
                                                   max_steps=STEPS_PER_CALL)
        jax.block_until_ready(out)
        if i:  # the first call compiles
            times.append((time.perf_counter() - t) / STEPS_PER_CALL)
    step = statistics.median(times) * 1e3
    return {"ms_per_step": step, "ms_per_token": step / batch}


def server_warm_up(model: ToyLLM, max_running: int = 32, state_bytes: int = 1 << 30) -> dict:
    """The default server configuration's classes (snapkv budget 64 + full) and their warm-up."""
    ctx = model.cfg.context_length
    full_tokens = [n for n in (2048,) if n < ctx] + [ctx]
    classes = plan_classes([make_policy("snapkv"), make_policy("full")], model.kv_bytes_per_token, max_running,
                           state_bytes, 512, full_tokens)
    jax.clear_caches()
    report = warm_up(model, classes, STEPS_PER_CALL, log=print, every_s=15)
    report["classes"] = [c.describe() for c in classes]
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--parts", default="bandwidth,compile,decode,warmup")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    result: dict = {"machine_start": machine()}
    models = {
        "smollm2-135m": lambda dt: ToyLLM(get_preset("smollm2-135m"), jax.random.PRNGKey(0)).astype(dt),
        "toyllm-base": lambda dt: ckpt.load("weights/toyllm-base")[0].astype(dt),
    }
    if "bandwidth" in parts:
        bw = read_bandwidth_gb_s()
        result["read_bandwidth_gb_s"] = bw
        print(f"memory read bandwidth {bw:.1f} GB/s")
    if "compile" in parts:
        result["compile"] = {str(n): compile_times(n) for n in (4, 30)}
        print("compile", result["compile"])
    if "decode" in parts:
        result["decode"] = []
        for name, make in models.items():
            for dtype in ("float32", "bfloat16"):
                model = make(getattr(jnp, dtype)).for_inference()
                floor_ms = bytes_read_per_step(model) / (result.get("read_bandwidth_gb_s", 10.0) * 1e9) * 1e3
                for context in (1024, 4096):
                    if name == "toyllm-base" and context > model.cfg.context_length:
                        continue
                    for batch in (1, 16):
                        r = {"model": name, "dtype": dtype, "context": context, "batch": batch,
                             **decode_ms(model, batch, context), "weight_bytes": bytes_read_per_step(model),
                             "floor_ms_per_step": floor_ms}
                        r["step_over_floor"] = r["ms_per_step"] / floor_ms
                        result["decode"].append(r)
                        print(json.dumps(r))
    if "warmup" in parts:
        result["warmup"] = {}
        for name, make in models.items():
            result["warmup"][name] = server_warm_up(make(jnp.bfloat16).for_inference())
            print(name, {k: v for k, v in result["warmup"][name].items() if k != "classes"})
    result["machine_end"] = machine()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
