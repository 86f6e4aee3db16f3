"""A running server's answers to single-turn questions about pasted documents, under its default
cache and under the full cache: what a user who pastes a document into a chat gets.

    python benchmarks/doc_qa.py --url http://127.0.0.1:8000 --corpus offline:data/offline --docs 12 \\
        --json out/doc_qa.json

`--docs` documents of 500-1,500 tokens of prose, each with facts of different kinds planted at
random depths (`toyllm_core.lab.longctx.tasks.doc_questions`), two questions per document, each asked
in one stateless chat message (the document, then the question), greedy. Each is asked once with no
`cache` (the server's default) and once with `{"policy": "full"}` (the server must serve a full
class). An answer is right when the reply states the planted value. Reports accuracy with a 95%
bootstrap interval per cache, and the questions the two got differently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from toyllm_core.lab.data import load_text
from toyllm_core.lab.longctx.report import bootstrap_mean
from toyllm_core.lab.longctx.tasks import doc_questions
from toyllm_core.machine import machine
from toyllm_core.tokenizer import load_tokenizer


def ask(client: httpx.Client, model: str, message: str, cache: dict | None, max_tokens: int) -> dict:
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": message}]}
    if cache is not None:
        body["cache"] = cache
    r = client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--checkpoint", type=Path, default=Path("weights/smollm2-135m-instruct"),
                   help="for its tokenizer (the documents are sized in its tokens)")
    p.add_argument("--corpus", default="offline:data/offline")
    p.add_argument("--docs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    tokenizer = load_tokenizer(a.checkpoint)
    questions = doc_questions(tokenizer, load_text(a.corpus, "heldout"), a.docs, a.seed)
    with httpx.Client(base_url=a.url, timeout=600) as client:
        info = client.get("/info").json()
        model = info["model"]["name"]
        caches = {"default": None, "full": {"policy": "full"}}
        records = []
        for i, q in enumerate(questions):
            for name, cache in caches.items():
                out = ask(client, model, q.message, cache, a.max_tokens)
                reply = out["choices"][0]["message"]["content"]
                records.append({"question_index": i, "cache": name, "doc_tokens": q.doc_tokens,
                                "prompt_tokens": out["usage"]["prompt_tokens"], "depth": round(q.depth, 3),
                                "question": q.question, "answer": q.answer, "reply": reply,
                                "correct": q.correct(reply)})
            pair = records[-2:]
            print(f"#{i} ({pair[0]['prompt_tokens']} prompt tokens): default {'ok' if pair[0]['correct'] else 'miss'}, "
                  f"full {'ok' if pair[1]['correct'] else 'miss'}  [{q.answer}] {pair[0]['reply'][:60]!r}",
                  file=sys.stderr)
    rows = {}
    for name in caches:
        scores = [float(r["correct"]) for r in records if r["cache"] == name]
        rows[name] = {"n": len(scores), "accuracy": sum(scores) / len(scores), "ci95": bootstrap_mean(scores)}
        print(f"{name:>8}: {rows[name]['accuracy']:.3f} of {len(scores)} "
              f"[{rows[name]['ci95'][0]:.2f}, {rows[name]['ci95'][1]:.2f}]")
    by_q = {}
    for r in records:
        by_q.setdefault(r["question_index"], {})[r["cache"]] = r["correct"]
    differ = [i for i, v in by_q.items() if v["default"] != v["full"]]
    print(f"answered differently: {len(differ)} of {len(by_q)}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"default_cache": info["default_cache"], "rows": rows, "differ": differ,
                                      "machine": machine(), "records": records}, indent=2))


if __name__ == "__main__":
    main()
