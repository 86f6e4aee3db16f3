"""Speed of the served model next to transformers on the same weights, in one run.

Both sides run SmolLM2-135M-Instruct as imported into weights/ (transformers loads the same
checkpoint directory, which is in its own Llama layout), in float32 and bfloat16:
- decode: ms per step and per token with a full cache after a 512-token prompt (64 timed greedy
  steps), at batch 1 and 16; ours through the `Engine` the server uses, theirs with its KV cache;
- prefill: tokens/s for one 512- and one 2048-token prompt (ours in 512-token chunks, as served).
Same thread count on both sides (`--threads`, default: every core), OMP_WAIT_POLICY=passive for
torch's OpenMP pool. Medians over `--repeats` timed runs after a warm-up run.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/smollm2_speed.py --json out/smollm2-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from toyllm_core import checkpoint as ckpt
from toyllm_core.bench import decode_latency
from toyllm_core.engine import CacheClass, Engine
from toyllm_core.machine import machine
from toyllm_core.policies import make_policy
from toyllm_core.sampling import SamplingParams
from toyllm_core.weights import DEFAULT_CHECKPOINT

PROMPT = 512
STEPS = 64


def ours_prefill(model, length: int, repeats: int) -> float:
    """Median tokens/s of prefilling one `length`-token prompt (and sampling its first token)."""
    cls = CacheClass.make(make_policy("full"), 1, 512, length + 16)
    engine = Engine(model, [cls])
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(0)
    times = []
    for rep in range(repeats + 1):
        prompt = rng.integers(0, model.cfg.vocab_size, length)
        start = time.perf_counter()
        seq = engine.run_prefill(prompt, cls, params)
        elapsed = time.perf_counter() - start
        engine.free(seq)
        if rep:
            times.append(elapsed)
    return length / statistics.median(times)


def theirs(directory: Path, dtype_name: str, repeats: int) -> dict:
    import torch
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    m = transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
    vocab = m.config.vocab_size
    out = {}
    for batch in (1, 16):
        times = []
        for rep in range(repeats + 1):
            ids = torch.randint(0, vocab, (batch, PROMPT))
            with torch.no_grad():
                r = m(ids, use_cache=True)
                past, tok = r.past_key_values, r.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(STEPS):
                    r = m(tok, past_key_values=past, use_cache=True)
                    past, tok = r.past_key_values, r.logits[:, -1:].argmax(-1)
                elapsed = time.perf_counter() - start
            if rep:
                times.append(elapsed / STEPS * 1e3)
        ms = statistics.median(times)
        out[f"decode_batch{batch}"] = {"ms_per_step": ms, "ms_per_token": ms / batch}
    for length in (512, 2048):
        times = []
        for rep in range(repeats + 1):
            ids = torch.randint(0, vocab, (1, length))
            with torch.no_grad():
                start = time.perf_counter()
                m(ids, use_cache=True).logits[:, -1].argmax(-1)
                elapsed = time.perf_counter() - start
            if rep:
                times.append(elapsed)
        out[f"prefill_{length}_tokens_per_s"] = length / statistics.median(times)
    return out


def ours(directory: Path, dtype_name: str, repeats: int) -> dict:
    model, _ = ckpt.load(directory)
    model = model.astype({"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]).for_inference()
    out = {}
    for batch in (1, 16):
        r = decode_latency(model, make_policy("full"), batch, PROMPT + STEPS, STEPS, repeats=repeats)
        out[f"decode_batch{batch}"] = {"ms_per_step": r.median_ms_per_step, "ms_per_token": r.median_ms_per_token}
    for length in (512, 2048):
        out[f"prefill_{length}_tokens_per_s"] = ours_prefill(model, length, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "checkpoint": str(args.checkpoint), "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "prompt_tokens_for_decode": PROMPT,
              "timed_steps": STEPS, "jax_devices": [str(d) for d in jax.devices()],
              "torch": torch.__version__}
    for dtype in ("float32", "bfloat16"):
        for name, fn in (("toyllm", ours), ("transformers", theirs)):
            t = time.perf_counter()
            result[f"{name}_{dtype}"] = fn(args.checkpoint, dtype, args.repeats)
            print(name, dtype, json.dumps(result[f"{name}_{dtype}"]), f"({time.perf_counter() - t:.0f} s)", flush=True)
    for dtype in ("float32", "bfloat16"):
        a, b = result[f"toyllm_{dtype}"], result[f"transformers_{dtype}"]
        result[f"ratio_{dtype}"] = {
            **{f"decode_batch{n}_speedup": b[f"decode_batch{n}"]["ms_per_step"] / a[f"decode_batch{n}"]["ms_per_step"]
               for n in (1, 16)},
            **{f"prefill_{n}_speedup": a[f"prefill_{n}_tokens_per_s"] / b[f"prefill_{n}_tokens_per_s"]
               for n in (512, 2048)}}
    result["machine_after"] = machine()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}, indent=2))


if __name__ == "__main__":
    main()
