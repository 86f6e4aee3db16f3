#!/usr/bin/env bash
# Property-based API tests with Schemathesis: start `toyllm serve` on the tiny random-weight preset
# (warmed up, so nothing compiles while requests arrive), run every check against the live OpenAPI
# document, stop the server, and exit with Schemathesis' exit code.
#
# Every case runs even after a failure (--continue-on-failure), so the report lists each kind of
# failure rather than an operation's first one. Output sanitizing is off: it would print fields such
# as max_new_tokens and session_id as "[Filtered]" in the curl reproductions. Event streams are read
# to their end (Schemathesis stops after 20 events by default); a 200 text/event-stream response
# without its final event (`event: done`, `event: error` or `data: [DONE]`) was cut off at the request
# timeout, i.e. the stream hung: it is listed at the end and fails the run.
#
#   bash tests/api_fuzz.sh                      # what `make test-api` runs
#   API_FUZZ_MAX_EXAMPLES=5 bash tests/api_fuzz.sh -- --include-path /generate   # quicker, one operation
#
# Settings (environment):
#   API_FUZZ_MAX_EXAMPLES       generated cases per operation (default 40: ~1,450 cases in all with the
#                               coverage and stateful phases; 320 gives ~5,000)
#   API_FUZZ_SEED               the seed (default 20240601): the same seed replays the same cases
#   API_FUZZ_PHASES             default examples,coverage,fuzzing,stateful
#   API_FUZZ_REQUEST_TIMEOUT    seconds before a request counts as hung (default 30)
#   API_FUZZ_MAX_RESPONSE_TIME  seconds to the response headers; slower fails max_response_time (default 20)
#   API_FUZZ_WORKERS            concurrent Schemathesis workers (default 1)
#   API_FUZZ_OUT                report directory (default out/api-fuzz)
# Arguments after `--` go to `schemathesis run` unchanged.
#
# Reports under $API_FUZZ_OUT: junit.xml, events.ndjson (every case, check and response),
# traffic.har (every request and response), schemathesis.log (the console output), server.log, and
# cache/ (the failing cases). To replay them against a server of your own:
#   .venv/bin/schemathesis --config-file out/api-fuzz/schemathesis.toml replay --url http://HOST:PORT
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
OUT=${API_FUZZ_OUT:-out/api-fuzz}
MAX_EXAMPLES=${API_FUZZ_MAX_EXAMPLES:-40}
SEED=${API_FUZZ_SEED:-20240601}
PHASES=${API_FUZZ_PHASES:-examples,coverage,fuzzing,stateful}
REQUEST_TIMEOUT=${API_FUZZ_REQUEST_TIMEOUT:-30}
MAX_RESPONSE_TIME=${API_FUZZ_MAX_RESPONSE_TIME:-20}
WORKERS=${API_FUZZ_WORKERS:-1}
EXTRA=()
if [ "${1:-}" = "--" ]; then shift; EXTRA=("$@"); fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Stored failures from an earlier run would be replayed first and change the run: each run starts
# empty. Hypothesis' own files go there too, not into the working tree.
rm -rf "$OUT/cache" "$OUT/hypothesis"
rm -f "$OUT"/junit.xml "$OUT"/events.ndjson "$OUT"/traffic.har "$OUT"/schemathesis.log "$OUT"/server.log
export HYPOTHESIS_STORAGE_DIRECTORY="$OUT/hypothesis"

# Settings with no command-line option. The OpenAI routes answer 404 to any `model` but the served
# one, so most generated bodies name it (random-<preset>: a preset's random-weight model).
cat >"$OUT/schemathesis.toml" <<EOF
# Written by tests/api_fuzz.sh.
max-stream-events = 100000

[cache]
directory = "$OUT/cache"

[dictionaries.served-model]
values = ["random-tiny"]

[parameters]
"body.model" = { dictionary = "served-model", probability = 0.9 }

# Valid by the schema, refused for what a schema cannot say: a session or model this server does not
# have (404), a session busy with another request (409), a full queue (429), a prompt that does not
# fit the context or contradicts its session (400).
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "404", "409", "429"]

# A cache configuration must also be one of the classes this server warmed up at start-up (its
# settings, not its schema): 422 unsupported_cache, with the allowed values, otherwise.
[[operations]]
include-path-regex = "^/(generate|sessions|v1/chat/completions)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409", "422", "429"]
EOF

# The tiny preset has no chat template of its own: give it the tests' one, so chat answers too.
"$BIN/python" -c 'import sys; sys.path.insert(0, "tests"); from test_chat import TEST_TEMPLATE; print(TEST_TEMPLATE)' \
    >"$OUT/chat.jinja"

PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"

# The tiny model, float32, four decode rows; the cache classes a request may name. Warm-up compiles
# every serving shape before /ready answers 200. No API key.
TOYLLM_PRESET=tiny \
TOYLLM_DTYPE=float32 \
TOYLLM_WARMUP=true \
TOYLLM_MAX_CONCURRENT_REQUESTS=4 \
TOYLLM_COLD_TOKENS=512 \
TOYLLM_CACHE_CLASSES='["full", "snapkv:budget=24,sink_size=4,window_size=8,slack=8"]' \
TOYLLM_API_KEY= \
TOYLLM_CHAT_TEMPLATE="$OUT/chat.jinja" \
    "$BIN/python" -m server.cli serve --host 127.0.0.1 --port "$PORT" >"$OUT/server.log" 2>&1 &
SERVER=$!

stop_server() {
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM "$SERVER"
        for _ in $(seq 1 200); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$SERVER" 2>/dev/null; then
            echo "api_fuzz: the server ignored SIGTERM for 40 s; killing it" >&2
            kill -KILL "$SERVER" 2>/dev/null || true
        fi
        wait "$SERVER" 2>/dev/null || true
    fi
}
trap stop_server EXIT

echo "api_fuzz: waiting for $URL/ready (server log: $OUT/server.log)"
"$BIN/python" - "$URL" "$SERVER" <<'EOF' || { tail -n 40 "$OUT/server.log" >&2; exit 1; }
import os, sys, time, urllib.error, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 600
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("api_fuzz: the server exited before it was ready")
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except (urllib.error.URLError, OSError):
        pass
    time.sleep(0.5)
sys.exit("api_fuzz: the server was not ready within 600 s")
EOF
echo "api_fuzz: ready; running schemathesis (seed $SEED, $MAX_EXAMPLES cases per operation, phases $PHASES)"

started=$(date +%s)
rc=0
"$BIN/schemathesis" --config-file "$OUT/schemathesis.toml" run "$URL/openapi.json" \
    --checks all \
    --phases "$PHASES" \
    --max-examples "$MAX_EXAMPLES" \
    --seed "$SEED" \
    --workers "$WORKERS" \
    --request-timeout "$REQUEST_TIMEOUT" \
    --max-response-time "$MAX_RESPONSE_TIME" \
    --continue-on-failure \
    --generation-database none \
    --output-sanitize false \
    --report junit,ndjson,har \
    --report-junit-path "$OUT/junit.xml" \
    --report-ndjson-path "$OUT/events.ndjson" \
    --report-har-path "$OUT/traffic.har" \
    --no-color \
    "${EXTRA[@]}" 2>&1 | tee "$OUT/schemathesis.log" || rc=${PIPESTATUS[0]}
echo "api_fuzz: schemathesis exited $rc after $(( $(date +%s) - started )) s"

# Event streams that never sent their final event (Schemathesis cuts them off at the request timeout
# without reporting it).
if [ -f "$OUT/traffic.har" ]; then
    "$BIN/python" - "$OUT/traffic.har" "$REQUEST_TIMEOUT" <<'EOF' | tee -a "$OUT/schemathesis.log" || { [ "$rc" -ne 0 ] || rc=1; }
import json, re, sys
timeout_s = float(sys.argv[2])  # Schemathesis writes HAR times in seconds
cut = []
for entry in json.load(open(sys.argv[1], encoding="utf-8"))["log"]["entries"]:
    response = entry["response"]
    if response["status"] != 200 or "text/event-stream" not in response["content"].get("mimeType", ""):
        continue
    text = response["content"].get("text", "")
    if len(text) < response["content"].get("size", 0) and entry["time"] < timeout_s:
        continue  # the HAR keeps a stream's first MiB only; one that ended before the timeout did not hang
    if not re.search(r"^(event: ?(done|error)|data: ?\[DONE\])\r?$", text, re.M):
        body = (entry["request"].get("postData") or {}).get("text", "")
        cut.append(f"  {entry['request']['method']} {entry['request']['url']} after {entry['time']:.1f} s: "
                   f"{body[:300]}")
if cut:
    print(f"api_fuzz: {len(cut)} event stream(s) cut off before their final event (hung?):", *cut, sep="\n")
    sys.exit(1)
EOF
fi
echo "api_fuzz: exit $rc; reports in $OUT"
exit "$rc"
