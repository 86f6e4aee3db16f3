"""The long-context tasks, generated locally from a seed (no data hub).

Every prompt is built in token space so that its length is exact: the chat template's text before
the user's message, the body (filler or prose with the needles in it), and the template's text
after it (the model writes its whole answer). Each sample records the token span of the text that holds its
answer, so a test can check the generator put it where it says.

- passkey: a 5-digit key in repeated filler at a given depth (Mohtashami and Jaggi, 2023);
- niah: RULER's multi-key needle in a haystack (Hsieh et al., 2024): several "special magic number
  for <key>" sentences in real prose, one asked for, the others distractors;
- session documents: real prose of a few thousand tokens with facts planted at spread-out depths,
  and one question per fact, for multi-turn sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_TASK = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about it.\n")
PASSKEY_QUESTION = "\nWhat is the pass key?"

NIAH_TASK = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.\n")
# The question comes before the text and again after it, and the model writes its whole answer (no
# "The pass key is" given in its turn): with a full cache, SmolLM2-135M-Instruct found the key at
# 3 of 3 depths of ~5k tokens asked so, 1 of 3 with the question only after the text, and 1 of 4 at
# 1k tokens with the start of the answer given.
NIAH_KEYS = ("apple", "river", "lantern", "violet", "harbor", "falcon", "meadow", "copper", "thunder", "saffron",
             "glacier", "orchid", "compass", "ember", "willow", "quartz", "canyon", "marble", "pepper", "sparrow")

SESSION_ITEMS = ("red umbrella", "silver key", "old map", "blue notebook", "brass lamp", "green scarf",
                 "wooden box", "glass jar", "paper kite", "iron bell")
SESSION_TASK = "Read the following document carefully. I will ask you questions about it.\n\n"


@dataclass
class Sample:
    tokens: np.ndarray  # [length] int32, the whole prompt
    answer: str
    span: tuple[int, int]  # tokens[span[0]:span[1]] hold the sentence with the answer
    depth: float  # where that sentence starts, as a fraction of the body
    length: int
    key: str = ""


@dataclass
class PromptFrame:
    """The token ids around a user message: chat template (if any) before and after it."""

    before: list[int]
    after: list[int]

    @staticmethod
    def of(tokenizer, chat=None) -> PromptFrame:
        if chat is None:
            return PromptFrame([], _ids(tokenizer, "\n"))
        marker = "\x00MESSAGE\x00"
        text = chat.render([{"role": "user", "content": marker}], add_generation_prompt=True)
        head, tail = text.split(marker)
        return PromptFrame(_ids(tokenizer, head), _ids(tokenizer, tail))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _assemble(frame: PromptFrame, task: list[int], body: list[int], needles: list[tuple[int, list[int]]],
              question: list[int], answer: list[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """frame.before + task + body with needles inserted at body offsets + question + frame.after +
    answer; returns the tokens and each needle's span (in the order given)."""
    out = list(frame.before) + list(task)
    spans: list[tuple[int, int] | None] = [None] * len(needles)
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    done = 0
    for i in order:
        at, ids = needles[i]
        out += body[done:at]
        spans[i] = (len(out), len(out) + len(ids))
        out += ids
        done = at
    out += body[done:] + list(question) + list(frame.after) + list(answer)
    return np.asarray(out, np.int32), spans


def passkey(tokenizer, frame: PromptFrame, length: int, depth: float, seed: int) -> Sample:
    """A prompt of exactly `length` tokens: filler with the pass-key sentence at `depth` (0 = at the
    start of the filler, 1 = at its end)."""
    rng = np.random.default_rng([seed, length, round(depth * 1000)])
    key = str(rng.integers(10000, 100000))
    needle = _ids(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.")
    task, question = _ids(tokenizer, PASSKEY_TASK + PASSKEY_QUESTION.strip() + "\n"), _ids(tokenizer, PASSKEY_QUESTION)
    room = length - len(frame.before) - len(task) - len(needle) - len(question) - len(frame.after)
    unit = _ids(tokenizer, FILLER)
    if room < len(unit):
        raise ValueError(f"a passkey prompt of {length} tokens leaves no room for filler")
    units, extra = divmod(room, len(unit))
    # Whole sentences, but for a cut-off one at the very start (the filler ends where the question begins).
    body = unit[len(unit) - extra :] + unit * units
    at = extra + round(depth * units) * len(unit)  # at a sentence boundary
    tokens, (span,) = _assemble(frame, task, body, [(at, needle)], question, [])
    return Sample(tokens, key, span, at / room, length)


def prose_tokens(tokenizer, text: str, n: int, seed: int) -> list[int]:
    """n tokens of real prose from `text` (documents separated by blank lines), starting at a
    document chosen by the seed and wrapping around."""
    docs = [d.strip() for d in text.split("\n\n") if len(d.strip()) > 200]
    if not docs:
        raise ValueError("the corpus holds no documents of prose")
    rng = np.random.default_rng(seed)
    start = int(rng.integers(len(docs)))
    out: list[int] = []
    i = start
    while len(out) < n:
        out += _ids(tokenizer, ("\n\n" if out else "") + docs[i % len(docs)])
        i += 1
        if i - start > len(docs):
            out = out * (n // max(len(out), 1) + 1)
    return out[:n]


def sentence_starts(tokenizer, body: list[int]) -> np.ndarray:
    """Offsets in body where a sentence starts: right after a token that ends with . ! ? or a newline."""
    pieces = tokenizer.convert_ids_to_tokens(body)
    ends = [i + 1 for i, p in enumerate(pieces) if p.rstrip().endswith((".", "!", "?")) or p.endswith(("\n", "Ċ"))]
    return np.asarray([0] + ends, np.int64)


def _snap(starts: np.ndarray, at: int) -> int:
    return int(starts[np.argmin(np.abs(starts - at))])


def niah(tokenizer, frame: PromptFrame, corpus: str, length: int, seed: int, n_keys: int = 4) -> Sample:
    """RULER multi-key NIAH: `n_keys` key-to-number sentences at random depths in prose, the prompt
    asking for one of them (the others are distractors); exactly `length` tokens."""
    rng = np.random.default_rng([seed, length])
    keys = [str(k) for k in rng.choice(NIAH_KEYS, n_keys, replace=False)]
    values = [str(v) for v in rng.integers(1_000_000, 10_000_000, n_keys)]
    asked = int(rng.integers(n_keys))
    needles = [_ids(tokenizer, f" One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys, values,
                                                                                                         strict=True)]
    asking = f"What is the special magic number for {keys[asked]} mentioned in the provided text?"
    task, question = _ids(tokenizer, NIAH_TASK + asking + "\n"), _ids(tokenizer, "\n" + asking)
    room = length - len(frame.before) - len(task) - sum(map(len, needles)) - len(question) - len(frame.after)
    if room < 64:
        raise ValueError(f"a niah prompt of {length} tokens leaves no room for text")
    body = prose_tokens(tokenizer, corpus, room, int(rng.integers(2**31)))
    starts = sentence_starts(tokenizer, body)
    depths = np.sort(rng.uniform(0, 1, n_keys))
    rng.shuffle(depths)
    at = [_snap(starts, round(d * room)) for d in depths]
    tokens, spans = _assemble(frame, task, body, list(zip(at, needles, strict=True)), question, [])
    return Sample(tokens, values[asked], spans[asked], at[asked] / room, length, keys[asked])


@dataclass
class SessionDocument:
    """A document with planted facts, and one question per fact, for a multi-turn session."""

    text: str  # the document
    facts: list[str]  # the planted sentences, in the order of the questions
    offsets: list[int]  # where each fact starts in `text`
    questions: list[str]
    answers: list[str]
    depths: list[float] = field(default_factory=list)

    def turn(self, i: int) -> str:
        """The user's message of turn i: the document and the first question, then a question each."""
        question = f"Question: {self.questions[i]} Answer with the room number."
        return SESSION_TASK + self.text + "\n\n" + question if i == 0 else question


def session_document(tokenizer, corpus: str, n_tokens: int, n_facts: int, seed: int) -> SessionDocument:
    """About n_tokens of prose with n_facts facts ("The <item> is kept in room <n>.") at depths spread
    evenly from 10% to 90%; the questions ask for them in a shuffled order."""
    rng = np.random.default_rng([seed, n_tokens])
    body = prose_tokens(tokenizer, corpus, n_tokens, int(rng.integers(2**31)))
    starts = sentence_starts(tokenizer, body)
    items = [str(x) for x in rng.choice(SESSION_ITEMS, n_facts, replace=False)]
    rooms = [str(r) for r in rng.choice(np.arange(100, 1000), n_facts, replace=False)]
    depths = np.linspace(0.1, 0.9, n_facts)
    cuts = [_snap(starts, round(d * len(body))) for d in depths]
    facts, offsets, text = [], [], ""
    done = 0
    for cut, item, room in zip(cuts, items, rooms, strict=True):
        text += tokenizer.decode(body[done:cut])
        fact = f" The {item} is kept in room {room}."
        offsets.append(len(text))
        facts.append(fact)
        text += fact
        done = cut
    text += tokenizer.decode(body[done:])
    order = rng.permutation(n_facts)
    return SessionDocument(text, [facts[i] for i in order], [offsets[i] for i in order],
                           [f"In which room is the {items[i]} kept?" for i in order], [rooms[i] for i in order],
                           [float(depths[i]) for i in order])


# Single-turn questions about a pasted document (the default server's check): facts of several
# kinds, each planted in real prose and asked about in the same message, as a user pastes a memo.
DOC_FACTS = (
    ("The meeting with the {a} delegation is scheduled for {b}.", ("On which day is the meeting with the {a} "
     "delegation scheduled?"), ("Harlow", "Brennan", "Okafor", "Lindqvist", "Moreau", "Tanaka"),
     ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")),
    ("The access code for the {a} is {b}.", "What is the access code for the {a}?",
     ("north warehouse", "server room", "east gate", "archive", "loading dock", "roof terrace"), None),
    ("The {a} was delivered by a courier named {b}.", "What was the name of the courier who delivered the {a}?",
     ("blue crate", "piano", "box of letters", "new printer", "glass vase", "bicycle"),
     ("Marta", "Hugo", "Ingrid", "Tobias", "Leila", "Ravi")),
    ("The {a} team's budget for next year is {b} thousand dollars.", ("How many thousand dollars is the {a} "
     "team's budget for next year?"), ("design", "research", "sales", "support", "legal", "marketing"), None),
    ("The dog that guards the {a} is called {b}.", "What is the dog that guards the {a} called?",
     ("orchard", "boathouse", "old mill", "vineyard", "stables", "library"),
     ("Biscuit", "Pepper", "Rufus", "Juniper", "Maple", "Otis")),
)
DOC_TASK = "Here is a document.\n\n"


@dataclass
class DocQuestion:
    """One single-turn question about a pasted document: `message` is the whole user message."""

    message: str
    question: str
    answer: str
    doc_tokens: int
    depth: float

    def correct(self, reply: str) -> bool:
        """Whether the reply states the answer (as a whole word, any case)."""
        import re

        return re.search(rf"\b{re.escape(self.answer)}\b", reply, re.IGNORECASE) is not None


def doc_questions(tokenizer, corpus: str, n_docs: int, seed: int, min_tokens: int = 500, max_tokens: int = 1500,
                  facts_per_doc: int = 2) -> list[DocQuestion]:
    """`n_docs` documents of min..max tokens of prose with `facts_per_doc` facts of different kinds at
    random depths, and one single-turn question per fact (the document, then the question)."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for _ in range(n_docs):
        n_tokens = int(rng.integers(min_tokens, max_tokens + 1))
        body = prose_tokens(tokenizer, corpus, n_tokens, int(rng.integers(2**31)))
        starts = sentence_starts(tokenizer, body)
        kinds = rng.choice(len(DOC_FACTS), facts_per_doc, replace=False)
        depths = np.sort(rng.uniform(0.05, 0.95, facts_per_doc))
        planted = []
        for kind in kinds:
            fact, question, subjects, values = DOC_FACTS[kind]
            a = str(rng.choice(subjects))
            b = str(rng.choice(values)) if values else str(rng.integers(100, 10_000))
            planted.append((" " + fact.format(a=a, b=b), question.format(a=a), b))
        text, done = "", 0
        for depth, (fact, _, _) in zip(depths, planted, strict=True):
            cut = _snap(starts, round(depth * len(body)))
            text += tokenizer.decode(body[done:cut]) + fact
            done = cut
        text += tokenizer.decode(body[done:])
        for depth, (_, question, answer) in zip(depths, planted, strict=True):
            out.append(DocQuestion(DOC_TASK + text.strip() + "\n\n" + question, question, answer, n_tokens,
                                   float(depth)))
    return out
