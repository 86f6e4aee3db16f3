"""NVIDIA's kvpress (0.5.5) next to this project's policies on the session-qa `once` protocol: the same
documents, questions and prompt tokens on both sides, accuracy per press/policy and compression ratio.

    .venv/bin/python benchmarks/kvpress_peer.py --json out/kvpress_peer.json
    .venv/bin/python benchmarks/kvpress_peer.py --documents 1 --doc-tokens 512 --facts 2 --ratios 0.5 \\
        --presses none,SnapKVPress --json out/kvpress_peer-smoke.json

(`make bench-kvpress-peer` creates kvpress's virtual environment, .venv-kvpress, first.)

The protocol is kvpress's, as `toyllm_core.lab.longctx.session.run_once` runs it: the document (the
user's message of turn 1 up to where the question goes, rendered by the model's chat template) is read
and compressed once, before any question; each question (its text and the template's end of turn and
assistant prompt) is then asked from that compressed cache, greedily, up to 24 new tokens. A reply is
right when its first number is the planted room number.

kvpress pins transformers < 5.3 and needs torch, so it runs in a virtual environment of its own
(`--kvpress-python`, default .venv-kvpress/bin/python); this project runs in its own. Three phases
(`--phase`), each a child process of the default run (`all`), which records the machine before and
after and writes `--json`:
1. prepare (this project's environment): the documents, built as `toyllm eval --protocol session-qa`
   builds them (`session_document(tokenizer, load_text(corpus, "heldout"), doc_tokens, facts,
   seed + i)` for document i), rendered as `run_once` renders them: the head (text and token ids), each
   question's text + the template's tail (text and token ids), the answers; and per document and ratio
   r the budget kvpress keeps, max(1, int(n * (1 - r))) for a head of n tokens (kvpress's
   `compute_n_kept`). Written to WORK/inputs.json (WORK: `--work-dir`, default next to `--json`).
2. kvpress (kvpress's environment; imports only the standard library, numpy, torch, transformers and
   kvpress): SmolLM2 loaded by transformers from `--checkpoint` in float32 (sdpa attention, torch's CPU
   build); for each press in `--presses` (`none`: no press, once) and each ratio in `--ratios`, one
   call of kvpress's `kv-press-text-generation` pipeline per document with the document as `context`
   and every question as `questions`: the press is active only while the context is prefilled (the
   questions never take part in the compression), and each answer is removed from the cache before
   the next question. The pipeline renders the context and questions with the same chat template; the
   phase checks that its tokens equal the prepared ones and otherwise feeds the prepared token ids
   through the pipeline's `forward` (recorded as `prompt` in each timing). WORK/kvpress.json.
3. toyllm (this project's environment): `run_once` with `full` and, for each ratio, the project's
   policies matching the presses (KVzipPress: kvzip, SnapKVPress: snapkv, StreamingLLMPress: streaming,
   ExpectedAttentionPress: expected, KnormPress: knorm; or `--policies`) at the budget of that ratio,
   one tier (cold_bits=0: what is evicted is dropped, as in kvpress), each policy's other parameters at
   their defaults, the model in `--dtype` (float32). A policy this checkout lacks is skipped and listed.
   WORK/toyllm.json.
Children run with OMP_WAIT_POLICY=passive unless it is set (torch's threads then sleep rather than spin
when the cores are shared; only speed depends on it).
The JSON: settings, machine before and after, rows per (side, press/policy, ratio) with n (questions),
accuracy and a 95% bootstrap interval (1,000 resamples, as `report.bootstrap_mean`), the ratio of each
project policy's accuracy to its kvpress press's at the same ratio, the seconds each call took, and every
reply.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
MAX_NEW_TOKENS = 24
PRESSES = ("KVzipPress", "SnapKVPress", "StreamingLLMPress", "ExpectedAttentionPress", "KnormPress", "none")
# kvpress press -> this project's policy of the same method.
PRESS_POLICY = {"none": "full", "KVzipPress": "kvzip", "SnapKVPress": "snapkv", "StreamingLLMPress": "streaming",
                "ExpectedAttentionPress": "expected", "KnormPress": "knorm"}
_MARK = "\x00QUESTION\x00"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def _bootstrap(values, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of 0/1 `values`: `toyllm_core.lab.longctx.report.bootstrap_mean`."""
    import numpy as np

    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    means = v[np.random.default_rng(seed).integers(0, len(v), (samples, len(v)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _rows(records: list[dict], key: str, bootstrap) -> list[dict]:
    """One row per (method, ratio): n, accuracy, its interval, the budgets (slots kept per document)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r[key], r["ratio"]), []).append(r)
    rows = []
    for (method, ratio), members in groups.items():
        scores = [float(m["correct"]) for m in members]
        budgets = sorted({m["sample"]: m["budget"] for m in members if m["budget"] is not None}.items())
        rows.append({key: method, "ratio": ratio, "n": len(scores), "accuracy": sum(scores) / len(scores),
                     "ci95": list(bootstrap(scores)), "budgets": [b for _, b in budgets] or None})
    return sorted(rows, key=lambda r: (r[key], r["ratio"]))


# --- phase 1: the documents, as the project renders them ------------------------------------------------

def phase_prepare(a) -> None:
    from toyllm_core.chat import ChatTemplate
    from toyllm_core.lab.data import load_text
    from toyllm_core.lab.longctx.oneshot import _NUMBER
    from toyllm_core.lab.longctx.tasks import session_document
    from toyllm_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(a.checkpoint)
    chat = ChatTemplate.of(tokenizer)
    if chat is None:
        raise SystemExit(f"{a.checkpoint}: the tokenizer has no chat template")
    ids = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # as run_once's _ids
    corpus = load_text(a.corpus, "heldout")
    ratios = [float(r) for r in _names(a.ratios)]
    if any(not 0 < r < 1 for r in ratios):
        raise SystemExit("--ratios must lie in (0, 1)")
    presses = _names(a.presses)
    policies = _names(a.policies) if a.policies else [PRESS_POLICY[p] for p in presses if p in PRESS_POLICY]
    documents = []
    for s in range(a.documents):
        doc = session_document(tokenizer, corpus, a.doc_tokens, a.facts, a.seed + s)
        context = doc.turn(0).split("\n\nQuestion:")[0] + "\n\n"  # the user's message up to the question
        head, tail = chat.render([{"role": "user", "content": context + _MARK}]).split(_MARK)
        head_ids = ids(head)
        questions = []
        for i in range(len(doc.questions)):
            text = doc.turn(i).split("\n\n")[-1] if i == 0 else doc.turn(i)
            questions.append({"text": text, "ids": ids(text + tail), "answer": doc.answers[i],
                              "depth": doc.depths[i]})
        documents.append({"sample": s, "seed": a.seed + s, "context": context, "head": head, "tail": tail,
                          "head_ids": head_ids, "n": len(head_ids), "questions": questions,
                          "budgets": {str(r): max(1, int(len(head_ids) * (1 - r))) for r in ratios}})
        _log(f"prepare: document {s}: {len(head_ids)} tokens, {len(questions)} questions")
    settings = {"checkpoint": str(Path(a.checkpoint).resolve()), "corpus": a.corpus, "doc_tokens": a.doc_tokens,
                "documents": a.documents, "facts": a.facts, "seed": a.seed, "ratios": ratios, "presses": presses,
                "policies": policies, "dtype": a.dtype, "threads": a.threads, "max_new_tokens": MAX_NEW_TOKENS,
                "number_pattern": _NUMBER.pattern, "budget_rule": "max(1, int(n * (1 - ratio))), n = head tokens"}
    _write(a.work_dir / "inputs.json", {"settings": settings, "documents": documents})


# --- phase 2: kvpress ------------------------------------------------------------------------------------

def phase_kvpress(a) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from importlib import metadata

    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    transformers.utils.logging.disable_progress_bar()
    inputs = _read(a.work_dir / "inputs.json")
    st, documents = inputs["settings"], inputs["documents"]
    number = re.compile(st["number_pattern"])
    torch.set_num_threads(st["threads"])
    path = st["checkpoint"]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    load_s = time.perf_counter() - t0
    presses = {}
    for name in st["presses"]:
        if name != "none" and not isinstance(getattr(kvpress, name, None), type):
            raise SystemExit(f"kvpress {metadata.version('kvpress')} has no press {name!r}")
        presses[name] = None if name == "none" else getattr(kvpress, name)

    records, timings, prompts = [], [], []
    for doc in documents:
        questions = [q["text"] for q in doc["questions"]]
        # The pipeline's own rendering of (context, questions) must give the prepared tokens.
        pre = pipe.preprocess(doc["context"], questions=questions, answer_prefix="",
                              max_context_length=int(1e10))
        own_ids = [t[0].tolist() for t in pre["questions_ids"]]
        same = pre["context_ids"][0].tolist() == doc["head_ids"] and own_ids == [q["ids"] for q in doc["questions"]]
        prompts.append({"sample": doc["sample"], "pipeline_tokens_match": same})
        if not same:
            _log(f"kvpress: document {doc['sample']}: the pipeline's tokens differ; feeding the prepared ids")
        for name, cls in presses.items():
            for ratio in [0.0] if cls is None else st["ratios"]:
                press = None if cls is None else cls(compression_ratio=ratio)
                t1 = time.perf_counter()
                if same:
                    answers = pipe(doc["context"], questions=questions, press=press,
                                   max_new_tokens=st["max_new_tokens"])["answers"]
                else:
                    tensors = {"context_ids": torch.tensor([doc["head_ids"]]),
                               "questions_ids": [torch.tensor([q["ids"]]) for q in doc["questions"]]}
                    answers = pipe.forward(tensors, press=press, max_new_tokens=st["max_new_tokens"], cache=None)
                seconds = time.perf_counter() - t1
                budget = None if cls is None else doc["budgets"][str(ratio)]
                timings.append({"press": name, "ratio": ratio, "sample": doc["sample"], "context_tokens": doc["n"],
                                "seconds": round(seconds, 2), "prompt": "pipeline" if same else "prepared ids"})
                right = 0
                for i, (q, reply) in enumerate(zip(doc["questions"], answers, strict=True)):
                    m = number.search(reply)
                    correct = (m.group(0) if m else None) == q["answer"]
                    right += correct
                    records.append({"side": "kvpress", "press": name, "ratio": ratio, "budget": budget,
                                    "sample": doc["sample"], "turn": i + 1, "depth": q["depth"],
                                    "answer": q["answer"], "reply": reply, "correct": correct})
                _log(f"kvpress: document {doc['sample']} {name} ratio {ratio}: {right}/{len(answers)} right, "
                     f"{seconds:.1f} s")
    versions = {p: metadata.version(p) for p in ("kvpress", "torch", "transformers")}
    _write(a.work_dir / "kvpress.json", {"versions": versions, "torch_threads": torch.get_num_threads(),
                                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                         "load_s": round(load_s, 1), "prompts": prompts,
                                         "rows": _rows(records, "press", _bootstrap), "timings": timings,
                                         "records": records})


# --- phase 3: this project -------------------------------------------------------------------------------

def phase_toyllm(a) -> None:
    from toyllm_core.chat import ChatTemplate
    from toyllm_core.lab.data import load_text
    from toyllm_core.lab.longctx.report import bootstrap_mean
    from toyllm_core.lab.longctx.session import run_once
    from toyllm_core.lab.longctx.tasks import session_document
    from toyllm_core.serving.policies import make_policy, policy_names
    from toyllm_core.weights import load_model

    inputs = _read(a.work_dir / "inputs.json")
    st, documents = inputs["settings"], inputs["documents"]
    t0 = time.perf_counter()
    loaded = load_model(Path(st["checkpoint"]), dtype=st["dtype"])
    model, tokenizer = loaded.model, loaded.tokenizer
    chat = ChatTemplate.of(tokenizer)
    load_s = time.perf_counter() - t0
    corpus = load_text(st["corpus"], "heldout")
    known = set(policy_names())
    names = [p for p in st["policies"] if p in known and p != "full"]
    skipped = [p for p in st["policies"] if p not in known]
    if skipped:
        _log(f"toyllm: no policy {', '.join(skipped)} in this checkout; skipped")
    records, timings = [], []
    for doc in documents:
        built = session_document(tokenizer, corpus, st["doc_tokens"], st["facts"], doc["seed"])
        if built.answers != [q["answer"] for q in doc["questions"]] or \
                not chat.render([{"role": "user", "content": built.turn(0).split("\n\nQuestion:")[0] + "\n\n"
                                 + _MARK}]).startswith(doc["head"]):
            raise SystemExit(f"document {doc['sample']} differs from the prepared one")
        policies = {make_policy("full"): ("full", 0.0)}
        for name in names:
            for ratio in st["ratios"]:
                policies[make_policy(name, budget=doc["budgets"][str(ratio)], cold_bits=0)] = (name, ratio)
        t1 = time.perf_counter()
        out = run_once(model, tokenizer, chat, built, list(policies), max_new_tokens=st["max_new_tokens"])
        seconds = time.perf_counter() - t1
        timings.append({"sample": doc["sample"], "context_tokens": doc["n"], "policies": len(policies),
                        "seconds": round(seconds, 2)})
        for policy, turns in out.items():
            name, ratio = policies[policy]
            for i, t in enumerate(turns):
                records.append({"side": "toyllm", "policy": name, "ratio": ratio, "label": policy.label,
                                "budget": policy.budget if policy.evicts else None, "sample": doc["sample"],
                                "turn": i + 1, "depth": doc["questions"][i]["depth"], "answer": t.answer,
                                "reply": t.reply, "correct": bool(t.correct)})
        right = sum(r["correct"] for r in records if r["sample"] == doc["sample"])
        _log(f"toyllm: document {doc['sample']}: {len(policies)} policies, {right} right, {seconds:.1f} s")
    # The parameters each policy ran with (the budget apart: it is per document and ratio).
    params = {"full": make_policy("full").describe()} | {
        n: {k: v for k, v in make_policy(n, cold_bits=0).describe().items() if k != "budget"} for n in names}
    _write(a.work_dir / "toyllm.json", {"load_s": round(load_s, 1), "skipped_policies": skipped,
                                        "policy_params": params, "rows": _rows(records, "policy", bootstrap_mean),
                                        "timings": timings, "records": records})


# --- all: the phases as child processes, one JSON ---------------------------------------------------------

def _combine(work_dir: Path) -> dict:
    inputs, kv, toy = (_read(work_dir / f) for f in ("inputs.json", "kvpress.json", "toyllm.json"))
    st = inputs["settings"]
    kv_rows = {(r["press"], r["ratio"]): r for r in kv["rows"]}
    comparison = []
    for r in toy["rows"]:
        presses = [p for p in st["presses"] if PRESS_POLICY.get(p) == r["policy"]]
        peer = kv_rows.get((presses[0], r["ratio"])) if presses else None
        if peer is None:
            continue
        comparison.append({"policy": r["policy"], "press": peer["press"], "ratio": r["ratio"],
                           "toyllm_accuracy": r["accuracy"], "kvpress_accuracy": peer["accuracy"],
                           "accuracy_ratio": r["accuracy"] / peer["accuracy"] if peer["accuracy"] else None})
    rows = [{"side": "kvpress", "method": r.pop("press"), **r} for r in kv["rows"]] + \
           [{"side": "toyllm", "method": r.pop("policy"), **r} for r in toy["rows"]]
    docs = [{k: d[k] for k in ("sample", "seed", "n", "budgets")} for d in inputs["documents"]]
    return {"settings": st, "documents": docs, "rows": rows, "comparison": comparison,
            "kvpress": {k: kv.get(k) for k in ("versions", "torch_threads", "omp_wait_policy", "load_s", "prompts",
                                                "timings")},
            "toyllm": {k: toy[k] for k in ("load_s", "skipped_policies", "policy_params", "timings")},
            "records": kv["records"] + toy["records"]}


def _child(python: str, a, phase: str) -> None:
    cmd = [python, str(HERE), "--phase", phase, "--work-dir", str(a.work_dir)]
    if phase == "prepare":
        cmd += ["--checkpoint", str(a.checkpoint), "--corpus", a.corpus, "--doc-tokens", str(a.doc_tokens),
                "--documents", str(a.documents), "--facts", str(a.facts), "--seed", str(a.seed),
                "--presses", a.presses, "--ratios", a.ratios, "--dtype", a.dtype, "--threads", str(a.threads)]
        if a.policies:
            cmd += ["--policies", a.policies]
    # Torch's OpenMP threads spin between parallel regions by default, which on a shared machine slows
    # them down many times over (see peers.py); passive unless the caller says otherwise.
    env = os.environ | {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
    t0 = time.perf_counter()
    _log(f"--- {phase}: {' '.join(cmd)}")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    _log(f"--- {phase}: {time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("all", "prepare", "kvpress", "toyllm"), default="all")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "weights/smollm2-135m-instruct")
    p.add_argument("--corpus", default="offline:data/offline")
    p.add_argument("--doc-tokens", type=int, default=2048)
    p.add_argument("--documents", type=int, default=10)
    p.add_argument("--facts", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presses", default=",".join(PRESSES), help="kvpress presses; none: no press")
    p.add_argument("--ratios", default="0.5,0.75,0.875", help="kvpress compression ratios")
    p.add_argument("--policies", help="this project's policies (default: those matching --presses)")
    p.add_argument("--dtype", default="float32", help="this project's model dtype (kvpress: float32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (kvpress)")
    p.add_argument("--kvpress-python", default=str(ROOT / ".venv-kvpress/bin/python"))
    p.add_argument("--json", type=Path, default=Path("out/kvpress_peer.json"))
    p.add_argument("--work-dir", type=Path, help="the phases' files (default: --json's name + -parts)")
    a = p.parse_args()
    a.work_dir = (a.work_dir or a.json.with_name(a.json.stem + "-parts")).resolve()
    if a.phase != "all":
        {"prepare": phase_prepare, "kvpress": phase_kvpress, "toyllm": phase_toyllm}[a.phase](a)
        return
    from toyllm_core.machine import machine

    started, before = time.perf_counter(), machine()
    _child(sys.executable, a, "prepare")
    _child(a.kvpress_python, a, "kvpress")
    _child(sys.executable, a, "toyllm")
    results = _combine(a.work_dir)
    results["machine"] = {"before": before, "after": machine()}
    results["seconds"] = round(time.perf_counter() - started, 1)
    _write(a.json, results)
    for r in results["rows"]:
        print(f"{r['side']:8} {r['method']:24} ratio {r['ratio']:<6} n {r['n']:4}  accuracy {r['accuracy']:.3f}  "
              f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    for c in results["comparison"]:
        print(f"{c['policy']:10} / {c['press']:24} ratio {c['ratio']:<6} accuracy ratio {c['accuracy_ratio']}")
    _log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
