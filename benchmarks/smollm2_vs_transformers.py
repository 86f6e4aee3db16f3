"""The imported SmolLM2-135M-Instruct against transformers loading the same GGUF, in one run.

- logits: max |difference| over the first 256 tokens of a WikiText text (float32);
- greedy decoding: 64 tokens after that prefix, ours (the engine, full cache) against transformers'
  generate, position by position;
- token perplexity at context 1024 over the first N non-overlapping windows, ours in float32 and
  bfloat16 against transformers in float32 and bfloat16;
- with --write-reference, the numbers `make test-model` checks: transformers' float32 logits on the
  first 512 tokens of the model's licence text (shipped in the same pinned wheel), and on the first
  WikiText window when a WikiText file is given.

Usage (needs the hf extra: torch, accelerate):
    .venv/bin/python benchmarks/smollm2_vs_transformers.py --wikitext PATH/wiki.valid.raw \
        --json out/smollm2-vs-transformers.json [--windows 32] [--write-reference tests/model/reference.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from toyllm_core import checkpoint as ckpt
from toyllm_core.interchange.pull import fetch_gguf
from toyllm_core.machine import machine
from toyllm_core.serving.generate import generate_tokens
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.tokenizer import load_tokenizer
from toyllm_core.weights import DEFAULT_CHECKPOINT, DEFAULT_MODEL

REFERENCE_TOKENS = 512
REFERENCE_POSITIONS = list(range(0, REFERENCE_TOKENS, 32))  # where the top-8 logits are stored


def nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of ids[1:] under logits[:-1] (float64 log-softmax)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]]


def reference_numbers(logits: np.ndarray, ids: np.ndarray) -> dict:
    top = {str(p): np.argsort(-logits[p])[:8].tolist() for p in REFERENCE_POSITIONS}
    return {"tokens": len(ids), "token_ids_sha": _ids_sha(ids), "mean_nll": float(nll(logits, ids).mean()),
            "argmax": logits.argmax(-1).tolist(),
            "top8": {p: {"ids": t, "logits": [float(logits[int(p), i]) for i in t]} for p, t in top.items()}}


def _ids_sha(ids) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--wikitext", type=Path, required=True, help="WikiText-103 raw text (e.g. wiki.valid.raw).")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--write-reference", type=Path)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    out = {"machine": machine(), "checkpoint": str(args.checkpoint), "wikitext": args.wikitext.name}
    tok = load_tokenizer(args.checkpoint)
    ours32, _ = ckpt.load(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path, _ = fetch_gguf(DEFAULT_MODEL, Path(tmp), log=lambda m: None)
        t = time.perf_counter()
        hf32 = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32).eval()
        out["transformers_gguf_load_s"] = time.perf_counter() - t

    def theirs(model, ids):
        with torch.no_grad():
            return model(torch.tensor(np.asarray(ids)[None])).logits[0].float().numpy()

    def ours_fn(model):
        f = jax.jit(lambda t: model(t).astype(jnp.float32))
        return lambda ids: np.asarray(f(np.asarray(ids, np.int32)))

    text = args.wikitext.read_text()
    ids = np.asarray(tok(text[: 400_000 + 6000 * args.windows]).input_ids)
    prefix = ids[:256]
    ours32_fn = ours_fn(ours32)
    diff = np.abs(ours32_fn(prefix) - theirs(hf32, prefix))
    out["logits_256"] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    print("logits over 256 positions:", out["logits_256"], flush=True)

    # Greedy: 64 tokens after the prefix.
    ours_tokens = [g.token for g in generate_tokens(ours32, [prefix.tolist()], [make_policy("full")],
                                                    [SamplingParams(max_new_tokens=64, temperature=0.0,
                                                                    ignore_eos=True)])]
    with torch.no_grad():
        hf_tokens = hf32.generate(torch.tensor(prefix[None]), max_new_tokens=64, do_sample=False,
                                  min_new_tokens=64)[0, 256:].tolist()
    same = [a == b for a, b in zip(ours_tokens, hf_tokens, strict=True)]
    out["greedy_64"] = {"agreement": sum(same) / len(same), "identical_prefix": same.index(False) if False in same
                        else len(same)}
    print("greedy 64:", out["greedy_64"], flush=True)

    # Perplexity at context 1024.
    windows = [ids[i * 1024:(i + 1) * 1024] for i in range(args.windows)]
    assert len(windows[-1]) == 1024, "not enough text for that many windows"
    ours16_fn = ours_fn(ours32.astype(jnp.bfloat16))
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ppl = {}
    for name, fn in [("ours_float32", ours32_fn), ("transformers_float32", lambda w: theirs(hf32, w)),
                     ("ours_bfloat16", ours16_fn), ("transformers_bfloat16", lambda w: theirs(hf16, w))]:
        t = time.perf_counter()
        losses = np.concatenate([nll(fn(w), w) for w in windows])
        ppl[name] = {"ppl": float(np.exp(losses.mean())), "seconds": time.perf_counter() - t}
        print(name, ppl[name], flush=True)
    for dtype in ("float32", "bfloat16"):
        ppl[f"relative_diff_{dtype}"] = ppl[f"ours_{dtype}"]["ppl"] / ppl[f"transformers_{dtype}"]["ppl"] - 1
    out["perplexity_1024"] = {"windows": args.windows, **ppl}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")

    if args.write_reference:
        licence = (args.checkpoint / "LICENSE").read_text()
        lic_ids = np.asarray(tok(licence).input_ids[:REFERENCE_TOKENS])
        ref = {"model": DEFAULT_MODEL, "produced_by": "benchmarks/smollm2_vs_transformers.py (transformers, "
               "float32, loading the pinned GGUF)", "licence_window": reference_numbers(theirs(hf32, lic_ids), lic_ids),
               "wikitext_window_0": reference_numbers(theirs(hf32, windows[0]), windows[0])}
        args.write_reference.parent.mkdir(parents=True, exist_ok=True)
        args.write_reference.write_text(json.dumps(ref) + "\n")
        print("wrote", args.write_reference)


if __name__ == "__main__":
    main()
