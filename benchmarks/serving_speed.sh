#!/usr/bin/env bash
# The serving-speed issue's server-side measurements on the default model (docs/serving-speed.md):
# 1. the default server (SmolLM2-135M-Instruct, default cache classes): load + warm-up time and the
#    compilations at ready; `toyllm loadtest` at 1, 4, 16 and 32 concurrent streams (64-token
#    prompts, 128 new tokens each, --ignore-eos, the default snapkv cache); one ~4,096-token prompt at
#    a time (TTFT against the server's own prefill time and decode call); compilations at the end.
# 2. a server with a snapkv budget-512 class and 8,192-token prompts: the KV bytes of 32 idle
#    8,192-token sessions against what full caches would hold (benchmarks/idle_sessions.py).
# The load generator shares the machine.
#   benchmarks/serving_speed.sh out/serving
# PARTS="load ttft memory" picks a subset; CONCURRENCIES="1 16" a subset of the concurrencies;
# PER_STREAM requests per stream (default 2, at least 8 in all): more measures the steady state,
# fewer the ramp (all streams start together) and the tail (they end at different times).
set -euo pipefail
OUT=${1:-out/serving}
PORT=${PORT:-8766}
T=${TOYLLM:-.venv/bin/toyllm}
PY=${PYTHON:-.venv/bin/python}
URL=http://127.0.0.1:$PORT
PARTS=${PARTS:-load ttft memory}
mkdir -p "$OUT"

source "$(dirname "$0")/server_up.sh"

start() {  # $1: name of the run; the environment carries the settings
  start_server "$OUT/$1.log"
  echo "$1: ready (load + warm-up) in $ready_s s" | tee "$OUT/$1_ready.txt"
  curl -fs "$URL/info" > "$OUT/$1_info.json"
  scrape "$1_ready"
}

scrape() {
  curl -fs "$URL/metrics" | grep -E "^toyllm_(jit_compilations_total|decode_step_duration_seconds_(sum|count)|prefill_duration_seconds_(sum|count)|prompt_tokens_total|generation_tokens_total)" \
    | tee "$OUT/metrics_$1.txt"
}

if [[ " $PARTS " == *" load "* || " $PARTS " == *" ttft "* ]]; then
  start default
  if [[ " $PARTS " == *" load "* ]]; then
    for c in ${CONCURRENCIES:-1 4 16 32}; do
      n=$(( ${PER_STREAM:-2} * c < 8 ? 8 : ${PER_STREAM:-2} * c ))
      echo "+ $T loadtest --url $URL --concurrency $c --requests $n --prompt-tokens 64 --max-new-tokens 128 --ignore-eos" \
        | tee -a "$OUT/commands.txt"
      $T loadtest --url "$URL" --concurrency "$c" --requests "$n" --prompt-tokens 64 --max-new-tokens 128 \
          --ignore-eos --json "$OUT/load_c${c}_n$n.json" | tee "$OUT/load_c${c}_n$n.txt"
    done
  fi
  if [[ " $PARTS " == *" ttft "* ]]; then
    scrape before_ttft
    # 4,090 prompt tokens (a loadtest prompt is one token per word with this tokenizer): within the default 4,096.
    echo "+ $T loadtest --url $URL --concurrency 1 --requests 3 --prompt-tokens 4090 --max-new-tokens 8 --ignore-eos" \
      | tee -a "$OUT/commands.txt"
    $T loadtest --url "$URL" --concurrency 1 --requests 3 --prompt-tokens 4090 --max-new-tokens 8 --ignore-eos \
        --json "$OUT/ttft_4k.json" | tee "$OUT/ttft_4k.txt"
    scrape after_ttft
  fi
  scrape end
  stop_server
fi

if [[ " $PARTS " == *" memory "* ]]; then
  TOYLLM_CACHE_CLASSES='["full", "snapkv:budget=512"]' TOYLLM_MAX_PROMPT_TOKENS=8192 \
  TOYLLM_MAX_CACHE_BYTES=$((8 * 2**30)) TOYLLM_MAX_SESSIONS=64 start memory
  echo "+ $PY benchmarks/idle_sessions.py --url $URL --sessions 32 --tokens 8192 --policies snapkv --budget 512" \
    | tee -a "$OUT/commands.txt"
  $PY benchmarks/idle_sessions.py --url "$URL" --sessions 32 --tokens 8192 --policies snapkv --budget 512 \
      --json "$OUT/idle_sessions.json" | tee "$OUT/idle_sessions.txt"
  scrape memory_end
  stop_server
fi
