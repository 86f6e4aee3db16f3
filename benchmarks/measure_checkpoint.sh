#!/usr/bin/env bash
# The training issue's measurements of a checkpoint, in one place: WikiText validation perplexity
# (word and token level), perplexity against cache budget (streaming, prefill, copy), decode latency
# and cache bytes against context, the compression dashboard and sample generations.
#   benchmarks/measure_checkpoint.sh weights/toyllm-base out/measure WIKITEXT_VALID
set -euo pipefail
CKPT=${1:-weights/toyllm-base}
OUT=${2:-out/measure}
VALID=${3:?the path of WikiText-103 wiki.valid.raw}
T=${TOYLLM:-.venv/bin/toyllm}
SEQS=${SEQS:-16}
PARTS=${PARTS:-eval,bench,dashboard,samples}  # bench times things: run it on a quiet machine
mkdir -p "$OUT"
run() { echo "+ $*" | tee -a "$OUT/commands.txt"; "$@"; }
want() { [[ ",$PARTS," == *",$1,"* ]]; }

if want eval; then
run $T eval --checkpoint "$CKPT" --protocol corpus --data "file:$VALID" --json "$OUT/wikitext_corpus.json" | tee "$OUT/wikitext_corpus.txt"
for protocol in streaming prefill; do
  run $T eval --checkpoint "$CKPT" --protocol $protocol --data "file:$VALID" --seq-len 1024 \
      --policies streaming,snapkv,h2o --budgets 32,64,128,256 --max-sequences "$SEQS" \
      --json "$OUT/eval_$protocol.json" --plot "$OUT/eval_$protocol.png" | tee "$OUT/eval_$protocol.txt"
done
run $T eval --checkpoint "$CKPT" --protocol copy --seq-len 512 --policies streaming,snapkv,h2o \
    --budgets 32,64,128,256 --max-sequences "$SEQS" --json "$OUT/eval_copy.json" --plot "$OUT/eval_copy.png" \
    | tee "$OUT/eval_copy.txt"
fi
if want bench; then
run $T bench --checkpoint "$CKPT" --lengths 64,200,256,1024,8192 --policies none,full,streaming,snapkv,h2o \
    --batches 1,16 --repeats 5 --steps 32 --json "$OUT/bench.json" --plot "$OUT/bench.png" | tee "$OUT/bench.txt"
fi
if want dashboard; then
head -c 6000 "$VALID" > "$OUT/dashboard_text.txt"
run $T dashboard --checkpoint "$CKPT" --text-file "$OUT/dashboard_text.txt" --policy snapkv --budget 64 \
    --out "$OUT/dashboard" | tee "$OUT/dashboard.txt"
fi
if want samples; then
for prompt in "The history of the city" "In 1887, the river" "The team won the"; do
  run $T generate --checkpoint "$CKPT" --prompt "$prompt" --max-new-tokens 60 --temperature 0.8 --seed 1 \
      --policy snapkv --budget 64 | tee -a "$OUT/samples.txt"
  echo | tee -a "$OUT/samples.txt"
done
fi
