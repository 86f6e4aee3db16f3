"""Questions about a long document, through the engine and the core `Session`, under two protocols.

- `multi-turn` (session-qa): turn 1 gives the document and the first question; each later turn asks
  one more. Every turn runs as the server runs a session's turn: the session's tiers get the
  pending token and the rendered continuation of the chat, prefilled and then compressed (or, with
  a cold tier, its last tokens prefilled against hot and cold and the hot set re-selected over
  both) once the prompt is in, and the reply is decoded
  greedily in a decode slot, compressing when the row reaches kept slots + slack.
- `once` (kvpress's protocol): the document alone is read and compressed once, before any question;
  each question is then asked from a fresh copy of that compressed session (hot and cold tiers).

The document's prompt is the same for every policy, so all but its last token are prefilled once
(with every signal recorded); each policy's session starts from a copy carrying its own signals and
prefills the last token itself, which compresses exactly as prefilling the whole prompt would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ...serving.engine import CacheClass, Engine
from ...serving.model import ToyLLM
from ...serving.parking import park
from ...serving.policies import Policy
from ...serving.policies.kvzip import repeat_prompt_ids
from ...serving.sampling import SamplingParams
from ...serving.session import Session
from .oneshot import first_number, prefill
from .tasks import SessionDocument

MAX_CHUNK = 512
PROTOCOLS = ("multi-turn", "once")
_MARK = "\x00QUESTION\x00"


@dataclass
class Turn:
    question: str
    answer: str
    reply: str
    correct: bool


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Runner:
    """One document's shared prefill, and a session per policy starting from it."""

    def __init__(self, model: ToyLLM, tokenizer, chat, prompt: list[int], extra_tokens: int, max_new_tokens: int):
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.prompt = np.asarray(prompt, np.int32)
        _, self.shared = prefill(model, self.prompt[:-1])
        self.window = _round_up(len(prompt) + 16, MAX_CHUNK)
        self.full_tokens = _round_up(len(prompt) + extra_tokens, MAX_CHUNK)
        self.eot = chat.end_of_turn(tokenizer)
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=self.eot)

    def session(self, policy: Policy) -> tuple[Engine, Session]:
        """An engine for the policy's class and a session holding all but the prompt's last token."""
        cls = CacheClass.make(policy, 1, MAX_CHUNK, None if policy.evicts else self.full_tokens,
                              self.window if policy.evicts else None)
        cache = park(self.shared.with_signals(policy.signals))
        repeat = repeat_prompt_ids(self.tokenizer, self.chat)
        return Engine(self.model, [cls], repeat_prompt=repeat), Session(cls, cache=cache, length=len(self.prompt) - 1,
                                                  tokens=self.prompt[:-1].tolist())

    def ask(self, engine: Engine, session: Session, prompt_ids: list[int]) -> str:
        """One greedy turn; the reply's text (the end of turn left out)."""
        ids = session.run_turn(engine, prompt_ids, self.sampling)
        if ids and ids[-1] == self.eot:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def run_sessions(model: ToyLLM, tokenizer, chat, doc: SessionDocument, policies: list[Policy],
                 max_new_tokens: int = 24) -> dict[Policy, list[Turn]]:
    """The multi-turn protocol: each policy's session over the document, one Turn per question."""
    first = [{"role": "user", "content": doc.turn(0)}]
    runner = _Runner(model, tokenizer, chat, chat.render_ids(tokenizer, first),
                     len(doc.questions) * (64 + max_new_tokens), max_new_tokens)
    out = {}
    for policy in policies:
        engine, session = runner.session(policy)
        prompt_ids, messages, turns = [int(runner.prompt[-1])], first, []
        for i, question in enumerate(doc.questions):
            if i:
                prompt_ids, messages = session.chat_prompt(chat, tokenizer, session.chat +
                                                           [{"role": "user", "content": doc.turn(i)}], runner.eot)
            reply = runner.ask(engine, session, prompt_ids)
            session.replied(messages, reply)
            turns.append(Turn(question, doc.answers[i], reply, first_number(reply) == doc.answers[i]))
        out[policy] = turns
    return out


def _copy(session: Session) -> Session:
    """A session to ask one question from (its parked hot cache is never changed in place: each turn
    uploads a copy)."""
    return dataclasses.replace(session, tokens=list(session.tokens))


def run_once(model: ToyLLM, tokenizer, chat, doc: SessionDocument, policies: list[Policy],
             max_new_tokens: int = 24) -> dict[Policy, list[Turn]]:
    """kvpress's protocol: the document (in the user's message, up to where the question goes) is
    read and compressed once; each question is asked from a fresh copy of that session."""
    rendered = chat.render([{"role": "user", "content": doc.turn(0).split("\n\nQuestion:")[0] + "\n\n" + _MARK}])
    head, tail = rendered.split(_MARK)
    runner = _Runner(model, tokenizer, chat, _ids(tokenizer, head), 64 + max_new_tokens, max_new_tokens)
    out = {}
    for policy in policies:
        engine, read = runner.session(policy)
        # Read the document: its last token prefilled (and the cache compressed), no answer kept.
        read.run_turn(engine, [int(runner.prompt[-1])], dataclasses.replace(runner.sampling, max_new_tokens=1))
        read.tokens.pop()
        read.pending = None
        read.reply_start = None  # (that token is no reply)
        turns = []
        for i, question in enumerate(doc.questions):
            text = doc.turn(i).split("\n\n")[-1] if i == 0 else doc.turn(i)
            reply = runner.ask(engine, _copy(read), _ids(tokenizer, text + tail))
            turns.append(Turn(question, doc.answers[i], reply, first_number(reply) == doc.answers[i]))
        out[policy] = turns
    return out
