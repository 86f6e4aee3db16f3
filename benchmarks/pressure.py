"""Idle sessions under memory pressure, through the server: what an idle session costs in RSS, what
the memory-pressure ladder frees, and whether pressured sessions still answer.

    python benchmarks/pressure.py --json out/pressure.json

Two servers on the default model, one after the other, the same documents and questions for both:
`MAX_CACHE_BYTES` at its default (2 GiB: nothing is pressured) and at `--pressured-mb`. Each gets:
1. `--idle` one-line chats, each in its own session: RSS before and after (what an idle session holds);
2. `--docs` sessions whose first turn is a document of `--tokens` tokens with planted facts and the
   first question; then, once every document is in (the ladder has walked the older sessions down
   while the later ones arrived), `--questions` more questions to each session, one turn each.
By default sessions are stored (a fresh directory under out/), so the ladder's last step spills;
`--no-store` keeps them in memory only, and it drops. The JSON has both servers' accuracy on the follow-up questions, the sessions' ladder states before
them, the steps taken and bytes freed, the tiers' bytes and RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import httpx

from server.subprocess_server import serve
from toyllm_core.lab.data import load_text
from toyllm_core.lab.longctx.oneshot import first_number
from toyllm_core.lab.longctx.report import bootstrap_mean
from toyllm_core.lab.longctx.tasks import session_document
from toyllm_core.machine import machine
from toyllm_core.tokenizer import load_tokenizer


def metrics(c: httpx.Client) -> dict[str, float]:
    out = {}
    for line in c.get("/metrics").text.splitlines():
        m = re.match(r"(toyllm_(?:session_pressure|kv_cache_tier|sessions_evicted)\S*) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def quiet(c: httpx.Client, timeout: float = 120.0) -> dict[str, float]:
    """The pressure metrics once they stop moving (the ladder's worker is done)."""
    last, deadline = None, time.time() + timeout
    while time.time() < deadline:
        now = metrics(c)
        if now == last:
            return now
        last = now
        time.sleep(0.5)
    return last


def chat(c: httpx.Client, model: str, sid: str, text: str, max_tokens: int) -> str:
    r = c.post("/v1/chat/completions", headers={"X-Session-ID": sid},
               json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                     "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def run(url: str, docs, a) -> dict:
    with httpx.Client(base_url=url, timeout=600) as c:
        info = c.get("/info").json()
        model = info["model"]["name"]
        rss0 = c.get("/info").json()["rss_bytes"]
        for i in range(a.idle):
            sid = c.post("/sessions", json={}).json()["session_id"]
            chat(c, model, sid, f"Say hello to guest number {i}.", 8)
        idle = {"sessions": a.idle, "rss_added_bytes": c.get("/info").json()["rss_bytes"] - rss0}
        idle["per_session_bytes"] = idle["rss_added_bytes"] / max(1, a.idle)
        sids, answers = [], []
        for doc in docs:
            sid = c.post("/sessions", json={}).json()["session_id"]
            chat(c, model, sid, doc.turn(0), 16)
            sids.append(sid)
        after_docs = quiet(c)
        states = []
        for sid in sids:
            r = c.get(f"/sessions/{sid}")
            states.append(r.json()["memory"] if r.status_code == 200 else {"state": "dropped"})
        for sid, doc in zip(sids, docs, strict=True):
            for q in range(1, 1 + a.questions):
                try:
                    reply = chat(c, model, sid, doc.turn(q), 16)
                except httpx.HTTPStatusError as e:  # dropped by the ladder: a lost answer
                    reply = f"<{e.response.status_code}>"
                answers.append({"doc": docs.index(doc), "question": q, "answer": doc.answers[q], "reply": reply,
                                "correct": first_number(reply) == doc.answers[q]})
        scores = [float(x["correct"]) for x in answers]
        return {"max_cache_bytes": info["limits"]["max_cache_bytes"], "idle": idle, "states_before_follow_ups": states,
                "metrics_after_docs": after_docs, "metrics_at_end": quiet(c),
                "rss_bytes": c.get("/info").json()["rss_bytes"],
                "follow_ups": {"n": len(scores), "accuracy": sum(scores) / len(scores), "ci95": bootstrap_mean(scores)},
                "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("weights/smollm2-135m-instruct"))
    p.add_argument("--corpus", default="offline:data/offline")
    p.add_argument("--idle", type=int, default=30)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--pressured-mb", type=float, default=100)
    p.add_argument("--port", type=int, default=8031)
    p.add_argument("--no-store", dest="store", action="store_false",
                   help="sessions in memory only: the ladder's last step drops instead of spilling")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    tokenizer = load_tokenizer(a.checkpoint)
    corpus = load_text(a.corpus, "heldout")
    docs = [session_document(tokenizer, corpus, a.tokens, 1 + a.questions, seed) for seed in range(a.docs)]
    report = {"docs": a.docs, "tokens": a.tokens, "questions": a.questions, "machine": machine(), "runs": {}}
    for name, limit in (("unpressured", None), ("pressured", int(a.pressured_mb * 1e6))):
        store = Path("out") / f"pressure_sessions_{name}"  # a fresh session store (the default: a directory)
        shutil.rmtree(store, ignore_errors=True)
        env = {"TOYLLM_CHECKPOINT": str(a.checkpoint), "TOYLLM_PORT": str(a.port),
               "TOYLLM_SESSION_DIR": str(store) if a.store else ""}
        if limit:
            env["TOYLLM_MAX_CACHE_BYTES"] = str(limit)
        with serve(env, Path("out") / f"pressure_{name}.log") as (url, _):
            report["runs"][name] = out = run(url, docs, a)
        print(f"{name}: idle session {out['idle']['per_session_bytes'] / 1e6:.2f} MB RSS; follow-ups "
              f"{out['follow_ups']['accuracy']:.3f} of {out['follow_ups']['n']}; states "
              f"{[s['state'] for s in out['states_before_follow_ups']]}", file=sys.stderr)
    report["machine_after"] = machine()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
