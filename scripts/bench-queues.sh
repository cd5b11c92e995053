#!/usr/bin/env bash
# Queues end to end on one node (release build, the embedded store): a
# burst of N messages sent 1,000 per request and drained by the test
# consumer (batches of 100, 4 at once, a durable state write per batch;
# `keep:` bodies, which it never asks to retry),
# then RATE messages/s for PACED_S seconds with batches sent as soon as
# they are ready (batch_wait 0). Prints messages/s drained and the
# queue's send-to-consumer-start p50/p99 as the node measured them.
#
#   scripts/bench-queues.sh            # N=100000 RATE=2000 PACED_S=10
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
RATE=${RATE:-2000}
PACED_S=${PACED_S:-10}
cargo build --release -q -p shoal-cli
cargo build -q -p shoal-guests
CONSUMER=target/guests/wasm32-wasip2/release/queue_consumer.wasm
SHOAL=target/release/shoal
dir=$(mktemp -d)
trap 'kill $node 2>/dev/null || true; rm -rf "$dir"' EXIT
(cd "$dir" && exec "$OLDPWD/$SHOAL" serve --listen 127.0.0.1:0 --no-examples 2> serve.log) &
node=$!
for _ in $(seq 1 600); do
    url=$(grep -o 'serving http://[0-9.:]*' "$dir/serve.log" | head -1 | cut -d' ' -f2 || true)
    [ -n "$url" ] && break
    sleep 0.1
done
export SHOAL_URL=$url SHOAL_DATA_DIR=$dir/.shoal
token=$(cat "$dir/.shoal/admin.token")
$SHOAL tenant create bench > /dev/null
$SHOAL deploy bench/consume "$CONSUMER" > /dev/null
echo "commit $(git rev-parse --short HEAD), $(date -u +%FT%TZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

python3 - "$url" "$token" "$N" "$RATE" "$PACED_S" <<'PY'
import json, sys, time, urllib.request
url, token, n, rate, paced = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"authorization": "Bearer " + token, "content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        text = r.read()
        return json.loads(text) if text else None
def drain(queue, started):
    while True:
        view = call("GET", f"/v1/queues/bench/{queue}")
        if view["messages"] == 0 and view["batches_running"] == 0:
            return view, time.monotonic() - started
        time.sleep(0.02)

call("PUT", "/v1/queues/bench/burst", {"consumer": "consume", "batch_size": 100, "batch_wait_ms": 0, "concurrency": 4})
started = time.monotonic()
for i in range(0, n, 1000):
    call("POST", "/v1/queues/bench/burst/messages", {"messages": [{"body": f"keep:m{j}"} for j in range(i, min(n, i + 1000))]})
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
    call("POST", "/v1/queues/bench/paced/messages", {"messages": [{"body": f"keep:p{total + j}"} for j in range(per_tick)]})
    total += per_tick
    time.sleep(max(0.0, due - time.monotonic()))
offered = total / (time.monotonic() - started)
view, _ = drain("paced", started)
d = view["delivery_ms"]
print(f"paced: {total} messages at {offered:,.0f}/s offered: send to consumer start p50 {d['p50']} ms, p99 {d['p99']} ms "
      f"(acked {view['acked']}, retried {view['retried']})")
PY
