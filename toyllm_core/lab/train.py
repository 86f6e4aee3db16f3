"""Training: AdamW with linear warmup + cosine decay, global-norm clipping, label smoothing.

Batches are random windows of the tokenized corpus, drawn from a PRNG seeded by (seed, step), so
a resumed run sees exactly the batches the uninterrupted run would have. The run directory holds:

  metrics.jsonl     one JSON object per logged step (loss, lr, grad norm, tokens/s) and per evaluation
  state/            the latest training state (Equinox serialisation of model + optimiser state)
  final/            the final checkpoint in the checkpoint layout (README, "Checkpoints") (when the run completes)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import optax

from .. import checkpoint
from ..config import get_preset
from ..serving.model import ToyLLM


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "seed"
    vocab_size: int | None = None  # the tokenizer's; None keeps the preset's (GPT-2's 50257)
    eos_token_id: int | None = None
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    label_smoothing: float = 0.0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 500
    seed: int = 0
    # Share of training windows in which a random span of the window is written again later in it:
    # the next tokens of the repeat are predictable only by finding the first occurrence, which
    # teaches the model to read its context (induction heads) where a small corpus alone may not.
    copy_share: float = 0.0
    # Share of those repeated spans that are random tokens instead of text. A repeated text span is
    # partly predictable from the text alone; a random one only by copying, which makes the signal
    # that trains induction heads strong enough to form them in a CPU-sized run (MODEL_CARD.md of
    # weights/toyllm-base).
    copy_random: float = 0.0
    # Share of windows replaced by random tokens that end in a random sequence written twice, its
    # length (4 up to half the window) drawn per window; only the second copy is scored, the rest
    # being unpredictable. With one fixed length a head learns to look back that many positions,
    # which copies nothing else; a length that varies leaves matching content, an induction head, as
    # the only solution. It formed on this task where text spans did not (MODEL_CARD.md of toyllm-base).
    induction_share: float = 0.0
    # A checkpoint whose weights the run starts from (a fresh optimiser and schedule): one run
    # continuing another with other data or another sequence length.
    init_from: str | None = None


def tokenize(tokenizer, text: str, cache_dir: Path | None = None) -> np.ndarray:
    """Token ids of `text` (documents split on blank lines, EOS between them), cached on disk."""
    # The key names the tokenizer too: the same text under another vocabulary is other tokens.
    vocab = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    key = hashlib.sha256(text.encode() + b"\0" + vocab.encode()).hexdigest()[:16]
    cached = cache_dir / f"tokens-{key}.npy" if cache_dir else None
    if cached is not None and cached.exists():
        return np.load(cached)
    docs = [d for d in text.split("\n\n") if d.strip()]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(docs), 1024):
        for doc in tokenizer(docs[start : start + 1024], verbose=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    tokens = np.asarray(ids, np.int32)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, tokens)
    return tokens


def model_config(cfg: TrainConfig):
    """The preset, sized for the run's tokenizer and sequence length."""
    preset = get_preset(cfg.preset)
    changes = {"context_length": max(preset.context_length, cfg.seq_len)}
    if cfg.vocab_size is not None:
        changes["vocab_size"] = cfg.vocab_size
    if cfg.eos_token_id is not None:
        changes["eos_token_id"] = cfg.eos_token_id
    return preset.replace(**changes)


# The shortest sequence an induction window repeats.
INDUCTION_MIN = 4


def sample_batch(tokens: np.ndarray, step: int, cfg: TrainConfig, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random windows [batch, seq_len + 1] and the weight of each target [batch, seq_len] (1 where
    the next token is scored, 0 where it is not); depends only on (seed, stream, step)."""
    if len(tokens) <= cfg.seq_len + 1:
        raise ValueError(f"corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
    for name in ("copy_share", "copy_random", "induction_share"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], not {getattr(cfg, name)}")
    rng = np.random.default_rng([cfg.seed, stream, step])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, cfg.batch_size)
    batch = np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts])
    weights = np.ones((cfg.batch_size, cfg.seq_len), np.float32)
    # Random tokens: never token 0, EOS (a document boundary).
    random_tokens = lambda n: rng.integers(1, cfg.vocab_size or int(tokens.max()) + 1, n, dtype=batch.dtype)
    if cfg.copy_share > 0:  # drawn after the windows, so that copy_share 0 leaves every batch as it was
        for row in np.flatnonzero(rng.random(cfg.batch_size) < cfg.copy_share):
            src, dst, length = repeat_span(batch[row], rng)
            if cfg.copy_random and rng.random() < cfg.copy_random:
                span = random_tokens(length)
                batch[row, src : src + length] = span
                batch[row, dst : dst + length] = span
    if cfg.induction_share > 0:  # drawn last, so that the other settings' batches stay as they were
        n = cfg.seq_len + 1
        if n // 2 < INDUCTION_MIN:
            raise ValueError(f"induction windows need seq_len >= {2 * INDUCTION_MIN - 1}, not {cfg.seq_len}")
        for row in np.flatnonzero(rng.random(cfg.batch_size) < cfg.induction_share):
            length = int(rng.integers(INDUCTION_MIN, n // 2 + 1))
            batch[row] = random_tokens(n)
            batch[row, n - length :] = batch[row, n - 2 * length : n - length]
            # Targets are batch[row, 1:]: score the second copy after its first token, which
            # nothing before it predicts.
            weights[row] = 0.0
            weights[row, n - length : n - 1] = 1.0
    return batch, weights


def repeat_span(window: np.ndarray, rng: np.random.Generator, min_len: int = 8) -> tuple[int, int, int]:
    """Copy a random span of `window` (in place) to a later, non-overlapping place in it; returns
    (source start, destination start, length). The span is min_len up to half the window long."""
    n = len(window)
    if n < 2 * min_len:
        raise ValueError(f"a window of {n} tokens is too short to repeat a span of {min_len}")
    length = int(rng.integers(min_len, n // 2 + 1))
    src = int(rng.integers(0, n - 2 * length + 1))
    dst = int(rng.integers(src + length, n - length + 1))
    window[dst : dst + length] = window[src : src + length]
    return src, dst, length


def schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=max(cfg.warmup_steps, 1),
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    # Decay matrices only: norms' gains should stay near 1.
    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def sequence_nll(model: ToyLLM, window: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Next-token cross-entropy [T] of one window [T + 1] (with optional label smoothing)."""
    logits = model(window[:-1])
    targets = jax.nn.one_hot(window[1:], model.cfg.vocab_size)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def batch_loss(model: ToyLLM, batch: jax.Array, weights: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean loss over the scored targets (weights [batch, seq_len]) of a batch."""
    # One sequence at a time (rematerialised in the backward pass): a batch's logits at once would
    # be batch x seq_len x vocab floats, gigabytes for the GPT-2 vocabulary.
    per_row = jax.checkpoint(lambda row: (sequence_nll(model, row[0], label_smoothing) * row[1]).sum())
    return jax.lax.map(per_row, (batch, weights)).sum() / weights.sum()


@eqx.filter_jit(donate="all")
def train_step(model, opt_state, batch, weights, opt: optax.GradientTransformation, label_smoothing: float):
    loss, grads = eqx.filter_value_and_grad(batch_loss)(model, batch, weights, label_smoothing)
    updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss, optax.tree.norm(grads)


@eqx.filter_jit
def eval_loss(model, batch, weights):
    return batch_loss(model, batch, weights)


def _save_state(directory: Path, model, opt_state, step: int, cfg: TrainConfig, tokens_seen: int,
                elapsed_s: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "state.eqx.tmp"
    eqx.tree_serialise_leaves(tmp, (model, opt_state))
    tmp.replace(directory / "state.eqx")  # atomic: a crash never leaves half a state
    (directory / "state.json").write_text(json.dumps({"step": step, "tokens_seen": tokens_seen,
                                                      "elapsed_s": elapsed_s, "config": asdict(cfg)}, indent=2))


def _initial_weights(directory: str, model_cfg) -> ToyLLM:
    """The weights of the checkpoint `directory` (loaded as float32), which must have this run's model shape."""
    model, _ = checkpoint.load(directory)
    if model.cfg != model_cfg:
        raise ValueError(f"{directory}: its model ({model.cfg}) is not the one this run trains ({model_cfg})")
    return model


def train(cfg: TrainConfig, train_tokens: np.ndarray, heldout_tokens: np.ndarray | None, out: Path,
          tokenizer=None, resume: bool = False, meta: dict | None = None,
          progress: Callable[[int], object] | None = None, time_limit_s: float | None = None,
          stop_at: int | None = None) -> dict:
    """Train (or resume) a run in `out`; returns the summary written into the final checkpoint.

    `time_limit_s` bounds the wall time of this run (resumed parts included), and `stop_at` its
    steps, without changing the schedule (which still runs to cfg.steps): when either is reached the
    run stops early, saves its state and writes the final checkpoint, marked `stopped_early`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = model_config(cfg)
    model = ToyLLM(model_cfg, jax.random.PRNGKey(cfg.seed))
    opt = optimizer(cfg)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    state_dir = out / "state"
    if cfg.init_from and not resume:
        model = _initial_weights(cfg.init_from, model_cfg)
    if resume:
        if not (state_dir / "state.eqx").exists():
            raise FileNotFoundError(f"{state_dir / 'state.eqx'}: nothing to resume; run without --resume first")
        saved = json.loads((state_dir / "state.json").read_text())
        # Settings added since the run started take their defaults.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        if {**defaults, **saved["config"]} != asdict(cfg):
            raise ValueError(f"{state_dir / 'state.json'}: the run was started with other settings; "
                             "resume with the same options")
        model, opt_state = eqx.tree_deserialise_leaves(state_dir / "state.eqx", (model, opt_state))
        step, tokens_seen = saved["step"], saved["tokens_seen"]
        elapsed_before = saved.get("elapsed_s", 0.0)

    log = (out / "metrics.jsonl").open("a")
    bar = progress(cfg.steps) if progress else None
    if bar is not None:
        bar.update(step)
    start = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    loss = float("nan")
    try:
        stopped_early = False
        while step < cfg.steps:
            out_of_time = time_limit_s is not None and elapsed_before + time.perf_counter() - start >= time_limit_s
            if out_of_time or (stop_at is not None and step >= stop_at):
                stopped_early = True
                _save_state(state_dir, model, opt_state, step, cfg, tokens_seen,
                            elapsed_before + time.perf_counter() - start)
                break
            batch, weights = sample_batch(train_tokens, step, cfg)
            model, opt_state, loss_arr, grad_norm = train_step(model, opt_state, batch, weights, opt,
                                                               cfg.label_smoothing)
            step += 1
            tokens_seen += batch.shape[0] * cfg.seq_len
            window_tokens += batch.shape[0] * cfg.seq_len
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss = float(loss_arr)
                now = time.perf_counter()
                rate = window_tokens / (now - window_start)
                window_tokens, window_start = 0, now
                record = {"step": step, "loss": loss, "lr": float(schedule(cfg)(step)),
                          "grad_norm": float(grad_norm), "tokens_seen": tokens_seen, "tokens_per_s": rate,
                          "elapsed_s": elapsed_before + now - start}
                log.write(json.dumps(record) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
            if heldout_tokens is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                held = evaluate(model, heldout_tokens, cfg)
                log.write(json.dumps({"step": step, "heldout_loss": held}) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_state(state_dir, model, opt_state, step, cfg, tokens_seen,
                            elapsed_before + time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
    finally:
        log.close()
        if bar is not None:
            bar.close()

    summary = {"preset": cfg.preset, "steps": step, "tokens_seen": tokens_seen, "final_train_loss": loss,
               "wall_s": elapsed_before + time.perf_counter() - start, "stopped_early": stopped_early,
               "train_config": asdict(cfg), **(meta or {})}
    if heldout_tokens is not None:
        summary["final_heldout_loss"] = evaluate(model, heldout_tokens, cfg)
    checkpoint.save(model, out / "final", tokenizer, meta=summary)
    return summary


def evaluate(model: ToyLLM, tokens: np.ndarray, cfg: TrainConfig) -> float:
    """Mean next-token loss over `eval_batches` fixed held-out batches."""
    losses = [float(eval_loss(model, *sample_batch(tokens, i, cfg, stream=1))) for i in range(cfg.eval_batches)]
    return float(np.mean(losses)) if losses else math.nan
