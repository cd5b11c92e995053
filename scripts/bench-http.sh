#!/usr/bin/env bash
# End-to-end HTTP benchmark of sync invoke, side by side in one run.
#
# Shoal: a release `shoal serve` on loopback, wrk with keep-alive at 1, 16
# and 64 connections, POST "world" to demo/hello (a fresh sandbox per call).
# Optional baselines at 64 connections, each answering "hello world" to a
# POST, when their paths are given (they are not built by this project):
#   WASMTIME=/path/to/wasmtime WASI_HTTP_HELLO=/path/to/hello.wasm
#       `wasmtime serve -Scli`, default settings and tuned pooling settings
#   NATIVE_HELLO=/path/to/server   a native server taking its address as argv[1]
# For each: requests/s, latency p50/p99 (wrk), and the server's CPU time
# per request (user and system, from /proc/PID/stat).
#
# Usage: [SHOAL_BIN=path/to/shoal] [WASMTIME=… WASI_HTTP_HELLO=… NATIVE_HELLO=…] scripts/bench-http.sh [duration, default 10s]
# Needs wrk (apt-get install wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
unset RUST_BACKTRACE
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
ticks=$(getconf CLK_TCK)

wait_port() { for _ in $(seq 1200); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

run() { # name pid url lua connections
  local name=$1 pid=$2 url=$3 lua=$4 conns=$5 threads=2 out u0 s0 u1 s1 total
  [ "$conns" -lt 2 ] && threads=1
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  out=$(wrk -t"$threads" -c"$conns" -d"$duration" --latency -s "$lua" "$url")
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  printf '%-24s %4s conns  %10s req/s  p50 %-9s p99 %-9s server CPU/req: user %3s us, sys %3s us  %s\n' \
    "$name" "$conns" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")" \
    $(( (u1 - u0) * 1000000 / ticks / total )) $(( (s1 - s0) * 1000000 / ticks / total )) \
    "$(awk '/Non-2xx/ {print "non-2xx: " $NF}' <<<"$out")"
}

# A given binary (e.g. an older commit's, to compare) is used as it is.
[ -n "${SHOAL_BIN:-}" ] || cargo build --release --bin shoal >/dev/null 2>&1
SHOAL_LOG=warn "${SHOAL_BIN:-./target/release/shoal}" serve --data-dir "$work/data" --listen 127.0.0.1:18490 2>"$work/serve.log" &
pids+=($!)
wait_port 18490
token=$(cat "$work/data/admin.token")
printf 'wrk.method = "POST"\nwrk.body = "world"\nwrk.headers["Authorization"] = "Bearer %s"\n' "$token" >"$work/shoal.lua"
printf 'wrk.method = "POST"\nwrk.body = "world"\n' >"$work/plain.lua"
for conns in 1 16 64; do
  run shoal "${pids[0]}" http://127.0.0.1:18490/v1/functions/demo/hello/invoke "$work/shoal.lua" "$conns"
done

if [ -n "${WASMTIME:-}" ] && [ -n "${WASI_HTTP_HELLO:-}" ]; then
  tuned=pooling-allocator=y,pooling-memory-keep-resident=1048576,pooling-table-keep-resident=65536,pooling-async-stack-keep-resident=65536,pooling-pagemap-scan=y
  for variant in default tuned; do
    opts=()
    [ "$variant" = tuned ] && opts=(-O "$tuned")
    "$WASMTIME" serve -Scli "${opts[@]}" --addr 127.0.0.1:18491 "$WASI_HTTP_HELLO" 2>/dev/null &
    pid=$!
    wait_port 18491
    run "wasmtime-serve-$variant" "$pid" http://127.0.0.1:18491/ "$work/plain.lua" 64
    kill -INT "$pid"; wait "$pid" 2>/dev/null || true
  done
fi
if [ -n "${NATIVE_HELLO:-}" ]; then
  "$NATIVE_HELLO" 127.0.0.1:18493 >/dev/null 2>&1 &
  pid=$!
  wait_port 18493
  run native-hello "$pid" http://127.0.0.1:18493/ "$work/plain.lua" 64
  kill "$pid"; wait "$pid" 2>/dev/null || true
fi
