# Sourced by the server benchmarks: start `toyllm serve` in the background and wait for /ready.
#   start_server LOG [serve options...]   sets $server (the pid) and $ready_s (load + warm-up seconds)
#   stop_server
# Needs $T (the toyllm command), $PORT and $URL; the environment carries TOYLLM_* settings.

start_server() {
  local log=$1 t0
  shift
  t0=$(date +%s.%N)
  $T serve --port "$PORT" "$@" > "$log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  until curl -fs "$URL/ready" > /dev/null; do
    kill -0 $server 2>/dev/null || { tail -20 "$log"; exit 1; }
    sleep 0.5
  done
  ready_s=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
}

stop_server() {
  kill $server; wait $server 2>/dev/null || true
  trap - EXIT
}
