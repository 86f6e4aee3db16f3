#!/usr/bin/env bash
# Build the Docker image with Podman on a Debian base made by debootstrap, run it, and check that
# it answers /ready, streams a /generate and answers a chat with the real model (no network needed
# at run time: the model was pulled at build time). Prints the image size and the cold start.
#
# This machine's workarounds live here, never in the shipped files: Podman needs runc and default
# ulimits (a containers.conf), --format docker keeps the HEALTHCHECK, and pip inside the build must
# trust this machine's CA file (mounted, and named by the PIP_CERT build argument).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${WORK:-$(mktemp -d /tmp/toyllm-image.XXXXXX)}
BASE=localhost/toyllm-debian-bookworm:latest
IMAGE=localhost/toyllm-serve:test
NAME=toyllm-image-test-$$
CA=${CA_FILE:-/etc/ssl/certs/ca-certificates.crt}
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

cat > "$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$WORK/containers.conf

[ -d weights/toyllm-base ] || { echo "weights/toyllm-base is missing: the image ships it" >&2; exit 1; }

t0=$(date +%s)
if ! podman image exists "$BASE"; then
  echo "== debootstrap: Debian bookworm with python3 + venv"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE" > /dev/null
  rm -rf "$WORK/rootfs"
fi
t1=$(date +%s)
echo "== base image ready in $((t1 - t0)) s"

podman build --format docker --build-arg BASE_IMAGE="$BASE" --build-arg PIP_CERT=/etc/pip-ca.pem \
  -v "$CA:/etc/pip-ca.pem:ro" -t "$IMAGE" . > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
t2=$(date +%s)
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "== image built in $((t2 - t1)) s; size $((size / 1000000)) MB"
podman image inspect --format '{{json .Config.Healthcheck}} user={{.Config.User}} exposed={{json .Config.ExposedPorts}}' "$IMAGE"

cleanup() { podman rm -f "$NAME" > /dev/null 2>&1 || true; }
trap cleanup EXIT
start=$(date +%s.%N)
podman run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" -e TOYLLM_MAX_CONCURRENT_REQUESTS=2 "$IMAGE" > /dev/null
for _ in $(seq 600); do
  if curl -fs "http://127.0.0.1:$PORT/ready" > /dev/null; then break; fi
  if [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" != true ]; then podman logs "$NAME" | tail -30; exit 1; fi
  sleep 0.5
done
ready=$(date +%s.%N)
curl -fs "http://127.0.0.1:$PORT/ready" > /dev/null || { podman logs "$NAME" | tail -30; echo "never ready" >&2; exit 1; }
echo "== cold start to /ready: $(python3 -c "print(f'{$ready - $start:.1f}')") s"
podman healthcheck run "$NAME" && echo "== HEALTHCHECK passes"
[ "$(podman exec "$NAME" id -u)" != 0 ] && echo "== runs as non-root uid $(podman exec "$NAME" id -u)"
# The CLI inside the image (an installed wheel, not a checkout) finds the shipped weights by default.
podman exec -w / "$NAME" python3 -c "from toyllm_core.weights import BASE_CHECKPOINT as b, DEFAULT_CHECKPOINT as d
assert d.is_dir() and b.is_dir(), (d, b)" && echo "== the CLI's default checkpoint is the shipped one"
out=$(curl -fsN "http://127.0.0.1:$PORT/generate" -H 'content-type: application/json' \
  -d '{"prompt": "The history of the city", "max_new_tokens": 16, "temperature": 0}')
echo "$out" | grep -q '^event: token' && echo "$out" | grep -q '^event: done' || { echo "$out"; exit 1; }
echo "$out" | grep '^event: token' | wc -l | xargs echo "== streamed token events:"
echo "$out" | sed -n '/^event: done/{n;p}' | cut -c1-300
chat=$(curl -fs "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 32,
       "messages": [{"role": "user", "content": "What is the capital of France?"}]}')
echo "== chat: $chat" | cut -c1-400
echo "$chat" | grep -q 'Paris' || { echo "the chat answer does not name Paris" >&2; exit 1; }
echo "== OK in $(( $(date +%s) - t0 )) s"
