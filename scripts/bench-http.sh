#!/usr/bin/env bash
# End-to-end HTTP benchmarks, side by side in one run, on loopback.
#
# Parts (PARTS, default all three):
#   invoke  Shoal's sync invoke API: POST "world" to demo/hello (a fresh
#           sandbox per call), wrk with keep-alive at 1, 16, 64 connections.
#   http    An HTTP function: the `wstd` hello component (built for
#           `wasmtime serve`, guests/test-guests/compat-wstd) on Shoal's
#           function listener, public, GET /; the same component under
#           `wasmtime serve -Scli` 48.0.8 (Rust std imports wasi:cli) with
#           default and tuned pooling settings;
#           and a native hyper server (native-http) — each at 1, 16, 64
#           connections.
#   stream  A 100 MiB streamed response (the HTTP probe's /big?mib=100 on
#           Shoal, the same from native-http), three downloads each: MiB/s
#           and the server's resident memory before and after.
# For each wrk run: requests/s, latency p50/p99, and the server's CPU time
# per request (user and system, from /proc/PID/stat).
#
# The peers are built when missing: wasmtime-cli 48.0.8 (the wasmtime Shoal
# links) with `cargo install --locked` into target/tools/wasmtime (~20 min
# on 2 cores, once), native-http with cargo. WASMTIME=path uses another;
# PEERS=0 skips them.
#
# CONNS (default "1 16 64") sets the connection counts; SHOAL_ARGS adds
# flags to `shoal serve` (e.g. "--otlp-endpoint http://… --trace-sample 0.01").
#
# Usage: [SHOAL_BIN=path/to/shoal] [PARTS="invoke http stream"] scripts/bench-http.sh [duration, default 10s]
# Needs wrk and curl (apt-get install wrk curl).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
parts=${PARTS:-invoke http stream}
peers=${PEERS:-1}
conns_list=${CONNS:-1 16 64}
read -r -a serve_args <<<"${SHOAL_ARGS:-}"
unset RUST_BACKTRACE
work=$(mktemp -d)
pids=()
# SIGTERM: a background job of a script ignores SIGINT unless it handles it.
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
ticks=$(getconf CLK_TCK)
has() { [[ " $parts " == *" $1 "* ]]; }

wait_port() { for _ in $(seq 1200); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

run() { # name pid url lua connections
  local name=$1 pid=$2 url=$3 lua=$4 conns=$5 threads=2 out u0 s0 u1 s1 total
  [ "$conns" -lt 2 ] && threads=1
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  out=$(wrk -t"$threads" -c"$conns" -d"$duration" --latency ${lua:+-s "$lua"} "$url")
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  printf '%-24s %4s conns  %10s req/s  p50 %-9s p99 %-9s server CPU/req: user %3s us, sys %3s us  %s\n' \
    "$name" "$conns" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")" \
    $(( (u1 - u0) * 1000000 / ticks / total )) $(( (s1 - s0) * 1000000 / ticks / total )) \
    "$(awk '/Non-2xx/ {print "non-2xx: " $NF}' <<<"$out")"
}

# Until the node's CPU time stops moving (a first start compiles the shared
# Python and JavaScript runtimes in the background), at most two minutes.
wait_idle() {
  local last now
  last=$(awk '{print $14 + $15}' "/proc/$1/stat")
  for _ in $(seq 240); do
    sleep 0.5
    now=$(awk '{print $14 + $15}' "/proc/$1/stat")
    [ $((now - last)) -le 1 ] && return 0
    last=$now
  done
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
peak_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

download() { # name pid url: three downloads, MiB/s each, memory around them
  local name=$1 pid=$2 url=$3 before peak0 speeds=() bytes
  before=$(rss_kib "$pid"); peak0=$(peak_kib "$pid")
  for _ in 1 2 3; do
    read -r bytes speed < <(curl -s -o /dev/null -w '%{size_download} %{speed_download}\n' "$url")
    [ "$bytes" = $((100 << 20)) ] || { echo "$name: downloaded $bytes bytes, not 100 MiB" >&2; exit 1; }
    speeds+=("$(awk -v s="$speed" 'BEGIN {printf "%.0f", s / 1048576}')")
  done
  printf '%-24s 100 MiB streamed: %s MiB/s  server RSS %s -> %s MiB (peak %s -> %s MiB)\n' "$name" "${speeds[*]}" \
    $((before >> 10)) $(($(rss_kib "$pid") >> 10)) $((peak0 >> 10)) $(($(peak_kib "$pid") >> 10))
}

# A given binary (e.g. an older commit's, to compare) is used as it is.
[ -n "${SHOAL_BIN:-}" ] || cargo build --release --bin shoal >/dev/null 2>&1
shoal=${SHOAL_BIN:-./target/release/shoal}
guests=target/guests/wasm32-wasip2/release
if has http || has stream; then
  [ -f "$guests/compat-wstd.wasm" ] && [ -f "$guests/http_probe.wasm" ] || cargo build -p shoal-guests >/dev/null 2>&1
fi
if [ "$peers" = 1 ] && { has http || has stream; }; then
  cargo build --release -p shoal-testkit --bin native-http >/dev/null 2>&1
  if has http && [ -z "${WASMTIME:-}" ] && ! target/tools/wasmtime/bin/wasmtime --version 2>/dev/null | grep -q '^wasmtime 48\.0\.4\b'; then
    echo "building wasmtime-cli 48.0.8 into target/tools/wasmtime (once)" >&2
    cargo install --locked --quiet wasmtime-cli --version 48.0.8 --root target/tools/wasmtime
  fi
fi
wasmtime=${WASMTIME:-target/tools/wasmtime/bin/wasmtime}

# The compiled runtimes are kept across runs (and builds with the same
# wasmtime), so that a run measures calls, not a compile.
export SHOAL_RUNTIME_CACHE=${SHOAL_RUNTIME_CACHE:-$PWD/target/bench-runtime-cache}
SHOAL_LOG=warn "$shoal" serve --data-dir "$work/data" --listen 127.0.0.1:18490 --http-listen 127.0.0.1:18494 "${serve_args[@]}" 2>"$work/serve.log" &
pids+=($!)
shoal_pid=${pids[0]}
wait_port 18490
wait_idle "$shoal_pid"
token=$(cat "$work/data/admin.token")
printf 'wrk.method = "POST"\nwrk.body = "world"\nwrk.headers["Authorization"] = "Bearer %s"\n' "$token" >"$work/shoal.lua"

echo "# $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates guests wit || echo '+changes'), $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), wrk ${duration} per run"
if has invoke; then
  for conns in $conns_list; do
    run shoal-invoke "$shoal_pid" http://127.0.0.1:18490/v1/functions/demo/hello/invoke "$work/shoal.lua" "$conns"
  done
fi

if has http || has stream; then
  SHOAL_URL=http://127.0.0.1:18490 SHOAL_TOKEN=$token "$shoal" deploy demo/wstd "$guests/compat-wstd.wasm" --http --public >/dev/null
  SHOAL_URL=http://127.0.0.1:18490 SHOAL_TOKEN=$token "$shoal" deploy demo/probe "$guests/http_probe.wasm" --http --public >/dev/null
fi
if [ "$peers" = 1 ] && { has http || has stream; }; then
  target/release/native-http 127.0.0.1:18493 >/dev/null 2>&1 &
  pids+=($!)
  native_pid=$!
  wait_port 18493
fi

if has http; then
  for conns in $conns_list; do
    run shoal-http-fn "$shoal_pid" http://127.0.0.1:18494/demo/wstd/ "" "$conns"
  done
  if [ "$peers" = 1 ]; then
    tuned=pooling-allocator=y,pooling-memory-keep-resident=1048576,pooling-table-keep-resident=65536,pooling-async-stack-keep-resident=65536,pooling-pagemap-scan=y
    for variant in default tuned; do
      opts=()
      [ "$variant" = tuned ] && opts=(-O "$tuned")
      "$wasmtime" serve -Scli "${opts[@]}" --addr 127.0.0.1:18491 "$guests/compat-wstd.wasm" 2>/dev/null &
      pid=$!
      wait_port 18491
      for conns in $conns_list; do
        run "wasmtime-serve-$variant" "$pid" http://127.0.0.1:18491/ "" "$conns"
      done
      kill -INT "$pid"; wait "$pid" 2>/dev/null || true
    done
    for conns in $conns_list; do
      run native-hyper "$native_pid" http://127.0.0.1:18493/ "" "$conns"
    done
  fi
fi

if has stream; then
  download shoal-http-fn "$shoal_pid" "http://127.0.0.1:18494/demo/probe/big?mib=100"
  [ "$peers" = 1 ] && download native-hyper "$native_pid" "http://127.0.0.1:18493/big?mib=100"
fi
