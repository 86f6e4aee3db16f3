"""What KVzip's scoring costs: its reconstruction pass against one prefill of the same context.

    python benchmarks/kvzip_cost.py --checkpoint weights/smollm2-135m-instruct --lengths 1024,2048,4096 \\
        --json out/kvzip_cost.json

Everything runs through the engine as the server runs it, in 512-token chunks, after one untimed run
(which compiles); each time is the median of `--repeats` runs:
- one prefill: the `--lengths` context into a full-cache class of that many tokens (its attention
  spans fit the context);
- the same prefill into a kvzip class's prefill cache (whose spans fit its larger prefill window),
  then the reconstruction pass over it (the repeat prompt and the next part of the context, piece
  by piece, each cut off after it ran; `Engine._reconstruct`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from toyllm_core.chat import ChatTemplate
from toyllm_core.machine import machine
from toyllm_core.serving.engine import CacheClass, Engine
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.policies.kvzip import repeat_prompt_ids
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("weights/smollm2-135m-instruct"))
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("out/kvzip_cost.json"))
    args = ap.parse_args()
    loaded = load_model(args.checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    repeat = repeat_prompt_ids(tokenizer, ChatTemplate.of(tokenizer))
    lengths = [int(x) for x in args.lengths.split(",")]
    policy = make_policy("kvzip", budget=args.budget, cold_bits=0)
    cls = CacheClass.make(policy, 1, 512, prefill_window=max(lengths) + 16)
    full = {n: CacheClass.make(make_policy("full"), 1, 512, n) for n in lengths}
    engine = Engine(model, [cls, *full.values()], repeat_prompt=repeat)
    rng = np.random.default_rng(0)
    out = {"machine_before": machine(), "settings": {k: str(v) for k, v in vars(args).items()},
           "repeat_prompt_tokens": len(repeat), "rows": []}

    def prefill(n, tokens, klass):
        job = engine.begin(tokens, klass, SamplingParams(max_new_tokens=1))
        t0 = time.perf_counter()
        while job.done < n:
            real = min(512, n - job.done)
            engine._run_piece(job, real, max(16, 1 << (real - 1).bit_length()))
        jax.block_until_ready(job.cache)
        return job, time.perf_counter() - t0

    def one(n):
        tokens = rng.integers(0, model.cfg.vocab_size, n).astype(np.int32)
        job, plain = prefill(n, tokens, full[n])
        engine.cancel(job)
        job, into_kvzip = prefill(n, tokens, cls)
        t0 = time.perf_counter()
        engine._reconstruct(job)
        jax.block_until_ready(job.cache)
        recon = time.perf_counter() - t0
        engine.cancel(job)
        return plain, into_kvzip, recon

    for n in lengths:
        one(n)  # compiles
        runs = [one(n) for _ in range(args.repeats)]
        plain, into_kvzip, recon = (statistics.median(r[i] for r in runs) for i in range(3))
        row = {"context_tokens": n, "prefill_s": plain, "prefill_kvzip_class_s": into_kvzip,
               "reconstruction_s": recon, "ratio": recon / plain}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    out["machine_after"] = machine()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
