"""Figures for evaluation and benchmarks (matplotlib, written to PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _plain_log_axes(ax) -> None:
    """Log axes labelled 64, 1024, 0.5 ... rather than 2^6 or 6x10^-1."""
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(_PLAIN)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


# One colour and marker per policy in every panel and figure.
_POLICY_STYLE = {"none": ("tab:gray", "x"), "full": ("tab:blue", "o"), "streaming": ("tab:green", "s"),
                 "snapkv": ("tab:red", "^"), "h2o": ("tab:orange", "v"), "knorm": ("tab:purple", "D"),
                 "random": ("tab:brown", "P"), "adakv": ("tab:pink", "*"), "pyramidkv": ("tab:olive", "h"),
                 "expected": ("tab:cyan", "X")}


def _style(policy: str) -> dict:
    color, marker = _POLICY_STYLE.get(policy, (None, "o"))
    return {"color": color, "marker": marker}


def _bytes_label(v: float) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if v >= size:
            return f"{v / size:.4g} {unit}"
    return f"{v:g} B"


def perplexity_vs_budget(rows: list[dict], out: str | Path, title: str = "") -> None:
    """Perplexity against cache budget, one line per policy, with `full` as a horizontal reference."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    full = [r for r in rows if r["policy"] == "full"]
    for policy in sorted({r["policy"] for r in rows} - {"full"}):
        points = sorted((r["budget"], r["perplexity"]) for r in rows if r["policy"] == policy)
        ax.plot(*zip(*points, strict=True), label=policy, **_style(policy))
    if full:
        ax.axhline(full[0]["perplexity"], color="black", linestyle="--", linewidth=1, label="full cache")
    ax.set_xscale("log", base=2)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_xlabel("cache budget (tokens per layer and KV head)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or f"{rows[0]['protocol']} protocol")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def bench_curves(results: list[dict], out: str | Path, title: str = "") -> None:
    """Per-token latency (one panel per batch size) and cache bytes against context, log axes."""
    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4.2), dpi=110)
    order = [p for p in _POLICY_STYLE if any(r["policy"] == p for r in results)]
    policies = order + sorted({r["policy"] for r in results} - set(order))
    for ax, batch in zip(axes, batches, strict=False):
        for policy in policies:
            points = sorted((r["context"], r["median_ms_per_step"]) for r in results
                            if r["policy"] == policy and r["batch"] == batch)
            if points:
                ax.plot(*zip(*points, strict=True), label="no cache" if policy == "none" else policy,
                        **_style(policy))
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
               title=f"decode latency, batch {batch}")
        _plain_log_axes(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    for i, policy in enumerate(policies):
        points = sorted({(r["context"], r["cache_bytes_per_sequence"]) for r in results
                         if r["policy"] == policy and r["cache_bytes_per_sequence"] > 0})
        if points:
            # Compressing policies keep the same budget: their lines coincide, so dash and shrink
            # the later ones to keep each visible.
            ax.plot(*zip(*points, strict=True), label=policy, linestyle="-" if i < 2 else "--",
                    markersize=max(7 - 1.5 * i, 3), **_style(policy))
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV-cache bytes per sequence",
           title="cache memory per sequence")
    _plain_log_axes(ax)
    sizes = sorted({r["cache_bytes_per_sequence"] for r in results if r["cache_bytes_per_sequence"] > 0})
    ax.set_yticks(sizes, [_bytes_label(v) for v in sizes])  # the measured sizes, in KiB/MiB
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def training_curves(metrics_jsonl: str | Path, out: str | Path, title: str = "") -> None:
    """Training loss (with a moving average) and held-out loss against tokens seen; learning rate below."""
    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    held = [r for r in records if "heldout_loss" in r]
    tokens_at = {r["step"]: r["tokens_seen"] for r in train}
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=120, sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
    x = np.array([r["tokens_seen"] for r in train]) / 1e6
    loss = np.array([r["loss"] for r in train])
    ax.plot(x, loss, color="tab:blue", alpha=0.35, lw=0.8, label="train (per logged step)")
    k = max(1, len(loss) // 20)
    if len(loss) >= k:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], smooth, color="tab:blue", lw=1.8, label=f"train (moving average of {k})")
    if held:
        hx = [tokens_at.get(r["step"], np.nan) / 1e6 for r in held]
        ax.plot(hx, [r["heldout_loss"] for r in held], "o-", color="tab:orange", label="held out")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "training")
    ax.grid(alpha=0.3)
    ax.legend()
    lr_ax.plot(x, [r["lr"] for r in train], color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("tokens seen (millions)")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def score_vs_budget(rows: list[dict], out: str | Path, metric: str, ylabel: str, title: str = "") -> None:
    """One panel per context length: `metric` of each policy against cache budget (log x), the full
    cache as a dashed line, with each cell's 95% interval as error bars when the rows have one."""
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        at = [r for r in rows if r["length"] == length]
        for r in at:
            if r["policy"] == "full":
                ax.axhline(r[metric], color=_style("full")["color"], ls="--", label="full")
        for policy in sorted({r["policy"] for r in at} - {"full"}):
            pts = sorted((r for r in at if r["policy"] == policy), key=lambda r: r["budget"])
            x = [r["budget"] for r in pts]
            y = [r[metric] for r in pts]
            err = None
            if all(r.get("ci95") for r in pts):
                err = np.array([[v - r["ci95"][0] for v, r in zip(y, pts, strict=True)],
                                [r["ci95"][1] - v for v, r in zip(y, pts, strict=True)]]).clip(0)
            ax.errorbar(x, y, yerr=err, label=policy, capsize=2, lw=1.2, ms=5, **_style(policy))
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(_PLAIN)
        ax.set_xlabel("cache budget (slots per layer and KV head)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{length} tokens")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
