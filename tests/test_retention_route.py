"""The playground's data: the page is served from the package, and the retention route's counts
are exactly what the cache introspection lists, in a bounded, compact form."""

from __future__ import annotations

import base64

import numpy as np
from server_utils import ready_client, wait_ready

SNAP = {"policy": "snapkv", "budget": 24, "sink_size": 4, "window_size": 8, "slack": 8}


def test_the_playground_is_served_from_the_package_and_calls_only_this_server():
    with ready_client(api_key="k") as c:
        wait_ready(c)
        page = c.get("/playground/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'src="playground.js"' in page.text and "http" not in page.text.replace("http-equiv", "")
        script = c.get("/playground/playground.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "http://" not in script.text and "https://" not in script.text  # no CDN, no other origin
        assert c.get("/playground/playground.css").status_code == 200
        assert c.get("/info").status_code == 401  # the page is static; its data obeys API_KEY


def test_retention_counts_are_what_the_cache_holds_per_position():
    with ready_client() as c:
        wait_ready(c)
        words = " ".join(["the river and the music of the hills"] * 10)
        done = c.post("/generate", json={"prompt": words, "max_new_tokens": 12, "cache": SNAP, "stream": False}).json()
        sid = done["session_id"]
        kept = c.get(f"/sessions/{sid}/retention").json()
        heads = c.get(f"/sessions/{sid}/cache").json()["heads"]
        n = kept["tokens"]
        assert n == done["cache"]["tokens_seen"] and kept["count_bytes"] == 1
        hot = np.frombuffer(base64.b64decode(kept["hot"]), np.uint8)
        cold = np.frombuffer(base64.b64decode(kept["cold"]), np.uint8)
        want_hot, want_cold = np.zeros(n, int), np.zeros(n, int)
        for head in heads:
            for slot in head["kept"]:
                want_hot[slot["position"]] += 1
            for p in head["cold"]:
                want_cold[p] += 1
        np.testing.assert_array_equal(hot, want_hot)
        np.testing.assert_array_equal(cold, want_cold)
        assert cold.sum() > 0 and (hot + cold == len(heads)).all()  # two tiers: every token somewhere
        grid = np.frombuffer(base64.b64decode(kept["map"]), np.uint8).reshape(kept["layers"], kept["map_columns"])
        assert kept["map_columns"] == n and set(np.unique(grid)) <= {0, 128, 255}  # 2 KV heads: 0, 1/2, all
        state = c.app.state.toyllm
        tokens = state.store.get(sid).tokens[:n]
        assert kept["texts"] == [state.tokenizer.decode([t]) for t in tokens]
        later = c.get(f"/sessions/{sid}/retention", params={"texts_from": n - 3}).json()
        assert later["texts"] == kept["texts"][-3:] and later["hot"] == kept["hot"]
        store = c.app.state.toyllm.store
        held = store.acquire(sid)
        assert c.get(f"/sessions/{sid}/retention").status_code == 409  # its tiers are in use
        store.release(held)
        assert c.get("/sessions/nope/retention").status_code == 404
