#!/usr/bin/env bash
# Start-up and idle memory of `shoal serve` (release build, the examples
# deployed), each round on a new data directory:
#   new      start on the new data directory (the runtimes compiled in
#            SHOAL_RUNTIME_CACHE, by default target/bench-runtime-cache:
#            the first round ever compiles them), time to its `serving`
#            line and RSS after 5 s idle;
#   restart  the same directory started again: the same two figures;
#   first    after that restart, each function's first call (a POST over
#            loopback, curl's total time) and the RSS 1 s after it, in
#            order: Rust components, a command module, the snapshot
#            example, then the first and second Python function and the
#            JavaScript one (a language's first call prepares its runtime);
#   again    the same calls once more (images loaded, memories kept);
#   tour     the README's five-minute tour on top, then RSS after 5 s idle.
# With several SHOAL_BINS, each round runs them one after another (compare
# within a round: the machine is shared).
#
#   scripts/bench-memory.sh                          # this checkout's build, ROUNDS=3
#   SHOAL_BINS="old/shoal target/release/shoal" scripts/bench-memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
IDLE_S=${IDLE_S:-5}
if [ -z "${SHOAL_BINS:-}" ]; then
    cargo build --release -q -p shoal-cli
    SHOAL_BINS=target/release/shoal
fi
export SHOAL_RUNTIME_CACHE=${SHOAL_RUNTIME_CACHE:-$PWD/target/bench-runtime-cache}
export SHOAL_ADMIN_TOKEN=bench-admin-token-0123456789abcdef
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

now_ms() { date +%s%3N; }
rss_mib() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status"; }

# Start `$bin serve` on $home; sets pid, url and started_ms (ms to serving).
start() {
    local t0
    t0=$(now_ms)
    "$bin" serve --data-dir "$home" --listen 127.0.0.1:0 > /dev/null 2> "$home.log" &
    pid=$!
    url=
    # Up to 10 minutes: the first start of a build compiles its runtimes.
    while [ $(( $(now_ms) - t0 )) -lt 600000 ]; do
        url=$(grep -o 'serving http://[0-9.:]*' "$home.log" | head -1 | cut -d' ' -f2 || true)
        [ -n "$url" ] && break
        kill -0 "$pid" 2>/dev/null || { cat "$home.log" >&2; exit 1; }
        sleep 0.01
    done
    [ -n "$url" ] || { echo "bench-memory: no node started (see $home.log)" >&2; exit 1; }
    started_ms=$(( $(now_ms) - t0 ))
}

stop() {
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=
}

# One call of demo/$1 with body $2: curl's total time in ms.
call_ms() {
    curl -sS -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $SHOAL_ADMIN_TOKEN" \
        --data-binary "$2" "$url/v1/functions/demo/$1/invoke" | awk '{ printf "%.1f", $1 * 1000 }'
}

tour() {
    local shoal
    shoal=$(realpath "$bin")
    (
        cd "$home"
        export SHOAL_URL=$url SHOAL_TOKEN=$SHOAL_ADMIN_TOKEN
        "$shoal" invoke demo/hello -d world
        "$shoal" invoke demo/fib -d 30
        "$shoal" invoke demo/upper -d 'shout'
        "$shoal" invoke demo/counter -d 5
        "$shoal" state get demo/counter
        "$shoal" state set demo/config/mode fast
        "$shoal" invoke demo/matvec -d init
        "$shoal" invoke demo/matvec -d 'mul 7'
        "$shoal" invoke demo/fanout -d 'spawn 100 hello'
        "$shoal" invoke demo/wordcount --data-file "$OLDPWD/README.md"
        "$shoal" invoke demo/fib -d 35 --async
        "$shoal" invoke demo/fib -d ten || true
        "$shoal" invoke demo/primes -d 1000003
        "$shoal" invoke demo/hello-py -d you
        "$shoal" invoke demo/visits -d ann
        "$shoal" invoke demo/hello-js -d you
    ) > /dev/null 2>&1
}

FIRST_CALLS=(hello:world fib:20 upper:shout primes:1000 hello-py:you visits:ann hello-js:you)

echo "| round | binary | new: serving after, RSS idle | restart: serving after, RSS idle | first calls after the restart (ms, RSS after in MiB) | again (ms) | after the tour: RSS idle |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    for bin in $SHOAL_BINS; do
        home=$work/node-$round-$(basename "$bin")
        start
        sleep "$IDLE_S"
        new="$started_ms ms, $(rss_mib) MiB"
        stop
        start
        sleep "$IDLE_S"
        restart="$started_ms ms, $(rss_mib) MiB"
        first= again=
        for entry in "${FIRST_CALLS[@]}"; do
            ms=$(call_ms "${entry%%:*}" "${entry#*:}")
            sleep 1
            first+="${entry%%:*} $ms ($(rss_mib)); "
        done
        for entry in "${FIRST_CALLS[@]}"; do
            again+="${entry%%:*} $(call_ms "${entry%%:*}" "${entry#*:}"); "
        done
        tour
        sleep "$IDLE_S"
        echo "| $round | $bin | $new | $restart | ${first%; } | ${again%; } | $(rss_mib) MiB |"
        stop
        rm -rf "$home" "$home.log"
    done
done
