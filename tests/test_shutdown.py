"""A real `toyllm serve` process: SIGTERM drains (streams in flight finish or end with an error
event, the process exits 0), and a checkpoint that fails to load makes the process exit non-zero."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from server_utils import live_server, parse_sse

ROOT = Path(__file__).resolve().parents[1]


def _stream(url: str, body: dict, out: dict, first: threading.Event) -> None:
    text = []
    try:
        with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                text.append(line)
                if line.startswith("event: token"):
                    first.set()
    except httpx.HTTPError as e:  # cut without a last event
        out["cut"] = repr(e)
    first.set()
    out["events"] = parse_sse("\n".join(text))


def test_sigterm_drains_then_exits_zero(tmp_path):
    # One decode slot per cache class (TOYLLM_DECODE_STATE_BYTES=1): the snapkv class runs one long
    # stream while two more wait behind it, so the work that must outlast the drain (3 x 2048 tokens)
    # is thirty times the work that must finish within it (200 tokens), however fast the machine.
    env = {"TOYLLM_PRESET": "tiny", "TOYLLM_DTYPE": "float32", "TOYLLM_WARMUP": "false", "TOYLLM_DRAIN_S": "2",
           "TOYLLM_CACHE_BUDGET": "32", "TOYLLM_CACHE_WINDOW_SIZE": "8", "TOYLLM_CACHE_SLACK": "8",
           "TOYLLM_MAX_CONCURRENT_REQUESTS": "8", "TOYLLM_DECODE_STATE_BYTES": "1",
           "TOYLLM_SESSION_DIR": str(tmp_path / "sessions")}
    log = tmp_path / "server.log"
    with live_server(env, log) as url:
        proc = live_server.process
        # Compile what the streams use first (this server has no warm-up), so that the drain's
        # seconds go to decoding rather than compiling.
        for policy in ("full", "snapkv"):
            httpx.post(url + "/generate", json={"prompt": "warm", "max_new_tokens": 24, "stream": False,
                                                "cache": {"policy": policy}}, timeout=120)
        short, longs = {}, [{}, {}, {}]
        # 200 tokens (within the smallest attention span, so nothing compiles meanwhile), and three
        # long ones (slowed further by the top-20 alternatives they ask for at every step).
        long_body = {"prompt": "A long one", "max_new_tokens": 2048, "ignore_eos": True, "top_logprobs": 20,
                     "cache": {"policy": "snapkv"}}
        short_body = {"prompt": "A short one", "max_new_tokens": 200, "ignore_eos": True,
                      "cache": {"policy": "full"}}
        jobs = [(long_body, out) for out in longs] + [(short_body, short)]
        started = [threading.Event() for _ in jobs]
        threads = [threading.Thread(target=_stream, args=(url, body, out, ev))
                   for (body, out), ev in zip(jobs, started, strict=True)]
        threads[0].start()  # the long one that holds the slot
        assert started[0].wait(60)
        for t in threads[1:]:
            t.start()
        assert started[-1].wait(60)  # the short one is decoding too
        time.sleep(0.2)  # the two waiting ones are in the queue
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(url + "/ready").status_code == 503
        refused = httpx.post(url + "/generate", json={"prompt": "late", "max_new_tokens": 2})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        for t in threads:
            t.join(60)
        code = proc.wait(30)
        took = time.time() - signalled
    assert code == 0, log.read_text()[-2000:]
    assert "cut" not in short and short["events"][-1][0] == "done"
    assert len([e for e, _ in short["events"] if e == "token"]) == 200
    # The running one and the two still waiting all end with the error event, none is cut.
    for long_ in longs:
        assert "cut" not in long_ and long_["status"] == 200 and long_["events"][-1][0] == "error"
        assert "shutting down" in long_["events"][-1][1]["error"]["message"]
    assert 2 <= took < 15
    assert "ASGI callable returned without completing response" not in log.read_text()
    # Every finished turn was written before the process exited (the two warm-ups and the short
    # stream, finished during the drain; the long ones were cut, and their sessions with them).
    assert len(list((tmp_path / "sessions").glob("*.session"))) == 3


def test_a_checkpoint_that_fails_to_load_exits_nonzero(tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(ROOT / "weights" / "toyllm-base", bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte: the checksum no longer matches
    weights.write_bytes(bytes(data))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--checkpoint", str(bad), "--port", str(port)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot start:") and "model.safetensors" in last, proc.stderr[-2000:]
