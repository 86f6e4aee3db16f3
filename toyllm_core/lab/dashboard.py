"""The compression dashboard: what a policy keeps while it decodes a text, and what that costs.

`run` teacher-forces a text through one policy (token by token, compressing as generation would)
and writes four figures and their numbers into a directory:

  stability.png     per-step loss with a moving average (and the full cache's, where it applies)
  retention.png     which original positions each layer keeps, over decoding steps
  kept_positions.png  histogram of the positions kept at the end
  performance.png   latency, memory, speed-up over no cache, compression ratio
  dashboard.json    the numbers behind the figures
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..serving.model import ToyLLM
from ..serving.policies import Policy, make_policy
from .bench import decode_latency, recompute_latency
from .evaluate import decode_through_policy


def trace(model: ToyLLM, tokens: np.ndarray, cfg: Policy, piece_max: int = 16):
    """Per-token NLL [T-1], and (step, kept positions [layers, kv_heads, n]) after every piece."""
    nll, snapshots = [], []
    for piece in decode_through_policy(model, tokens[None].astype(np.int32), cfg, piece_max):
        nll.extend(piece.nll[0].tolist())
        snapshots.append((piece.end, piece.kept_positions(0)))
    return np.asarray(nll), snapshots


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(x)))
    return np.convolve(x, np.ones(window) / window, mode="valid")


def run(model: ToyLLM, tokens: np.ndarray, cfg: Policy, out: str | Path, name: str = "model",
        bench_steps: int = 32, repeats: int = 3) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = model.cfg
    n = len(tokens)
    if n < 32:
        raise ValueError(f"the text has {n} tokens; the dashboard needs at least 32")
    if not cfg.evicts and n > mcfg.context_length:
        raise ValueError(f"{n} tokens exceed the model context ({mcfg.context_length}) under the full cache")
    nll, snapshots = trace(model, tokens, cfg)
    full_nll = None
    if cfg.evicts and n <= mcfg.context_length:
        full_nll, _ = trace(model, tokens, make_policy("full"), piece_max=64)

    # 1. Generation stability
    window = 32
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    steps = np.arange(1, len(nll) + 1)
    ax.plot(steps, nll, color="tab:blue", alpha=0.25, linewidth=0.8, label=f"{cfg.name} per-step loss")
    ax.plot(steps[window - 1 :], _moving_average(nll, window), color="tab:blue", label=f"{cfg.name}, mean of {window}")
    if full_nll is not None:
        ax.plot(steps[window - 1 :], _moving_average(full_nll, window), color="black", linestyle="--",
                label=f"full cache, mean of {window}")
    if cfg.evicts:
        ax.axvline(cfg.trigger, color="grey", linewidth=0.8, linestyle=":", label="first compression")
    ax.set(xlabel="decoding step (token)", ylabel="next-token loss (nats)",
           title=f"{name}: generation stability, {cfg.name} budget {getattr(cfg, 'budget', None)}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "stability.png")
    plt.close(fig)

    # 2. Retention map: fraction of KV heads keeping each original position, per layer, over steps
    columns = [s for s, _ in snapshots]
    fig, axes = plt.subplots(1, mcfg.n_layers, figsize=(4.5 * mcfg.n_layers, 4.2), dpi=110, squeeze=False)
    for layer, ax in enumerate(axes[0]):
        grid = np.zeros((n, len(snapshots)))
        for j, (_, kept) in enumerate(snapshots):
            for head in range(mcfg.n_kv_heads):
                positions = kept[layer, head]
                grid[positions[positions >= 0], j] += 1.0 / mcfg.n_kv_heads
        ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                  extent=(columns[0], columns[-1], 0, n))
        ax.set(xlabel="decoding step", ylabel="original position", title=f"layer {layer}")
    fig.suptitle(f"{name}: kept positions under {cfg.name} (colour = share of KV heads keeping it)")
    fig.tight_layout()
    fig.savefig(out / "retention.png")
    plt.close(fig)

    # 3. Histogram of kept positions at the end
    final = snapshots[-1][1]
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
    for layer in range(mcfg.n_layers):
        kept = final[layer].ravel()
        ax.hist(kept[kept >= 0], bins=min(64, n), range=(0, n), alpha=0.5, label=f"layer {layer}")
    ax.set(xlabel="original position", ylabel="kept slots (all KV heads)",
           title=f"{name}: positions kept after {n} tokens, {cfg.name} budget {getattr(cfg, 'budget', None)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kept_positions.png")
    plt.close(fig)

    # 4. Performance
    context = min(n, mcfg.context_length)
    policy = decode_latency(model, cfg, 1, n if cfg.evicts else context, bench_steps, repeats)
    full = decode_latency(model, make_policy("full"), 1, context, bench_steps, repeats)
    none = recompute_latency(model, 1, context, repeats)
    kept_tokens = int((final[0, 0] >= 0).sum())
    numbers = {
        "policy": cfg.name, "budget": getattr(cfg, "budget", None), "tokens": n, "mean_loss": float(nll.mean()),
        "full_mean_loss": None if full_nll is None else float(full_nll.mean()),
        "latency_ms": {"policy": policy.median_ms_per_token, "full": full.median_ms_per_token,
                       "no_cache": none.median_ms_per_token},
        "latency_context": {"policy": policy.context, "full": context, "no_cache": context},
        "cache_bytes": kept_tokens * model.kv_bytes_per_token,
        "full_equivalent_bytes": n * model.kv_bytes_per_token,
        "compression_ratio": n / kept_tokens,
        "speedup_over_no_cache": none.median_ms_per_token / policy.median_ms_per_token,
    }
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), dpi=110)
    labels = [f"{cfg.name}", "full", "no cache"]
    axes[0].bar(labels, [policy.median_ms_per_token, full.median_ms_per_token, none.median_ms_per_token],
                color=["tab:blue", "tab:gray", "tab:red"])
    axes[0].set(ylabel="ms per token", title=f"decode latency (context {context})")
    axes[1].bar([cfg.name, "full equivalent"], [numbers["cache_bytes"] / 1024, numbers["full_equivalent_bytes"] / 1024],
                color=["tab:blue", "tab:gray"])
    axes[1].set(ylabel="KiB", title=f"KV cache after {n} tokens")
    axes[2].bar([cfg.name, "full"], [numbers["speedup_over_no_cache"], none.median_ms_per_token / full.median_ms_per_token],
                color=["tab:blue", "tab:gray"])
    axes[2].set(ylabel="x", title="speed-up over no cache")
    axes[3].bar([cfg.name], [numbers["compression_ratio"]], color="tab:blue")
    axes[3].set(ylabel="tokens seen / tokens kept", title="compression ratio")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{name}: performance, {cfg.name} budget {getattr(cfg, 'budget', None)}")
    fig.tight_layout()
    fig.savefig(out / "performance.png")
    plt.close(fig)

    (out / "dashboard.json").write_text(json.dumps(numbers, indent=2) + "\n")
    return numbers
