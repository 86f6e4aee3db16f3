"""Serving speed of this project's engine next to llama.cpp and transformers on the same weights, in one run.

Every peer runs SmolLM2-135M-Instruct as imported into weights/ (llama.cpp from its GGUF exports,
written by `toyllm export-gguf` into `--gguf-dir` if missing), one after another, each in its own
child process (this script again, with `--child`), so that its peak RSS can be read from the
parent (`os.wait4`) and no two peers share the cores. Rows:
- toyllm-bf16, toyllm-int8: the `Engine` the server uses (its jitted prefill chunks of 512 tokens and
  multi-step decode calls, `--steps-per-call`), the model as served (bfloat16; int8: block matmul
  weights quantized per channel by `toyllm_core.serving.quant.quantize_int8`);
- llamacpp-f16, llamacpp-q8_0: llama-cpp-python, its `Llama.eval` (n_batch = n_ubatch = 512);
- transformers-bf16: `LlamaForCausalLM` in bfloat16 on torch's CPU build, with its KV cache (greedy
  argmax per step; prefill computes the last position's logits only, `logits_to_keep=1`, as
  `generate` does).
llama.cpp and torch run on OpenMP, whose threads spin between parallel regions by default, so each
of their models is measured twice, with OMP_WAIT_POLICY=passive and unset (the library default):
rows `NAME[passive]` and `NAME[default]`. The script sets it per row (and OMP_NUM_THREADS =
`--threads` for every child); what the calling shell sets does not matter. JAX/XLA does not use
OpenMP: one row each.

Same thread count everywhere (`--threads`, default: every core; llama.cpp n_threads and
n_threads_batch, torch.set_num_threads; XLA sizes its own pool from the cores, so for toyllm it is
only recorded). Same prompts everywhere: random token ids in [100, 40000) from
numpy.random.default_rng(`--seed`). Per peer, medians over `--repeats` timed runs after an untimed
warm-up run (which for toyllm compiles every program):
- decode at batch 1: a `--context`-token prompt prefilled, then `--steps` greedy steps timed; ms per
  token is the median step time (llama.cpp and transformers time each step; toyllm runs several
  steps per call, so its time is the whole decode over the steps);
- decode at batch `--batch` (0: skip), in a second child per row so that the batch-1 peak RSS
  stays that of batch 1: the same with `--batch` prompts of `--context` tokens decoding together,
  ms per step and per token (step / batch) under the row's "batch" (llama.cpp: the low-level
  `llama_decode` with one sequence id and KV stream per prompt; toyllm: one cache class of
  `--batch` slots; transformers: one [batch, context] tensor, no padding needed);
- prefill: tokens/s for one 512- and one 2048-token prompt, from the call to the first token's
  logits (toyllm: the first sampled token);
- load_s (the model loaded and ready, imports not counted) and peak RSS of the child.
Run it on an otherwise idle machine: spinning OpenMP threads that share a core with anything else
slow the [default] rows by up to tens of times (the JSON records the load average before and after).

    .venv/bin/python benchmarks/peers.py --json out/peers.json
    .venv/bin/python benchmarks/peers.py --json out/peers-quick.json --peers toyllm-bf16,llamacpp-f16 \\
        --context 256 --steps 8 --repeats 1 --batch 0

llama-cpp-python and torch are benchmark-only dependencies (`pip install -e '.[peers]'`); a peer
whose library is missing gets an `error` in its row and the others still run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np

from toyllm_core.machine import machine
from toyllm_core.weights import DEFAULT_CHECKPOINT

PEERS = ("toyllm-bf16", "toyllm-int8", "llamacpp-f16", "llamacpp-q8_0", "transformers-bf16")
OPENMP = ("llamacpp", "transformers")  # peers on OpenMP: one row per wait policy
WAIT_POLICIES = ("passive", "default")  # default: OMP_WAIT_POLICY unset
GGUF_TYPES = {"llamacpp-f16": "f16", "llamacpp-q8_0": "q8_0"}
PREFILL_LENGTHS = (512, 2048)
TOKEN_LOW, TOKEN_HIGH = 100, 40000  # inside every tokenizer's vocabulary, clear of special tokens
SLACK = 16  # cache slots beyond prompt + steps


# ------------------------------------------------------------------------------------------ inputs
def prompts(seed: int, context: int, batch: int) -> dict[str, np.ndarray]:
    """The same arrays in every child: drawn in a fixed order, so --batch does not change the others."""
    rng = np.random.default_rng(seed)
    out = {"decode": rng.integers(TOKEN_LOW, TOKEN_HIGH, context)}
    for n in PREFILL_LENGTHS:
        out[f"prefill_{n}"] = rng.integers(TOKEN_LOW, TOKEN_HIGH, n)
    out["batch"] = rng.integers(TOKEN_LOW, TOKEN_HIGH, (max(batch, 1), context))
    return out


def gguf_path(gguf_dir: Path, peer: str) -> Path:
    return gguf_dir / f"smollm2-{GGUF_TYPES[peer]}.gguf"


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)  # stdout carries the child's result line only


def timed_runs(repeats: int, run, *run_args) -> list:
    """run(*run_args) once untimed (warm-up), then `repeats` times; the timed results."""
    run(*run_args)
    return [run(*run_args) for _ in range(repeats)]


# ------------------------------------------------------------------------------------------ toyllm
def child_toyllm(peer: str, args, p: dict, out: dict) -> None:
    import jax
    import jax.numpy as jnp

    from toyllm_core import checkpoint as ckpt
    from toyllm_core.serving.engine import CacheClass, Engine
    from toyllm_core.serving.policies import make_policy
    from toyllm_core.serving.sampling import SamplingParams

    out["jax_devices"] = [str(d) for d in jax.devices()]
    start = time.perf_counter()
    model, _ = ckpt.load(args.checkpoint)
    model = model.astype(jnp.bfloat16)
    if peer == "toyllm-int8":
        from toyllm_core.serving.quant import quantize_int8

        model = quantize_int8(model)
    model = jax.block_until_ready(model.for_inference())
    out["load_s"] = time.perf_counter() - start
    full = make_policy("full")

    def params(new: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)

    def decode(engine: Engine, cls: CacheClass, rows: list[np.ndarray]) -> float:
        """Seconds for `args.steps` decode steps of every row after prefilling them (untimed)."""
        seqs = [engine.run_prefill(r, cls, params(args.steps + 1)) for r in rows]
        jax.block_until_ready(engine._states[cls].cache)
        start = time.perf_counter()
        while any(s.active for s in seqs):
            engine.step()
        jax.block_until_ready(engine._states[cls].cache)
        elapsed = time.perf_counter() - start
        for s in seqs:
            engine.free(s)
        return elapsed

    if args.part == "batch":
        cls = CacheClass.make(full, args.batch, 512, args.context + args.steps + SLACK)
        engine = Engine(model, [cls], steps_per_call=args.steps_per_call)
        runs = timed_runs(args.repeats, decode, engine, cls, list(p["batch"][: args.batch]))
        ms_step = statistics.median(runs) / args.steps * 1e3
        out.update(ms_per_step=ms_step, ms_per_token=ms_step / args.batch)
        return

    cls = CacheClass.make(full, 1, 512, args.context + args.steps + SLACK)
    engine = Engine(model, [cls], steps_per_call=args.steps_per_call)
    runs = timed_runs(args.repeats, decode, engine, cls, [p["decode"]])
    out["decode_runs_ms_per_token"] = [t / args.steps * 1e3 for t in runs]
    out["ms_per_token"] = statistics.median(out["decode_runs_ms_per_token"])
    del engine

    cls = CacheClass.make(full, 1, 512, max(PREFILL_LENGTHS) + SLACK)  # chunks of 512, as served
    engine = Engine(model, [cls], steps_per_call=args.steps_per_call)

    def prefill(tokens: np.ndarray) -> float:
        start = time.perf_counter()
        seq = engine.run_prefill(tokens, cls, params(1))  # returns once the first token is sampled
        elapsed = time.perf_counter() - start
        engine.free(seq)
        return elapsed

    for n in PREFILL_LENGTHS:
        runs = timed_runs(args.repeats, prefill, p[f"prefill_{n}"])
        out[f"prefill_{n}_tokens_per_s"] = n / statistics.median(runs)


# --------------------------------------------------------------------------------------- llama.cpp
def child_llamacpp(peer: str, args, p: dict, out: dict) -> None:
    import llama_cpp
    from llama_cpp import Llama

    path = gguf_path(args.gguf_dir, peer)
    # The batch part decodes in a context of its own: keep this one small, out of its peak RSS.
    n_ctx = 512 if args.part == "batch" else max(4096, args.context + args.steps + SLACK)
    start = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, n_ubatch=512, verbose=False)
    out["load_s"] = time.perf_counter() - start
    out["n_ctx"] = n_ctx
    n_vocab = llm.n_vocab()

    def argmax(ctx, i: int) -> int:
        # Llama.scores is only filled under logits_all: read the context's logits row directly.
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))

    if args.part == "batch":
        batch_llamacpp(llm, args, p["batch"][: args.batch], argmax, out)
        return

    def decode() -> float:
        llm.reset()
        llm.eval(p["decode"].tolist())
        tok, times = argmax(llm.ctx, -1), []
        for _ in range(args.steps):
            start = time.perf_counter()
            llm.eval([tok])
            tok = argmax(llm.ctx, -1)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    out["decode_runs_ms_per_token"] = [t * 1e3 for t in timed_runs(args.repeats, decode)]
    out["ms_per_token"] = statistics.median(out["decode_runs_ms_per_token"])

    def prefill(tokens: list[int]) -> float:
        llm.reset()  # the next eval drops the cache from position 0: no prefix reuse
        start = time.perf_counter()
        llm.eval(tokens)
        argmax(llm.ctx, -1)
        return time.perf_counter() - start

    for n in PREFILL_LENGTHS:
        tokens = p[f"prefill_{n}"].tolist()
        out[f"prefill_{n}_tokens_per_s"] = n / statistics.median(timed_runs(args.repeats, prefill, tokens))


def batch_llamacpp(llm, args, rows: np.ndarray, argmax, out: dict) -> None:
    """Decode len(rows) sequences together: a second context with one KV stream per sequence, fed by
    llama_decode batches (the high-level Llama object decodes one sequence only)."""
    import llama_cpp

    n_seq, context = rows.shape
    cparams = llama_cpp.llama_context_default_params()
    # Split evenly between the sequences' streams, each a multiple of 256 cells (or llama.cpp rounds it).
    cparams.n_ctx = n_seq * -(-(context + args.steps + SLACK) // 256) * 256
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_seq_max = n_seq
    cparams.n_threads = cparams.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(llm.model, cparams)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    batch = llama_cpp.llama_batch_init(max(512, n_seq), 0, 1)
    try:
        def submit(entries: list[tuple[int, int, int, bool]]) -> None:
            for i, (token, pos, seq, logits) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, logits
            batch.n_tokens = len(entries)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

        def decode() -> float:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            toks = []
            for s, row in enumerate(rows.tolist()):  # prefill, one sequence at a time (untimed)
                for i in range(0, context, 512):
                    piece = row[i : i + 512]
                    submit([(t, i + j, s, i + j == context - 1) for j, t in enumerate(piece)])
                toks.append(argmax(ctx, len(piece) - 1))
            times = []
            for k in range(args.steps):
                start = time.perf_counter()
                submit([(t, context + k, s, True) for s, t in enumerate(toks)])
                toks = [argmax(ctx, s) for s in range(n_seq)]
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        ms_step = statistics.median(timed_runs(args.repeats, decode)) * 1e3
        out.update(ms_per_step=ms_step, ms_per_token=ms_step / n_seq, n_ctx=llama_cpp.llama_n_ctx(ctx))
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


# ------------------------------------------------------------------------------------ transformers
def child_transformers(peer: str, args, p: dict, out: dict) -> None:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    out["torch_threads"] = torch.get_num_threads()
    start = time.perf_counter()
    m = transformers.LlamaForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.bfloat16).eval()
    out["load_s"] = time.perf_counter() - start
    # transformers 5.x renamed past_key_values to cache (the old name warns, then goes in 5.40).
    cache = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"

    @torch.no_grad()
    def decode(ids: np.ndarray) -> float:
        r = m(torch.from_numpy(ids), use_cache=True, logits_to_keep=1)
        past, tok = getattr(r, cache), r.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            r = m(tok, use_cache=True, **{cache: past})
            past, tok = getattr(r, cache), r.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    if args.part == "batch":
        ms_step = statistics.median(timed_runs(args.repeats, decode, p["batch"][: args.batch])) * 1e3
        out.update(ms_per_step=ms_step, ms_per_token=ms_step / args.batch)
        return
    out["decode_runs_ms_per_token"] = [t * 1e3 for t in timed_runs(args.repeats, decode, p["decode"][None])]
    out["ms_per_token"] = statistics.median(out["decode_runs_ms_per_token"])

    @torch.no_grad()
    def prefill(ids: torch.Tensor) -> float:
        start = time.perf_counter()
        m(ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
        return time.perf_counter() - start

    for n in PREFILL_LENGTHS:
        ids = torch.from_numpy(p[f"prefill_{n}"][None])
        out[f"prefill_{n}_tokens_per_s"] = n / statistics.median(timed_runs(args.repeats, prefill, ids))


def child_main(args) -> None:
    """Measure one peer; the result is the last stdout line (partial, with `error`, if a stage failed)."""
    out: dict = {}
    try:
        p = prompts(args.seed, args.context, args.batch)
        family = args.child.split("-")[0]
        {"toyllm": child_toyllm, "llamacpp": child_llamacpp, "transformers": child_transformers}[family](
            args.child, args, p, out)
    except Exception as e:  # noqa: BLE001 - reported in the row; the other peers still run
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------ orchestrator
def rows(selected: list[str]) -> list[tuple[str, str, str | None]]:
    """(row name, peer, OMP_WAIT_POLICY or None for unset) for each selected row, in PEERS order.
    A selector is a peer (all its rows) or one row name."""
    out = []
    for peer in PEERS:
        openmp = peer.split("-")[0] in OPENMP
        variants = [(f"{peer}[{w}]", w) for w in WAIT_POLICIES] if openmp else [(peer, None)]
        for name, wait in variants:
            if peer in selected or name in selected:
                out.append((name, peer, None if wait in (None, "default") else wait))
    return out


def run_child(peer: str, part: str, wait: str | None, args) -> dict:
    """One child, alone on the machine: its result and its peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("OMP_WAIT_POLICY", None)
    if wait is not None:
        env["OMP_WAIT_POLICY"] = wait
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", peer, "--part", part,
           "--checkpoint", str(args.checkpoint), "--gguf-dir", str(args.gguf_dir),
           "--threads", str(args.threads), "--context", str(args.context), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--seed", str(args.seed),
           "--steps-per-call", str(args.steps_per_call), "--batch", str(args.batch)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout)  # stderr (progress, tracebacks) passes through
        killed = threading.Event()
        timer = threading.Timer(args.child_timeout, lambda: (killed.set(), proc.kill()))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # Popen.wait would reap it without its rusage
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": f"no result from the child (exit status {proc.returncode})"}
    if killed.is_set():
        result["error"] = f"killed after --child-timeout {args.child_timeout:g} s"
    elif proc.returncode != 0 and "error" not in result:
        result["error"] = f"child exit status {proc.returncode}"
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["wall_s"] = time.perf_counter() - start
    result["env"] = {"OMP_WAIT_POLICY": wait, "OMP_NUM_THREADS": str(args.threads)}
    return result


def ensure_gguf(args, peers: set[str]) -> dict:
    """The GGUF files the selected llama.cpp peers need, exported from the checkpoint if missing."""
    info = {}
    for peer in sorted(peers & set(GGUF_TYPES)):
        path = gguf_path(args.gguf_dir, peer)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            toyllm = Path(sys.executable).parent / "toyllm"
            log(f"exporting {path}")
            subprocess.run([str(toyllm), "export-gguf", str(args.checkpoint), "--out", str(path),
                            "--type", GGUF_TYPES[peer]], check=True)
        info[GGUF_TYPES[peer]] = {"path": str(path), "bytes": path.stat().st_size}
    return info


def versions() -> dict:
    out = {}
    for name, dist in (("jax", "jax"), ("jaxlib", "jaxlib"), ("torch", "torch"),
                       ("transformers", "transformers"), ("llama_cpp", "llama_cpp_python")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def ratios(peers: dict) -> dict:
    """toyllm over its peers: ms per token (below 1: toyllm faster) and prefill tokens/s (above 1:
    toyllm faster), against each wait-policy row and the better of the two ("best"). Keys name the
    measurement ("batch ms_per_token": the batch part), then ours / theirs."""
    pairs = [("ms_per_token", "toyllm-bf16", "llamacpp-f16"),
             ("ms_per_token", "toyllm-bf16", "transformers-bf16"),
             ("ms_per_token", "toyllm-int8", "llamacpp-q8_0"),
             *[(f"prefill_{n}_tokens_per_s", "toyllm-bf16", "llamacpp-f16") for n in PREFILL_LENGTHS],
             ("batch ms_per_token", "toyllm-bf16", "llamacpp-f16"),
             ("batch ms_per_token", "toyllm-int8", "llamacpp-q8_0")]

    def value(row: str, measure: str):
        part, _, key = measure.rpartition(" ")
        row = peers.get(row, {})
        return (row.get(part, {}) if part else row).get(key)

    out = {}
    for measure, ours, theirs in pairs:
        a = value(ours, measure)
        found = {w: v for w in WAIT_POLICIES if (v := value(f"{theirs}[{w}]", measure))}
        if a and found:
            best = (max if "tokens_per_s" in measure else min)(found.values())
            out[f"{measure} {ours} / {theirs}"] = {**{w: a / v for w, v in found.items()}, "best": a / best}
    return out


def table(peers: dict) -> str:
    def fmt(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = (f"{'peer':<26}{'ms/token':>10}{'tok/s':>9}{'prefill 512':>13}{'prefill 2048':>14}{'load s':>8}"
            f"{'peak RSS MiB':>14}{'batch ms/tok':>14}{'batch RSS':>11}  error")
    lines = [head]
    for name, r in peers.items():
        b = r.get("batch", {})
        err = r.get("error") or b.get("error") or ""
        lines.append(f"{name:<26}{fmt(r.get('ms_per_token'), '.2f'):>10}"
                     f"{fmt(r.get('tokens_per_s'), '.1f'):>9}"
                     f"{fmt(r.get('prefill_512_tokens_per_s'), '.0f'):>13}"
                     f"{fmt(r.get('prefill_2048_tokens_per_s'), '.0f'):>14}{fmt(r.get('load_s'), '.2f'):>8}"
                     f"{fmt(r.get('peak_rss_mib'), '.0f'):>14}{fmt(b.get('ms_per_token'), '.2f'):>14}"
                     f"{fmt(b.get('peak_rss_mib'), '.0f'):>11}  {err[:60]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="where to write the results (required unless --child)")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="comma-separated peers or row names, e.g. llamacpp-f16[passive] [default: all]")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--gguf-dir", type=Path, default=Path("out/gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens before the timed decode steps")
    ap.add_argument("--steps", type=int, default=64, help="timed greedy decode steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (after one warm-up run)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    ap.add_argument("--steps-per-call", type=int, default=4,
                    help="toyllm decode steps per jitted call [default: the server's]")
    ap.add_argument("--batch", type=int, default=16,
                    help="sequences decoding together in the batch measurement (0: skip it)")
    ap.add_argument("--child-timeout", type=float, default=3600, help="seconds before a child is killed")
    ap.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=("single", "batch"), default="single", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    if args.json is None:
        ap.error("--json is required")
    if min(args.steps, args.repeats, args.context, args.threads) < 1 or args.batch < 0:
        ap.error("--steps, --repeats, --context and --threads must be at least 1, --batch at least 0")
    selected = [s.strip() for s in args.peers.split(",") if s.strip()]
    known = {name for name, _, _ in rows(list(PEERS))} | set(PEERS)
    if unknown := [s for s in selected if s not in known]:
        ap.error(f"unknown peers {unknown}; choose from {sorted(known)}")
    plan = rows(selected)

    result = {"machine": machine(), "threads": args.threads, "context": args.context, "steps": args.steps,
              "repeats": args.repeats, "seed": args.seed, "steps_per_call": args.steps_per_call,
              "batch": args.batch,
              "prefill_lengths": list(PREFILL_LENGTHS), "checkpoint": str(args.checkpoint),
              "gguf": ensure_gguf(args, {peer for _, peer, _ in plan}), "versions": versions(), "peers": {}}
    for name, peer, wait in plan:
        log(f"== {name}")
        row = run_child(peer, "single", wait, args)
        if row.get("ms_per_token"):
            row["tokens_per_s"] = 1e3 / row["ms_per_token"]
        if args.batch:
            log(f"== {name}, batch {args.batch}")
            row["batch"] = run_child(peer, "batch", wait, args)
        result["peers"][name] = row
        log(json.dumps(row))
    result["ratios"] = ratios(result["peers"])
    result["machine_after"] = machine()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["peers"]))
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
