"""The two-tier session cache on a long session: the follow-up turn's time to first token against
re-prefilling the whole history, the decode step with a small hot set against the full cache, and
the bytes each tier holds at rest against the full cache.

    python benchmarks/two_tier.py --checkpoint weights/smollm2-135m-instruct --doc-tokens 4096 \\
        --budget 512 --corpus offline:data/offline --json out/two_tier.json

A session's turn 1 is a `--doc-tokens` document with a question; turn 2 asks another question.
Everything runs through the engine and the core `Session`, as the server runs a session's turn; each
timing is the median of `--repeats` runs after one untimed run (which compiles).
- follow-up TTFT: turn 2 of the two-tier session, from `begin` to its first token (all but its last
  128 prompt tokens against the hot cache, hot ∪ cold recalled, the last tokens against both, the
  re-selection);
  against the same history (turn 1, its reply, turn 2) prefilled from scratch into a full cache;
- decode step: ms per token, batch 1, a row decoding after the history (the last
  `--decode-tokens` - `--decode-warmup` tokens, compressions included), hot `--budget` against the
  full cache;
- at rest: after turn 2, hot bytes (live slots) and cold bytes (int8 and int4) against what a full
  cache holds for the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from toyllm_core import checkpoint
from toyllm_core.chat import ChatTemplate
from toyllm_core.config import get_dtype
from toyllm_core.lab.data import load_text
from toyllm_core.lab.longctx.tasks import session_document
from toyllm_core.machine import machine
from toyllm_core.serving.engine import CacheClass, Engine
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.serving.session import Session
from toyllm_core.tokenizer import load_tokenizer

CHUNK = 512


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _first_token_s(engine: Engine, session: Session, prompt: list[int], sampling: SamplingParams) -> tuple[float, object]:
    """Seconds from `begin` to the first token (sampled), and the sequence."""
    started = time.perf_counter()
    job = session.begin(engine, prompt, sampling)
    while not engine.prefill(job):
        pass
    seq = engine.start(job)
    return time.perf_counter() - started, seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("weights/smollm2-135m-instruct"))
    p.add_argument("--corpus", default="offline:data/offline")
    p.add_argument("--doc-tokens", type=int, default=4096)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--decode-tokens", type=int, default=192)
    p.add_argument("--decode-warmup", type=int, default=64, help="decode tokens not timed (a fresh state's first)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps-per-call", type=int, default=4, help="decode steps per jitted call (the server's 4)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    model, _ = checkpoint.load(a.checkpoint)
    model = model.astype(get_dtype(a.dtype)).for_inference()
    tokenizer = load_tokenizer(a.checkpoint)
    chat = ChatTemplate.of(tokenizer)
    eot = chat.end_of_turn(tokenizer)
    doc = session_document(tokenizer, load_text(a.corpus, "heldout"), a.doc_tokens, 2, seed=0)
    turn1 = chat.render_ids(tokenizer, [{"role": "user", "content": doc.turn(0)}])
    window = _round_up(len(turn1) + 64, CHUNK)
    full_tokens = _round_up(len(turn1) + 256 + a.decode_tokens, CHUNK)
    reply = SamplingParams(max_new_tokens=a.reply_tokens, temperature=0.0, eos_id=eot)
    first_only = SamplingParams(max_new_tokens=1, temperature=0.0, eos_id=eot)

    def turn2(session: Session) -> list[int]:
        ids, _ = session.chat_prompt(chat, tokenizer, session.chat + [{"role": "user", "content": doc.turn(1)}], eot)
        return ids

    def after_turn1(policy) -> tuple[Engine, Session]:
        cls = CacheClass.make(policy, 1, CHUNK, None if policy.evicts else full_tokens,
                              window if policy.evicts else None)
        engine = Engine(model, [cls], steps_per_call=a.steps_per_call)
        session = Session(cls)
        out = session.run_turn(engine, turn1, reply)
        session.replied([{"role": "user", "content": doc.turn(0)}],
                        tokenizer.decode(out[:-1] if out[-1] == eot else out, skip_special_tokens=True))
        return engine, session

    results: dict = {"doc_tokens": a.doc_tokens, "turn1_tokens": len(turn1), "budget": a.budget,
                     "steps_per_call": a.steps_per_call, "dtype": a.dtype}
    snap = make_policy("snapkv", budget=a.budget, cold_bits=8)
    full = make_policy("full")

    # Follow-up TTFT: the two-tier session's turn 2, against the whole history prefilled from scratch.
    follow, history_len = [], 0
    for i in range(a.repeats + 1):
        engine, session = after_turn1(snap)
        prompt = turn2(session)
        history = session.tokens + prompt  # turn 1, its reply (pending token included), turn 2
        history_len = len(history)
        seconds, seq = _first_token_s(engine, session, prompt, first_only)
        if i:
            follow.append(seconds)
        results["recalled_per_head"] = seq.recalled
        session.finish(engine, seq)
    scratch = []
    cls = CacheClass.make(full, 1, CHUNK, full_tokens)
    engine = Engine(model, [cls])
    for i in range(a.repeats + 1):
        seconds, seq = _first_token_s(engine, Session(cls), history, first_only)
        engine.free(seq)
        if i:
            scratch.append(seconds)
    results["follow_up_ttft_s"] = statistics.median(follow)
    results["reprefill_ttft_s"] = statistics.median(scratch)
    results["history_tokens"] = history_len
    results["follow_up_vs_reprefill"] = results["follow_up_ttft_s"] / results["reprefill_ttft_s"]
    print(f"follow-up TTFT {results['follow_up_ttft_s']:.3f} s, re-prefilling {history_len} tokens "
          f"{results['reprefill_ttft_s']:.3f} s: {results['follow_up_vs_reprefill']:.3f}x")

    # Decode step at the history's length: hot budget against the full cache.
    decode = SamplingParams(max_new_tokens=a.decode_tokens, temperature=0.0, ignore_eos=True)
    for name, policy in (("two_tier", snap), ("full", full)):
        per_token = []
        for i in range(a.repeats + 1):
            engine, session = after_turn1(policy)
            job = session.begin(engine, turn2(session), decode)
            while not engine.prefill(job):
                pass
            seq = engine.start(job)
            # The first calls of a fresh decode state run slower (its buffers are new): untimed.
            while seq.remaining > a.decode_tokens - a.decode_warmup:
                engine.step()
            started, produced = time.perf_counter(), 0
            while seq.active:
                produced += sum(len(o.tokens) for o in engine.step())
            if i:
                per_token.append((time.perf_counter() - started) / produced * 1000)
            engine.free(seq)
        results[f"decode_ms_per_token_{name}"] = statistics.median(per_token)
    results["decode_two_tier_vs_full"] = results["decode_ms_per_token_two_tier"] / results["decode_ms_per_token_full"]
    print(f"decode at {history_len} tokens: hot {a.budget} {results['decode_ms_per_token_two_tier']:.2f} ms/token, "
          f"full {results['decode_ms_per_token_full']:.2f}: {results['decode_two_tier_vs_full']:.3f}x")

    # A session at rest after turn 2: bytes per tier against the full cache.
    bpt = model.kv_bytes_per_token
    results["at_rest"] = {}
    for bits in (8, 4):
        policy = make_policy("snapkv", budget=a.budget, cold_bits=bits)
        engine, session = after_turn1(policy)
        session.run_turn(engine, turn2(session), reply)
        tiers = session.tier_bytes(bpt)
        full_bytes = session.tokens_in_cache * bpt
        row = {"tokens": session.tokens_in_cache, "hot_tokens": session.length, "cold_tokens": session.cold_tokens,
               "hot_bytes": tiers["hot"], "cold_bytes": tiers["cold"], "full_bytes": full_bytes,
               "ratio": (tiers["hot"] + tiers["cold"]) / full_bytes}
        results["at_rest"][f"int{bits}"] = row
        print(f"at rest, cold int{bits}: hot {tiers['hot'] / 2**20:.1f} MiB + cold {tiers['cold'] / 2**20:.1f} MiB "
              f"against full {full_bytes / 2**20:.1f} MiB: {row['ratio']:.3f}x")
    results["machine"] = machine()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
