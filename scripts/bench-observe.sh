#!/usr/bin/env bash
# What metering and tracing cost a call: Shoal's no-op invoke (POST "world"
# to demo/hello, wrk at 64 connections, scripts/bench-http.sh) with the
# build before usage metering (PARENT, default 571b0fb) and the current one
# with tracing off, 1% sampled and 100% sampled, alternated ROUNDS times
# (default 3) in one session. The spans go to native-http on loopback, a
# sink that answers every POST with 200 without decoding it (it runs on the
# same cores: its CPU is counted against the traced runs).
#
# Usage: [PARENT=commit] [ROUNDS=3] [CONNS="64"] scripts/bench-observe.sh [duration, default 10s]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
parent=${PARENT:-571b0fb}
rounds=${ROUNDS:-3}
export CONNS=${CONNS:-64}
bins=target/bench-observe
mkdir -p "$bins"

cargo build --release --bin shoal >/dev/null 2>&1
cp target/release/shoal "$bins/shoal-head"
cargo build --release -p shoal-testkit --bin native-http >/dev/null 2>&1
if [ ! -x "$bins/shoal-$parent" ]; then
  # The parent's sources in a worktree, built in this target directory
  # (its dependencies are shared; only Shoal's crates build again).
  tree=$(mktemp -d)
  git worktree add --detach "$tree" "$parent" >/dev/null
  # Its guests and runtimes are built with this checkout's tools (and the
  # guests' sources must be the same: the script says if not).
  git diff --quiet "$parent" HEAD -- guests wit crates/shoal-guests || echo "note: the guests changed since $parent" >&2
  mkdir -p "$tree/target"
  ln -s "$PWD/target/tools" "$tree/target/tools"
  ln -s "$PWD/target/guests" "$tree/target/guests"
  (cd "$tree" && CARGO_TARGET_DIR="$OLDPWD/target" cargo build --release --bin shoal >/dev/null 2>&1)
  cp target/release/shoal "$bins/shoal-$parent"
  git worktree remove --force "$tree"
  # Put the current build back. The parent's crates were built into the
  # same units, later than this checkout's sources were written: touch
  # those, or cargo would take the parent's artifacts as fresh.
  find crates -name '*.rs' -exec touch {} +
  cargo build --release --bin shoal >/dev/null 2>&1
fi

target/release/native-http 127.0.0.1:18495 >/dev/null 2>&1 &
sink=$!
trap 'kill $sink 2>/dev/null || true' EXIT
otlp=http://127.0.0.1:18495

echo "# observe: $(git rev-parse --short HEAD) vs $parent, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), wrk $duration, $CONNS connections"
for round in $(seq "$rounds"); do
  for variant in parent off 1% 100%; do
    case $variant in
      parent) bin=$bins/shoal-$parent args="" ;;
      off) bin=$bins/shoal-head args="" ;;
      1%) bin=$bins/shoal-head args="--otlp-endpoint $otlp --trace-sample 0.01" ;;
      100%) bin=$bins/shoal-head args="--otlp-endpoint $otlp --trace-sample 1" ;;
    esac
    printf 'round %s %-7s ' "$round" "$variant"
    SHOAL_BIN=$bin SHOAL_ARGS=$args PARTS=invoke PEERS=0 scripts/bench-http.sh "$duration" | grep -v '^#'
  done
done
