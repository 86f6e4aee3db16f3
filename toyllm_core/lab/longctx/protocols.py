"""The four long-context protocols of `toyllm eval`: each returns per-sample records (JSON-ready)
and the rows that summarise them (one per cell, with a bootstrap interval)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ...serving.model import ToyLLM
from ...serving.policies import Policy
from . import oneshot, perplexity, report, tasks
from .session import PROTOCOLS, run_once, run_sessions

LONG_PROTOCOLS = ("passkey", "niah", "session-qa", "ppl")


def _records(answers: list[oneshot.Answer], **cell) -> list[dict]:
    return [{**cell, "policy": a.policy, "budget": a.budget, "answer_text": a.text, "correct": a.correct}
            for a in answers]


def run_passkey(model: ToyLLM, tokenizer, chat, policies: list[Policy], lengths: list[int], depths: list[float],
                samples: int, seed: int, log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    frame = tasks.PromptFrame.of(tokenizer, chat)
    records = []
    for length in lengths:
        for depth in depths:
            for s in range(samples):
                t0 = time.perf_counter()
                sample = tasks.passkey(tokenizer, frame, length, depth, seed + s)
                answers = oneshot.score_sample(model, tokenizer, sample.tokens, sample.answer, policies, 14)
                records += _records(answers, length=length, depth=depth, sample=s, answer=sample.answer)
                full = [a for a in answers if a.policy == "full"]
                log(f"passkey {length} depth {depth:.2f} #{s}: full {'ok' if full and full[0].correct else 'miss'}, "
                    f"{sum(a.correct for a in answers)}/{len(answers)} right, {time.perf_counter() - t0:.0f} s")
    rows = report.accuracy_rows(records, ("length", "policy", "budget"))
    return records, rows


def run_niah(model: ToyLLM, tokenizer, chat, corpus: str, policies: list[Policy], lengths: list[int],
             samples: int, seed: int, log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    frame = tasks.PromptFrame.of(tokenizer, chat)
    records = []
    for length in lengths:
        for s in range(samples):
            t0 = time.perf_counter()
            sample = tasks.niah(tokenizer, frame, corpus, length, seed + s)
            answers = oneshot.score_sample(model, tokenizer, sample.tokens, sample.answer, policies, 24)
            records += _records(answers, length=length, depth=round(sample.depth, 3), sample=s, answer=sample.answer)
            log(f"niah {length} #{s}: {sum(a.correct for a in answers)}/{len(answers)} right, "
                f"{time.perf_counter() - t0:.0f} s")
    return records, report.accuracy_rows(records, ("length", "policy", "budget"))


def run_session_qa(model: ToyLLM, tokenizer, chat, corpus: str, policies: list[Policy], doc_tokens: int,
                   n_facts: int, samples: int, seed: int, log: Callable[[str], None] = print,
                   protocols: tuple[str, ...] = PROTOCOLS) -> tuple[list[dict], list[dict]]:
    """Questions about `samples` documents of `doc_tokens` tokens with `n_facts` facts each, under
    both protocols (`session.PROTOCOLS`): a multi-turn session, and kvpress's compress-once. Rows per
    (protocol, policy, budget, cold tier), and per turn."""
    if chat is None:
        raise ValueError("session-qa needs a chat template (the model's, or the server's --chat-template)")
    runners = {"multi-turn": run_sessions, "once": run_once}
    records = []
    for s in range(samples):
        t0 = time.perf_counter()
        doc = tasks.session_document(tokenizer, corpus, doc_tokens, n_facts, seed + s)
        for protocol in protocols:
            for policy, turns in runners[protocol](model, tokenizer, chat, doc, policies).items():
                for i, t in enumerate(turns):
                    records.append({"protocol": protocol, "length": doc_tokens, "turn": i + 1, "sample": s,
                                    "policy": policy.name, "budget": policy.budget if policy.evicts else None,
                                    "cold_bits": policy.cold_bits if policy.evicts else None,
                                    "question": t.question, "answer": t.answer, "answer_text": t.reply,
                                    "correct": t.correct, "depth": doc.depths[i]})
            right = sum(r["correct"] for r in records if r["sample"] == s and r["protocol"] == protocol)
            log(f"session-qa #{s} {protocol}: {right} right, {time.perf_counter() - t0:.0f} s")
    keys = ("protocol", "policy", "budget", "cold_bits")
    rows = report.accuracy_rows(records, keys)
    by_turn = report.accuracy_rows(records, keys + ("turn",))
    return records, [{**r, "length": doc_tokens} for r in rows] + \
        [{**r, "length": doc_tokens, "by_turn": True} for r in by_turn]


def run_ppl(model: ToyLLM, tokens: np.ndarray, policies: list[Policy], lengths: list[int], sequences: int,
            log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    """Non-overlapping windows of each length + 1 tokens from the start of the text."""
    rows = []
    for length in lengths:
        n = min(len(tokens) // (length + 1), sequences)
        if n == 0:
            raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {length + 1}")
        windows = tokens[: n * (length + 1)].reshape(n, length + 1)
        reference = None
        for policy in [p for p in policies if not p.evicts][:1] + [p for p in policies if p.evicts]:
            t0 = time.perf_counter()
            nll = perplexity.stream_nll(model, windows, policy)
            if reference is None:
                if policy.evicts:
                    raise ValueError("the ppl protocol needs the full cache among the policies (its reference)")
                reference = nll
            ppl = float(np.exp(nll.mean()))
            ref = float(np.exp(reference.mean()))
            delta = 100 * (ppl / ref - 1)
            ci = perplexity.block_bootstrap(nll, reference) if policy.evicts else None
            rows.append({"length": length, "policy": policy.name, "budget": policy.budget if policy.evicts else None,
                         "sequences": n, "tokens": int(nll.size), "perplexity": ppl,
                         "delta_pct": None if not policy.evicts else delta, "ci95": ci})
            log(f"ppl {length} {policy.label}: {ppl:.3f} ({delta:+.2f}%), {time.perf_counter() - t0:.0f} s")
    return [], rows


def format_ppl(rows: list[dict]) -> str:
    lines = [f"{'length':>7} {'policy':>10} {'budget':>6} {'ppl':>9} {'Δ%':>8} {'95% CI':>18}"]
    for r in rows:
        ci = f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]" if r["ci95"] else ""
        delta = f"{r['delta_pct']:+.2f}" if r["delta_pct"] is not None else ""
        lines.append(f"{r['length']:>7} {r['policy']:>10} {r['budget'] or '-':>6} {r['perplexity']:>9.3f} "
                     f"{delta:>8} {ci:>18}")
    return "\n".join(lines)
