"""A session as bytes: what a session store writes and reads back (never pickle).

A blob is `MAGIC`, the SHA-256 of the rest, and a safetensors file: the session's arrays (its parked
hot tier, with the signals its policy records, and its cold tier) as tensors, and everything else
(tokens, pending token, chat messages, counters, the cache class's name, the format version) as
JSON in the safetensors metadata. A blob that does not verify (truncated, corrupted, another
version, a class this server does not serve) raises `BlobError` and yields nothing: a session is
loaded whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import struct

import ml_dtypes
import numpy as np
import safetensors.numpy

from .engine import CacheClass
from .parking import ParkedRow
from .session import Session
from .tiers import ColdTier

MAGIC = b"TOYLLM-SESSION\n"
VERSION = 1
_DIGEST = 32
_COUNTERS = ("length", "turns", "compressions", "tokens_evicted", "reselections", "tokens_recalled", "cold_dropped",
             "reply_start", "pending")


class BlobError(ValueError):
    """A session blob that cannot be loaded (the message says why)."""


def dumps(session: Session, extra: dict | None = None) -> bytes:
    """The session (between turns: its tiers parked) as a blob; `extra` is JSON kept alongside (the
    server's id, times and owner)."""
    tensors: dict[str, np.ndarray] = {}
    meta = {"format": "toyllm-session", "version": VERSION, "class": session.cls.name,
            "tokens": list(map(int, session.tokens)), "chat": session.chat,
            **{k: _plain(getattr(session, k)) for k in _COUNTERS}, "extra": extra or {}}
    hot = session.cache
    if hot is not None:
        meta["hot"] = {"stored": str(hot.stored) if hot.stored != ml_dtypes.bfloat16 else "bfloat16", "bits": hot.bits,
                       "rope_theta": hot.rope_theta, "signals": [s.name for s in hot.signals]}
        for name in ("k", "v", "pos", "length", "next_pos", "k_scale", "v_scale"):
            a = getattr(hot, name)
            if a is not None:
                tensors[f"hot.{name}"] = a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a
        for s in hot.signals:
            for field in s.leaves:
                tensors[f"hot.signal.{s.name}.{field}"] = getattr(s, field)
    cold = session.cold
    if cold is not None:
        meta["cold"] = {"bits": cold.bits, "head_dim": cold.head_dim}
        for name in ("k", "k_scale", "v", "v_scale", "pos"):
            tensors[f"cold.{name}"] = getattr(cold, name)
    payload = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                     metadata={"toyllm": json.dumps(meta)})
    return MAGIC + hashlib.sha256(payload).digest() + payload


def _plain(v):
    """A counter as JSON takes it (NumPy scalars as Python numbers)."""
    return v.item() if isinstance(v, np.generic) else v


def loads(data: bytes, classes: list[CacheClass]) -> tuple[dict, dict]:
    """A blob -> (the keyword arguments of a `Session`, the blob's `extra`). Raises BlobError."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _DIGEST + 8:
        raise BlobError("not a session blob (or cut short)")
    digest, payload = data[len(MAGIC) : len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST :]
    if hashlib.sha256(payload).digest() != digest:
        raise BlobError("the session blob does not match its checksum (truncated or corrupted)")
    try:
        (header_len,) = struct.unpack("<Q", payload[:8])
        meta = json.loads(json.loads(payload[8 : 8 + header_len])["__metadata__"]["toyllm"])
        tensors = safetensors.numpy.load(payload)
    except (ValueError, KeyError, struct.error, json.JSONDecodeError) as e:
        raise BlobError(f"the session blob does not parse: {e}") from None
    if meta.get("format") != "toyllm-session" or meta.get("version") != VERSION:
        raise BlobError(f"session blob format {meta.get('format')!r} version {meta.get('version')!r}; this "
                        f"server reads version {VERSION}")
    by_name = {c.name: c for c in classes}
    cls = by_name.get(meta["class"])
    if cls is None:
        raise BlobError(f"the session's cache class {meta['class']!r} is not served here")
    try:
        fields = {"cls": cls, "tokens": meta["tokens"], "chat": meta["chat"], **{k: meta[k] for k in _COUNTERS},
                  "cache": _hot(meta["hot"], tensors, cls) if "hot" in meta else None,
                  "cold": _cold(meta["cold"], tensors) if "cold" in meta else None}
    except (KeyError, TypeError, ValueError) as e:
        raise BlobError(f"the session blob is incomplete: {e}") from None
    return fields, meta["extra"]


def _hot(meta: dict, tensors: dict, cls: CacheClass) -> ParkedRow:
    stored = ml_dtypes.bfloat16 if meta["stored"] == "bfloat16" else np.dtype(meta["stored"])
    get = lambda name: tensors.get(f"hot.{name}")
    k, v = get("k"), get("v")
    if stored == ml_dtypes.bfloat16 and not meta["bits"]:
        k, v = k.view(stored), v.view(stored)
    kinds = {w.signal.name: w.signal for w in cls.policy.signals}
    signals = []
    for name in meta["signals"]:
        kind = kinds[name]
        signals.append(kind(**{f: tensors[f"hot.signal.{name}.{f}"] for f in kind.leaves}))
    return ParkedRow(k=k, v=v, pos=get("pos"), length=get("length"), next_pos=get("next_pos"), signals=tuple(signals),
                     rope_theta=meta["rope_theta"], stored=np.dtype(stored), bits=meta["bits"], k_scale=get("k_scale"),
                     v_scale=get("v_scale"))


def _cold(meta: dict, tensors: dict) -> ColdTier:
    return ColdTier(meta["bits"], meta["head_dim"], *(tensors[f"cold.{n}"] for n in ("k", "k_scale", "v", "v_scale",
                                                                                      "pos")))
