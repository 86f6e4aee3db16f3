"""Graceful shutdown under load: SIGTERM to a server with streams in flight.

    python benchmarks/sigterm.py --drain-s 10 --json out/sigterm.json                  # the default checkpoint
    python benchmarks/sigterm.py --preset tiny --drain-s 2 --env TOYLLM_WARMUP=false   # a quick check

Starts `python -m server.cli serve` on a free port (--checkpoint or --preset; TOYLLM_DRAIN_S from
--drain-s; --env KEY=VALUE passes more settings; the rest of this environment carries over) and
waits for /ready. Then it opens --long streaming /generate requests (ignore_eos, --long-tokens
each: meant to outlast the drain) and, once each has a token, --short ones (--short-tokens each:
meant to finish within it). Once every stream has received a token it sends SIGTERM to the server
and meanwhile checks that /ready answers 503 and that a new /generate gets 503 during the drain,
then waits for every stream and for the process to exit.

A stream ends with `event: done`, with `event: error` saying the server is shutting down, or is cut
without a final event (a connection error or an incomplete read). The report counts them, gives
the seconds from the signal to the exit, the exit code, and whether the server log has "ASGI
callable returned without completing response". Exit status 0 when no stream was cut and the server
exited 0; 1 otherwise; 2 when the server could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import httpx

from toyllm_core.machine import cpu_model, machine

ROOT = Path(__file__).resolve().parents[1]
ASGI_INCOMPLETE = "ASGI callable returned without completing response"
PROMPTS = ["The history of the old harbour town begins with", "In the spring the farmers of the valley",
           "The library near the station opened its doors", "A small boat carried letters to the island",
           "When the train was late again, the passengers", "The orchestra tuned their instruments while",
           "Scientists measured the temperature of the sea", "The baker starts work at four in the morning"]


class BenchError(Exception):
    """The server could not be started or reached: one line, exit status 2."""


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stream:
    name: str  # short-0, long-3, ...
    max_new_tokens: int
    status: int | None = None
    tokens: int = 0
    tokens_at_signal: int | None = None
    final: str | None = None  # done | error | None (cut)
    error_message: str | None = None
    cut: str | None = None  # the exception, or "incomplete" when the body ended without a final event
    finish_reason: str | None = None
    ended_after_signal_s: float | None = None  # negative: before it
    first_token: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def outcome(self) -> str:
        if self.final == "done":
            return "done"
        if self.final == "error":
            return "shutting_down" if "shutting down" in (self.error_message or "") else "other_error"
        if self.status is not None and self.status != 200:
            return "refused"
        return "cut"

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "first_token"}
        d["outcome"] = self.outcome
        return d


async def run_stream(client: httpx.AsyncClient, s: Stream, body: dict, signalled: dict) -> None:
    event = None
    try:
        async with client.stream("POST", "/generate", json=body) as r:
            s.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                s.error_message = r.text[:300]
                return
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "token":
                        s.tokens += 1
                        s.first_token.set()
                    elif event == "done":
                        s.final = "done"
                        try:
                            s.finish_reason = json.loads(line[5:]).get("finish_reason")
                        except ValueError:
                            pass
                    elif event == "error":
                        s.final = "error"
                        try:
                            s.error_message = json.loads(line[5:])["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            s.error_message = line[5:].strip()[:300]
            if s.final is None:
                s.cut = "incomplete: the body ended without a final event"
    except httpx.HTTPError as e:
        s.cut = describe(e)
    finally:
        s.first_token.set()  # never leave the signal side waiting
        if signalled.get("at") is not None:
            s.ended_after_signal_s = time.perf_counter() - signalled["at"]


async def watch_drain(client: httpx.AsyncClient, signalled: dict, out: dict, until_s: float) -> None:
    """After the signal: poll /ready until it answers 503 (or the server is gone), then send a new
    /generate, which should get 503 too."""
    start = signalled["at"]
    statuses = []
    while time.perf_counter() - start < until_s:
        try:
            r = await client.get("/ready", timeout=5)
            statuses.append(r.status_code)
            if r.status_code == 503:
                out["ready_503_after_s"] = time.perf_counter() - start
                break
        except httpx.HTTPError as e:
            statuses.append(type(e).__name__)
            break
        await asyncio.sleep(0.05)
    out["ready_statuses"] = statuses
    out["ready_503"] = 503 in statuses
    try:
        late = {"prompt": "A late request", "max_new_tokens": 4, "stream": False}
        r = await client.post("/generate", json=late, timeout=30)
        out["new_generate_status"] = r.status_code
        out["new_generate_body"] = r.text[:300]
        out["new_generate_after_s"] = time.perf_counter() - start
    except httpx.HTTPError as e:
        out["new_generate_status"] = None
        out["new_generate_body"] = describe(e)
    out["new_generate_503"] = out["new_generate_status"] == 503


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen, timeout_s: float, log: Path) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with {proc.returncode} before it was ready; log {log}:\n"
                             + tail(log, 15))
        try:
            if (await client.get("/ready", timeout=5)).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise BenchError(f"the server was not ready after {timeout_s:.0f} s; log {log}:\n" + tail(log, 15))


def tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_server(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as log_file:
        # A session of its own: a Ctrl-C here does not reach it (it is stopped in `run`).
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)


async def run(args, log: Path) -> dict:
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOYLLM_DRAIN_S": str(args.drain_s)}
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    cmd = [args.python, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.preset:
        cmd += ["--preset", args.preset]
    if args.checkpoint:
        cmd += ["--checkpoint", str(args.checkpoint)]
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    proc = start_server(cmd, env, log)
    try:
        return await measure(args, url, proc, log, cmd, started_at, load_start)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def measure(args, url: str, proc: subprocess.Popen, log: Path, cmd: list[str], started_at: str,
                  load_start) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        ready_s = await wait_ready(client, proc, args.ready_timeout, log)
        print(f"sigterm: server pid {proc.pid} ready in {ready_s:.1f} s on {url}", flush=True)
        signalled: dict = {"at": None}
        longs = [Stream(f"long-{i}", args.long_tokens) for i in range(args.long)]
        shorts = [Stream(f"short-{i}", args.short_tokens) for i in range(args.short)]
        tasks = []

        def start(s: Stream, i: int) -> None:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": s.max_new_tokens, "ignore_eos": True,
                    "temperature": 0.7, "seed": i, "stream": True}
            tasks.append(asyncio.create_task(run_stream(client, s, body, signalled)))

        # The long ones first, then the short ones, so that the short ones are still running at the signal.
        for i, s in enumerate(longs):
            start(s, i)
        await wait_first_tokens(longs, args.first_token_timeout)
        for i, s in enumerate(shorts):
            start(s, len(longs) + i)
        await wait_first_tokens(shorts, args.first_token_timeout)
        streams = longs + shorts
        for s in streams:
            s.tokens_at_signal = s.tokens
        before_signal = [s.name for s in streams if s.final is not None or s.cut is not None or s.status != 200]
        signalled["at"] = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        drain: dict = {}
        watcher = asyncio.create_task(watch_drain(client, signalled, drain, max(args.drain_s, 1.0)))
        exit_wait = asyncio.create_task(asyncio.to_thread(wait_exit, proc, args.drain_s + args.exit_timeout))
        await asyncio.gather(*tasks, watcher)
        code, exit_s = await exit_wait
    killed = code is None
    if killed:
        proc.kill()
        code = proc.wait()
    load_end = os.getloadavg()
    text = log.read_text(errors="replace")
    outcomes = {k: sum(1 for s in streams if s.outcome == k)
                for k in ("done", "shutting_down", "other_error", "refused", "cut")}
    return {
        "command": cmd, "drain_s": args.drain_s, "env": args.env, "started_at": started_at,
        "ended_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(), "loadavg_start": list(load_start), "loadavg_end": list(load_end),
        "machine": machine(), "ready_s": ready_s,
        "params": {"short": args.short, "short_tokens": args.short_tokens, "long": args.long,
                   "long_tokens": args.long_tokens},
        "outcomes": outcomes,
        "short_outcomes": {s.name: s.outcome for s in shorts},
        "long_outcomes": {s.name: s.outcome for s in longs},
        "ended_before_signal": before_signal,
        "drain_checks": drain,
        "signal_to_exit_s": exit_s, "exit_code": code, "killed_after_timeout": killed,
        "log": str(log), "asgi_incomplete_in_log": ASGI_INCOMPLETE in text,
        "log_errors": [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line][:20],
        "log_tail": text.splitlines()[-25:],
        "streams": [s.to_json() for s in streams],
    }


async def wait_first_tokens(streams: list[Stream], timeout_s: float) -> None:
    try:
        await asyncio.wait_for(asyncio.gather(*(s.first_token.wait() for s in streams)), timeout_s)
    except TimeoutError:
        raise BenchError(f"not every stream had a token after {timeout_s:.0f} s: "
                         + ", ".join(f"{s.name} {s.tokens}" for s in streams)) from None


def wait_exit(proc: subprocess.Popen, timeout_s: float) -> tuple[int | None, float | None]:
    start = time.perf_counter()
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None, None
    return code, time.perf_counter() - start


def failures(r: dict) -> list[str]:
    out = []
    if r["outcomes"]["cut"]:
        out.append(f"{r['outcomes']['cut']} streams cut without a final event")
    if r["exit_code"] != 0:
        killed = " (killed: it did not exit in time)" if r["killed_after_timeout"] else ""
        out.append(f"exit code {r['exit_code']}{killed}")
    return out


def report(r: dict) -> str:
    d = r["drain_checks"]
    o = r["outcomes"]

    def secs(v):
        return "-" if v is None else f"{v:.2f} s"

    def line_of(s: dict) -> str:
        return (f"{s['name']}: {s['outcome']} ({s['tokens_at_signal']} -> {s['tokens']}/{s['max_new_tokens']} "
                f"tokens, {secs(s['ended_after_signal_s'])})")

    extra = (f", {o['other_error']} other errors" if o["other_error"] else "") + \
        (f", {o['refused']} refused" if o["refused"] else "")
    killed = " (killed after the timeout)" if r["killed_after_timeout"] else ""
    asgi = "yes" if r["asgi_incomplete_in_log"] else "no"
    lines = [f"streams: {o['done']} done, {o['shutting_down']} ended 'shutting down', {o['cut']} cut{extra}"]
    lines += [f"  {line_of(s)}" for s in r["streams"]]
    lines += [
        (f"during the drain: /ready {d.get('ready_statuses')} (503 after {secs(d.get('ready_503_after_s'))}), "
         f"new /generate {d.get('new_generate_status')}"),
        (f"signal -> exit {secs(r['signal_to_exit_s'])} (drain {r['drain_s']} s), exit code "
         f"{r['exit_code']}{killed}"),
        f"'{ASGI_INCOMPLETE}' in the log: {asgi}; {len(r['log_errors'])} ERROR/Traceback lines",
        f"cpu {r['cpu_model']}; load {r['loadavg_start']} -> {r['loadavg_end']}; server log {r['log']}",
    ]
    if r["ended_before_signal"]:
        lines.append(f"note: ended before the signal: {', '.join(r['ended_before_signal'])}")
    short_ok = all(v == "done" for v in r["short_outcomes"].values())
    long_outlasted = all(v == "shutting_down" for v in r["long_outcomes"].values())
    if not short_ok:
        lines.append("note: not every short stream finished within the drain (lower --short-tokens or raise "
                     "--drain-s)")
    if not long_outlasted:
        lines.append("note: not every long stream outlasted the drain (raise --long-tokens or lower --drain-s)")
    for e in r["log_errors"][:5]:
        lines.append(f"log: {e}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="Checkpoint directory [default: the server's].")
    p.add_argument("--preset", help="Random weights of a preset instead (e.g. tiny: a quick check).")
    p.add_argument("--drain-s", type=float, default=10.0, help="TOYLLM_DRAIN_S.")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="A setting for the server (repeatable), e.g. TOYLLM_WARMUP=false.")
    p.add_argument("--port", type=int, default=0, help="[default: a free port]")
    p.add_argument("--short", type=int, default=4, help="Streams meant to finish within the drain.")
    p.add_argument("--short-tokens", type=int, default=64)
    p.add_argument("--long", type=int, default=4, help="Streams meant to outlast the drain.")
    p.add_argument("--long-tokens", type=int, default=2048)
    p.add_argument("--api-key", default=os.environ.get("TOYLLM_API_KEY") or None)
    p.add_argument("--ready-timeout", type=float, default=900.0, help="Seconds for load and warm-up.")
    p.add_argument("--first-token-timeout", type=float, default=300.0)
    p.add_argument("--exit-timeout", type=float, default=60.0, help="Seconds past the drain before the "
                   "server is killed.")
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    p.add_argument("--python", default=sys.executable, help="The interpreter that runs the server.")
    p.add_argument("--log", type=Path, help="The server's log [default: beside --json, else a temporary file].")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.short < 0 or args.long < 0 or args.short + args.long == 0:
        p.error("--short and --long must not be negative, nor both 0")
    if any("=" not in item for item in args.env):
        p.error("--env takes KEY=VALUE")
    log = args.log or (args.json.with_suffix(".server.log") if args.json else
                       Path(tempfile.mkstemp(prefix="sigterm-", suffix=".log")[1]))
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(run(args, log))
    except BenchError as e:
        print(f"sigterm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    failed = failures(result)
    result["passed"] = not failed
    result["failures"] = failed
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    print("PASS" if not failed else "FAIL: " + "; ".join(failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
