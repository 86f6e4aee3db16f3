#!/usr/bin/env bash
# The server issue's measurements: `toyllm loadtest` against `toyllm serve` on a checkpoint at
# several concurrencies (64-token prompts, 128 new tokens, snapkv budget 64; as the model ends them and
# with --ignore-eos), then the KV-cache bytes
# of 100 idle 1024-token sessions under snapkv and full. The load generator shares this machine.
#   benchmarks/serve_measurements.sh weights/toyllm-base out/serve
# MODES, CONCURRENCIES and IDLE=0 pick a subset, e.g. MODES=ignore-eos CONCURRENCIES="1 16" IDLE=0.
set -euo pipefail
CKPT=${1:-weights/toyllm-base}
OUT=${2:-out/serve}
PORT=${PORT:-8765}
T=${TOYLLM:-.venv/bin/toyllm}
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT"
source "$(dirname "$0")/server_up.sh"
start_server "$OUT/server.log" --checkpoint "$CKPT"
echo "ready (load + warm-up) in $ready_s s" | tee "$OUT/ready.txt"
curl -fs "$URL/metrics" | grep -E "^toyllm_jit_compilations_total" | tee "$OUT/metrics_ready.txt"
# As the model decides (it often ends early with end-of-text), then with every request making all
# 128 tokens (--ignore-eos), so that the concurrencies do the same work per request.
for mode in ${MODES:-natural ignore-eos}; do
  flag=$([ $mode = ignore-eos ] && echo --ignore-eos || true)
  for c in ${CONCURRENCIES:-1 4 16 32}; do
    n=${REQUESTS:-$(( c < 4 ? 8 : 2 * c ))}
    echo "+ $T loadtest --url $URL --concurrency $c --requests $n --prompt-tokens 64 --max-new-tokens 128 --policy snapkv --budget 64 $flag" | tee -a "$OUT/commands.txt"
    $T loadtest --url "$URL" --concurrency $c --requests $n --prompt-tokens 64 --max-new-tokens 128 \
        --policy snapkv --budget 64 $flag --json "$OUT/load_${mode}_c$c.json" | tee "$OUT/load_${mode}_c$c.txt"
  done
done
if [ "${IDLE:-1}" = 1 ]; then
  .venv/bin/python benchmarks/idle_sessions.py --url "$URL" --sessions 100 --tokens 1024 --policies snapkv,full \
      --budget 64 --json "$OUT/idle_sessions.json" | tee "$OUT/idle_sessions.txt"
fi
curl -fs "$URL/metrics" | grep -E "^toyllm_jit_compilations_total|^toyllm_decode_step_duration_seconds_(sum|count)" \
    | tee "$OUT/metrics_end.txt"
