#!/usr/bin/env bash
# Queues end to end (release build): on one node (the embedded store), or
# with NODES=n on n nodes of a cluster on a local redis-server (appendonly
# yes, appendfsync always: every send is on disk before it is answered;
# APPENDFSYNC=everysec to compare).
# A burst of N messages sent 1,000 per request (round robin over the
# nodes) and drained by the test consumer (batches of 100, 4 at once per
# node, a durable state write per batch; `keep:` bodies, which it never
# asks to retry), then RATE messages/s for PACED_S seconds with batches
# sent as soon as they are ready (batch_wait 0). Prints messages/s drained
# and the queue's send-to-consumer-start p50/p99 as the first node
# measured them (in a cluster: the batches that node ran).
#
#   scripts/bench-queues.sh            # N=100000 RATE=2000 PACED_S=10
#   NODES=3 scripts/bench-queues.sh    # a cluster of three nodes on Redis
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
RATE=${RATE:-2000}
PACED_S=${PACED_S:-10}
NODES=${NODES:-}
[ -n "${SHOAL_BIN:-}" ] || cargo build --release -q -p shoal-cli
cargo build -q -p shoal-guests
CONSUMER=target/guests/wasm32-wasip2/release/queue_consumer.wasm
SHOAL=${SHOAL_BIN:-target/release/shoal}
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"' EXIT
export SHOAL_ADMIN_TOKEN=bench-admin-token-0123456789abcdef
# Start `shoal serve` in $dir/$1 with the rest as arguments; its URL is
# added to urls.
serve() {
    local home=$dir/$1 url=
    shift
    mkdir -p "$home"
    (cd "$home" && exec "$OLDPWD/$SHOAL" serve --no-examples "$@" > /dev/null 2> serve.log) &
    pids+=($!)
    for _ in $(seq 1 600); do
        url=$(grep -o 'serving http://[0-9.:]*' "$home/serve.log" | head -1 | cut -d' ' -f2 || true)
        [ -n "$url" ] && urls+=("$url") && return
        sleep 0.1
    done
    echo "bench-queues: a node did not start (see $home/serve.log)" >&2
    exit 1
}
urls=()
if [ -z "$NODES" ]; then
    serve node --listen 127.0.0.1:0
else
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync "${APPENDFSYNC:-always}" \
        --dir "$dir" --loglevel warning > /dev/null &
    pids+=($!)
    until redis-cli -p "$port" ping > /dev/null 2>&1; do sleep 0.1; done
    for i in $(seq 1 "$NODES"); do
        serve "node$i" --redis "redis://127.0.0.1:$port" --listen "127.0.0.$((i + 1)):0"
    done
fi
export SHOAL_URL=${urls[0]}
token=$SHOAL_ADMIN_TOKEN
$SHOAL tenant create bench > /dev/null
$SHOAL deploy bench/consume "$CONSUMER" > /dev/null
# In a cluster the function reaches every node's registry within moments.
sleep 1
echo "commit $(git rev-parse --short HEAD), $(date -u +%FT%TZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ${NODES:-1} node(s)${NODES:+ on Redis}"

python3 - "$token" "$N" "$RATE" "$PACED_S" "${urls[@]}" <<'PY'
import json, sys, time, urllib.request
token, n, rate, paced, urls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
turn = 0
def call(method, path, body=None, spread=False):
    global turn
    url = urls[turn % len(urls)] if spread else urls[0]
    turn += 1 if spread else 0
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"authorization": "Bearer " + token, "content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        text = r.read()
        return json.loads(text) if text else None
def drain(queue, started):
    while True:
        view = call("GET", f"/v1/queues/bench/{queue}")
        if view["messages"] == 0 and (len(urls) > 1 or view["batches_running"] == 0):
            return view, time.monotonic() - started
        time.sleep(0.02)

call("PUT", "/v1/queues/bench/burst", {"consumer": "consume", "batch_size": 100, "batch_wait_ms": 0, "concurrency": 4})
started = time.monotonic()
for i in range(0, n, 1000):
    call("POST", "/v1/queues/bench/burst/messages", {"messages": [{"body": f"keep:m{j}"} for j in range(i, min(n, i + 1000))]}, True)
sent = time.monotonic() - started
view, drained = drain("burst", started)
d = view["delivery_ms"]
print(f"burst: {n} messages sent in {sent:.2f} s, all handled in {drained:.2f} s: {n / drained:,.0f} messages/s "
      f"(acked {view['acked']}, retried {view['retried']}); send to consumer start p50 {d['p50']} ms, p99 {d['p99']} ms")

call("PUT", "/v1/queues/bench/paced", {"consumer": "consume", "batch_size": 100, "batch_wait_ms": 0, "concurrency": 4})
per_tick, tick = max(1, rate // 100), 0.01
started = time.monotonic()
total = 0
while time.monotonic() - started < paced:
    due = started + tick * (total // per_tick + 1)
    call("POST", "/v1/queues/bench/paced/messages", {"messages": [{"body": f"keep:p{total + j}"} for j in range(per_tick)]}, True)
    total += per_tick
    time.sleep(max(0.0, due - time.monotonic()))
offered = total / (time.monotonic() - started)
view, _ = drain("paced", started)
d = view["delivery_ms"]
print(f"paced: {total} messages at {offered:,.0f}/s offered: send to consumer start p50 {d['p50']} ms, p99 {d['p99']} ms "
      f"(acked {view['acked']}, retried {view['retried']})")
PY
