"""What the routes share: the loaded model, the engine, the session store, metrics and settings."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from toyllm_core.chat import ChatTemplate
from toyllm_core.serving.engine import CacheClass
from toyllm_core.serving.policies import Policy, policy_names

from .engine import Engine
from .metrics import Metrics
from .pressure import PressureRelief
from .sessions import SessionStore
from .settings import Settings


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    model_name: str = ""
    checkpoint_sha256: str = ""
    model: object = None
    tokenizer: object = None
    chat: ChatTemplate | None = None  # None: the model has no chat template, /v1/chat/completions refuses
    end_of_turn: int | None = None  # the token chat generation stops at
    engine: Engine | None = None
    pressure: PressureRelief | None = None
    store: SessionStore | None = None
    default_policy: Policy | None = None
    classes: list[CacheClass] = field(default_factory=list)  # warmed: the only ones requests may use
    ready: bool = False
    shutting_down: bool = False
    load_error: str | None = None
    info: dict = field(default_factory=dict)
    token_texts: dict[int, str] = field(default_factory=dict)  # id -> text, decoded once
    in_flight: int = 0  # HTTP requests being answered (a shutdown waits for them)
    drain_now: threading.Event = field(default_factory=threading.Event)  # cut the drain short
    request_exit: Callable[[], None] | None = None  # set by the CLI's server: stop it (start-up failed)

    @property
    def policies(self) -> list[Policy]:
        return list(dict.fromkeys(c.policy for c in self.classes))

    def classes_of(self, policy: Policy) -> list[CacheClass]:
        """The classes serving a policy (several for the full cache, by token limit), smallest first."""
        return sorted((c for c in self.classes if c.policy == policy), key=lambda c: c.capacity)

    def engine_has_room(self) -> bool:
        return self.engine is not None and self.engine.has_room()

    def live(self) -> dict:
        """Live-state gauges (read at scrape time)."""
        snap = self.store.snapshot() if self.store else {"sessions": 0, "cache_bytes": {}, "idle_capacity_bytes": 0,
                                                         "tier_bytes": {"hot": 0, "cold": 0}}
        engine = self.engine
        return {
            "cache_bytes": {p: snap["cache_bytes"].get(p, (0, 0)) for p in policy_names()},
            "tier_bytes": snap["tier_bytes"],
            "capacity_bytes": snap["idle_capacity_bytes"] + (engine.capacity_bytes() if engine else 0),
            "sessions": snap["sessions"],
            "running": engine.running if engine else 0,
            "waiting": engine.waiting if engine else 0,
            "model": {"name": self.model_name, "checkpoint_sha256": self.checkpoint_sha256[:16],
                      **{k: str(v) for k, v in self.info.get("model", {}).items()}},
        }
