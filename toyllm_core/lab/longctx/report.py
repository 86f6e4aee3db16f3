"""Cells of a long-context evaluation: accuracy (or perplexity) per (length, policy, budget), with
a bootstrap interval, as rows for JSON, a table and a plot."""

from __future__ import annotations

import numpy as np


def bootstrap_mean(values, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of `values` (0/1 scores), resampling them."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(v), (samples, len(v)))
    means = v[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def accuracy_rows(records: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Group 0/1 `correct` records by `keys`: one row per group with n, accuracy and its interval."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, members in groups.items():
        scores = [float(m["correct"]) for m in members]
        rows.append({**dict(zip(keys, key, strict=True)), "n": len(scores), "accuracy": float(np.mean(scores)),
                     "ci95": bootstrap_mean(scores)})
    return sorted(rows, key=lambda r: tuple(_order(r[k]) for k in keys))


def _order(v):
    return (0, "", -1) if v is None else (1, v, 0) if isinstance(v, str) else (2, "", v)


def format_accuracy(rows: list[dict], keys: tuple[str, ...]) -> str:
    header = " ".join(f"{k:>10}" for k in keys) + f" {'n':>4} {'acc':>6} {'95% CI':>14}"
    lines = [header]
    for r in rows:
        cells = " ".join(f"{'-' if r[k] is None else r[k]!s:>10}" for k in keys)
        lines.append(f"{cells} {r['n']:>4} {r['accuracy']:>6.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
    return "\n".join(lines)
