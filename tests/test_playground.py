"""The playground in a real browser: Playwright from PyPI driving Debian's Chromium against a live
server on the tiny model with a chat template. A message gets a streamed reply, the conversation's
tokens are shaded by what the cache keeps and the shading changes once a long message is
compressed, the cache class switches, and side by side two sessions answer the same message. No
console error, no failed request, no request outside the server. Screenshots of each state go to
out/playground/ (make test-ui)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from server_utils import live_server
from test_chat import TEST_TEMPLATE

pytestmark = pytest.mark.ui

OUT = Path(__file__).resolve().parents[1] / "out" / "playground"
BUDGET = 40  # the default class keeps 40 tokens hot: a long message is compressed


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    template = tmp_path_factory.mktemp("chat") / "template.jinja"
    template.write_text(TEST_TEMPLATE)
    env = {"TOYLLM_PRESET": "tiny", "TOYLLM_WARMUP": "false", "TOYLLM_DTYPE": "float32",
           "TOYLLM_CHAT_TEMPLATE": str(template), "TOYLLM_CACHE_BUDGET": str(BUDGET),
           "TOYLLM_CACHE_WINDOW_SIZE": "8", "TOYLLM_CACHE_CLASSES": '["full"]', "TOYLLM_COMPILE_CACHE_DIR": ""}
    with live_server(env, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (make test-ui installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


class Watch:
    """What the page did that it should not: console errors, failed requests, requests elsewhere."""

    def __init__(self, page, origin: str):
        self.page = page
        self.errors, self.foreign, self.aborted_streams = [], [], 0
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("requestfailed", self._failed)
        page.on("response", lambda r: self.errors.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
        page.on("request", lambda r: None if r.url.startswith(origin) else self.foreign.append(r.url))

    def _failed(self, request) -> None:
        # Chromium reports a streamed fetch with Cache-Control: no-store as ERR_ABORTED even when the
        # page read it to its end (microsoft/playwright#42742). Counted here; `check` allows as many
        # as the streams the page saw end with [DONE].
        if request.url.endswith("/v1/chat/completions") and request.failure == "net::ERR_ABORTED":
            self.aborted_streams += 1
        else:
            self.errors.append(f"failed: {request.url} {request.failure}")

    def check(self):
        assert not self.errors, "\n".join(self.errors)
        done = int(self.page.evaluate("document.body.dataset.streamsDone || 0"))
        assert self.aborted_streams <= done, (self.aborted_streams, done)
        assert not self.foreign, self.foreign


def _send(page, text: str) -> float:
    """Send a message; wait until every pane shows the finished turn -> per pane, milliseconds from
    its reply's end to its views refreshed."""
    turns = [int(p.get_attribute("data-turns") or 0) for p in page.query_selector_all(".pane")]
    page.fill("#message", text)
    page.click("#send")
    page.wait_for_function("[...document.querySelectorAll('.reply')].some(r => !r.hidden && r.textContent)")
    for i, before in enumerate(turns):
        page.wait_for_function(f"Number(document.querySelectorAll('.pane')[{i}].dataset.turns || 0) > {before}",
                               timeout=60_000)
    page.wait_for_function("!document.querySelector('#send').disabled")
    # Milliseconds from each pane's reply ending to its views refreshed (the goal: within a second).
    return page.eval_on_selector_all(".pane", "ps => ps.map(p => Number(p.dataset.refreshMs))")


def _shading(page, pane: int = 0) -> list[tuple[float, float]]:
    return page.eval_on_selector_all(f".pane:nth-child({pane + 1}) .conversation .tok",
                                     "spans => spans.map(s => [Number(s.dataset.hot), Number(s.dataset.cold)])")


def test_chat_with_a_session_and_watch_what_its_cache_keeps(url, browser):
    OUT.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    watch = Watch(page, url)
    page.goto(url + "/playground/")
    page.wait_for_selector("body[data-ready=true]")
    page.screenshot(path=OUT / "0-empty.png")
    page.fill("#max-tokens", "8")  # short replies: the first turn stays under the budget
    timings = {}

    timings["short"] = _send(page, "Hello there, who are you?")
    reply = page.eval_on_selector(".pane .conversation", "e => e.textContent")
    assert "assistant:" in reply and "Hello there" in reply
    short = _shading(page)
    assert short and all(hot == 1.0 and cold == 0.0 for hot, cold in short)  # under the budget: all kept
    page.screenshot(path=OUT / "1-first-turn.png")

    words = ["the", "river", "and", "the", "music", "of", "the", "hills", "under", "a", "long", "road"]
    timings["long"] = _send(page, " ".join(words[i % len(words)] for i in range(120)))
    long = _shading(page)
    assert len(long) > len(short) + 100
    assert any(hot < 1.0 for hot, _ in long) and any(cold > 0 for _, cold in long)  # compressed: some went cold
    assert "compressions" in page.inner_text(".pane .memory") and " 0 compressions" not in page.inner_text(".pane .memory")
    assert int(page.get_attribute(".retention-map", "data-columns")) == len(long)
    page.screenshot(path=OUT / "2-compressed.png", full_page=True)

    page.select_option("#class-a", label=next(o for o in page.eval_on_selector_all(
        "#class-a option", "os => os.map(o => o.textContent)") if o.startswith("full")))
    assert page.inner_text(".pane h2").startswith("full")
    timings["full"] = _send(page, "A new session under the full cache.")
    assert all(hot == 1.0 for hot, _ in _shading(page))
    page.screenshot(path=OUT / "3-full-cache.png")

    page.check("#compare")
    page.select_option("#class-b", index=0)  # the default class (snapkv) beside the full cache
    assert len(page.query_selector_all(".pane")) == 2
    timings["side_by_side"] = _send(page, " ".join(words[i % len(words)] for i in range(90)))
    policies = page.eval_on_selector_all(".pane", "ps => ps.map(p => p.dataset.policy)")
    assert sorted(policies) == ["full", "snapkv"]
    full_pane = policies.index("full")
    assert all(hot == 1.0 for hot, _ in _shading(page, full_pane))
    assert any(hot < 1.0 for hot, _ in _shading(page, 1 - full_pane))
    page.screenshot(path=OUT / "4-side-by-side.png", full_page=True)
    watch.check()

    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone_watch = Watch(phone, url)
    phone.goto(url + "/playground/")
    phone.wait_for_selector("body[data-ready=true]")
    phone.fill("#max-tokens", "8")
    _send(phone, "Hi from a phone.")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off the side
    phone.screenshot(path=OUT / "5-phone.png", full_page=True)
    phone_watch.check()
    (OUT / "refresh_ms.json").write_text(json.dumps(timings, indent=2))
