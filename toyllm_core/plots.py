"""Figures for evaluation and benchmarks (matplotlib, written to PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def perplexity_vs_budget(rows: list[dict], out: str | Path, title: str = "") -> None:
    """Perplexity against cache budget, one line per policy, with `full` as a horizontal reference."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    full = [r for r in rows if r["policy"] == "full"]
    for policy in sorted({r["policy"] for r in rows} - {"full"}):
        points = sorted((r["budget"], r["perplexity"]) for r in rows if r["policy"] == policy)
        ax.plot(*zip(*points, strict=True), marker="o", label=policy)
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
