"""Multi-turn sessions over a long document (the `session-qa` protocol), through the engine.

Turn 1 gives the document and the first question; each later turn asks one more question. Every
turn runs as the server runs a session's turn: the session's cache (compressed after the previous
turn) gets the pending token and the rendered continuation of the chat, prefilled and then
compressed once the prompt is in (a prefill window that covers the document), and the reply is
decoded greedily in a decode slot, compressing when the row reaches kept slots + slack.

Turn 1's prompt is the same for every policy, so all but its last token are prefilled once (with
every signal recorded); each policy's session starts from a copy carrying its own signals and
prefills the last token itself, which compresses exactly as prefilling the whole prompt would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine import CacheClass, Engine
from ..model import ToyLLM
from ..policies import Policy
from ..sampling import SamplingParams
from .oneshot import first_number, prefill
from .tasks import SessionDocument

MAX_CHUNK = 512


@dataclass
class Turn:
    question: str
    answer: str
    reply: str
    correct: bool


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def run_sessions(model: ToyLLM, tokenizer, chat, doc: SessionDocument, policies: list[Policy],
                 max_new_tokens: int = 24) -> dict[Policy, list[Turn]]:
    """Each policy's session over the document: one Turn per question."""
    eot = chat.end_of_turn(tokenizer)
    first = [{"role": "user", "content": doc.turn(0)}]
    prompt = np.asarray(tokenizer(chat.render(first), add_special_tokens=False)["input_ids"], np.int32)
    _, shared = prefill(model, prompt[:-1])
    window = _round_up(len(prompt) + 16, MAX_CHUNK)
    full_tokens = _round_up(len(prompt) + len(doc.questions) * (64 + max_new_tokens), MAX_CHUNK)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eot)
    out = {}
    for policy in policies:
        cls = CacheClass.make(policy, 1, MAX_CHUNK, None if policy.evicts else full_tokens,
                              window if policy.evicts else None)
        engine = Engine(model, [cls])
        signals = policy.signals
        cache = shared.with_signals(signals.scores, signals.recent_queries) if policy.evicts else shared.with_signals()
        feed, length, history, turns = prompt[-1:], len(prompt) - 1, [], []
        for i, question in enumerate(doc.questions):
            seq = engine.run_prefill(feed, cls, sampling, cache, length)
            ids = [seq.pending]
            while seq.active:
                for o in engine.step():
                    ids += o.tokens
            cache, length = engine.free(seq)
            if seq.pending == eot:
                ids = ids[:-1]
            reply = tokenizer.decode(ids, skip_special_tokens=True)
            turns.append(Turn(question, doc.answers[i], reply, first_number(reply) == doc.answers[i]))
            if i + 1 == len(doc.questions):
                break
            history = (history or first) + [{"role": "assistant", "content": reply}]
            new = [{"role": "user", "content": doc.turn(i + 1)}]
            closed = tokenizer.decode([seq.pending]) if seq.pending == eot else ""
            text = chat.continuation(history, new, reply_closed=closed)
            history = history + new
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            # The server feeds the pending token (sampled, not yet cached) before the new text.
            feed = np.asarray(([seq.pending] if seq.pending is not None else []) + ids, np.int32)
        out[policy] = turns
    return out
