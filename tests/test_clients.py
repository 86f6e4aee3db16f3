"""Sessions belong to the client that made them: another client sees 404 for them, a client past its
share of sessions or bytes loses its own least recently used idle sessions (never another's), and
gets 429 when none of its own is idle."""

from __future__ import annotations

from server_utils import metric, ready_client, wait_ready
from test_chat import TEST_TEMPLATE

A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


def _turn(c, headers, sid=None, prompt="the river and the music of the hills"):
    body = {"prompt": prompt, "max_new_tokens": 3, "stream": False, **({"session_id": sid} if sid else {})}
    return c.post("/generate", json=body, headers=headers)


def test_a_client_cannot_see_continue_or_delete_another_clients_session(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(TEST_TEMPLATE)
    with ready_client(api_keys=["key-a", "key-b"], chat_template=template) as c:
        wait_ready(c)
        sid = _turn(c, A).json()["session_id"]
        for r in (c.get(f"/sessions/{sid}", headers=B), c.get(f"/sessions/{sid}/cache", headers=B),
                  _turn(c, B, sid), c.delete(f"/sessions/{sid}", headers=B),
                  c.post("/v1/chat/completions", headers={**B, "X-Session-ID": sid},
                         json={"model": "random-tiny", "messages": [{"role": "user", "content": "hi"}]})):
            assert r.status_code == 404, r.text  # as if it did not exist
        assert c.get(f"/sessions/{sid}", headers=A).status_code == 200
        assert _turn(c, A, sid).status_code == 200
        assert c.get(f"/sessions/{sid}", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_past_its_share_a_client_loses_its_own_oldest_idle_session_never_anothers():
    with ready_client(api_keys=["key-a", "key-b"], client_max_sessions=2) as c:
        wait_ready(c)
        b = _turn(c, B).json()["session_id"]
        a1, a2 = (_turn(c, A).json()["session_id"] for _ in range(2))
        a3 = c.post("/sessions", json={}, headers=A).json()["session_id"]  # evicts a1, A's oldest
        assert c.get(f"/sessions/{a1}", headers=A).status_code == 404
        assert all(c.get(f"/sessions/{s}", headers=A).status_code == 200 for s in (a2, a3))
        assert c.get(f"/sessions/{b}", headers=B).status_code == 200
        assert metric(c.get("/metrics").text, "toyllm_sessions_evicted_total", reason="quota") == 1
        store = c.app.state.toyllm.store
        held = [store.acquire(s) for s in (a2, a3)]  # both busy: nothing of A's to evict
        r = c.post("/sessions", json={}, headers=A)
        assert r.status_code == 429 and r.json()["error"]["type"] == "quota_exceeded", r.text
        assert c.post("/sessions", json={}, headers=B).status_code == 201  # B is not held back
        for s in held:
            store.release(s)


def test_past_its_bytes_a_client_loses_its_own_oldest_idle_sessions():
    # Each session's tiers hold 2,560 bytes here (10 tokens): a share of 6,000 keeps two of A's, and
    # B's stays.
    with ready_client(api_keys=["key-a", "key-b"], client_max_cache_bytes=6_000) as c:
        wait_ready(c)
        b = _turn(c, B).json()["session_id"]
        a = [_turn(c, A).json()["session_id"] for _ in range(4)]
        alive = [c.get(f"/sessions/{s}", headers=A).status_code == 200 for s in a]
        assert alive == [False, False, True, True], alive
        assert c.get(f"/sessions/{b}", headers=B).status_code == 200


def test_behind_a_trusted_proxy_its_client_header_names_the_client():
    with ready_client(trusted_proxy=True) as c:
        wait_ready(c)
        one, two = {"X-Client-ID": "10.0.0.1"}, {"X-Client-ID": "10.0.0.2"}
        sid = _turn(c, one).json()["session_id"]
        assert c.get(f"/sessions/{sid}", headers=two).status_code == 404
        assert c.get(f"/sessions/{sid}", headers=one).status_code == 200
    with ready_client() as c:  # without the setting, the header is ignored (it is the address that counts)
        wait_ready(c)
        sid = _turn(c, {"X-Client-ID": "10.0.0.1"}).json()["session_id"]
        assert c.get(f"/sessions/{sid}", headers={"X-Client-ID": "10.0.0.2"}).status_code == 200
