#!/usr/bin/env bash
# Every benchmark BENCHMARKS.md reports, by one command; each part also runs
# alone. Each part's output goes to target/bench-results/COMMIT/PART.txt
# behind a header naming the commit, the date and the machine (paste them
# with the table).
#
#   scripts/bench.sh                 # every part, full size (hours on 2 cores)
#   scripts/bench.sh http memory     # only these parts
#   scripts/bench.sh --short         # every part once, small counts, on the
#                                    # debug build the tests made (CI: it
#                                    # checks the suite runs, not the numbers)
#   scripts/bench.sh --list          # the parts and what each runs
#
# Parts:
#   cold-start  criterion: a fresh sandbox per call (Rust, wasip1, snapshot,
#               Python and JavaScript with and without a kept memory)
#   languages   criterion: Python and JavaScript functions, memory per function
#   state       criterion: the local tier, Redis, a data-intensive function
#   chain       criterion: chained calls, fan-out, map-reduce
#   scale       criterion: 1,000 functions, memory per function, restart
#   cluster     criterion: forwarding, propagation, Redis bookkeeping
#   policy      criterion: the scheduling policy's cost per call, beside 1 and
#               10,000 tenants seen
#   http        end to end over HTTP beside `wasmtime serve` and native hyper
#               (scripts/bench-http.sh; the peers are built when missing)
#   memory      start-up and idle memory (scripts/bench-memory.sh)
#   queues      messages through a consumer, one node and three on Redis
#               (scripts/bench-queues.sh)
#   overload    `shoal bench`: no collapse past capacity (pinned)
#   flat        `shoal bench`: N functions, 1 to 1,000: N names of one binary,
#               then N distinct binaries, then 1 against 1,000 distinct
#               (pinned, three runs)
#   slicing     `shoal bench`: no-op calls beside `fib(38)` calls
#   fairness    `shoal bench`: two tenants, one offering 10x (pinned), and
#               again with the node's core shared with a spinning process
#   noisy       `shoal bench --noisy`: a victim beside each attacker
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_PARTS="cold-start languages state chain scale cluster policy http memory queues overload flat slicing fairness noisy"
short=0
parts=()
for arg in "$@"; do
    case "$arg" in
        --short) short=1 ;;
        --list) sed -n '/^# Parts:/,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        -*) echo "bench.sh: unknown flag $arg" >&2; exit 2 ;;
        *)
            [[ " $ALL_PARTS " == *" $arg "* ]] || { echo "bench.sh: no part $arg (--list)" >&2; exit 2; }
            parts+=("$arg")
            ;;
    esac
done
[ ${#parts[@]} -gt 0 ] || read -r -a parts <<<"$ALL_PARTS"
unset RUST_BACKTRACE

commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- crates guests wit Cargo.toml Cargo.lock scripts || commit="$commit-dirty"
out=target/bench-results/$commit
[ $short = 1 ] && out=target/bench-results/short-$commit
mkdir -p "$out"

machine="$(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"

if [ $short = 1 ]; then
    # The debug build `cargo test --workspace --all-targets` made (a
    # `cargo build` of the binary alone would unify features otherwise and
    # build much again).
    [ -x target/debug/shoal ] || cargo build -q --bin shoal
    shoal=target/debug/shoal
    export SHOAL_BIN=$shoal SHOAL_BINS=$shoal
    # Where the tests' nodes compiled this build's language runtimes.
    export SHOAL_RUNTIME_CACHE=${SHOAL_RUNTIME_CACHE:-$PWD/target/tmp/runtime-cache}
else
    cargo build --release -q -p shoal-cli
    shoal=target/release/shoal
    export SHOAL_BIN=$shoal SHOAL_BINS=$shoal
fi
abs_shoal=$(realpath "$shoal")

# A criterion bench: measured in full; in short mode each benchmark runs
# once, in the debug build (the workspace's, so nothing builds again).
criterion() { # crate bench [criterion args...]
    local crate=$1 bench=$2
    shift 2
    if [ $short = 1 ]; then
        cargo test -q --workspace --bench "$bench"
    else
        cargo bench -p "$crate" --bench "$bench" -- "$@"
    fi
}

# `shoal bench` with its results under $out/$1.
shoal_bench() { # name [args...]
    local name=$1
    shift
    "$abs_shoal" bench --out "$out/$name" "$@"
}

run_part() {
    case "$1" in
        cold-start) criterion shoal-runtime cold_start --warm-up-time 2 --measurement-time 8 ;;
        languages) criterion shoal-runtime languages ;;
        state) criterion shoal-runtime state ;;
        chain) criterion shoal-node chain ;;
        scale) criterion shoal-node scale ;;
        policy) criterion shoal-sched policy ;;
        cluster)
            criterion shoal-node cluster
            criterion shoal-cluster bookkeeping
            ;;
        http)
            if [ $short = 1 ]; then
                PEERS=0 CONNS=4 PARTS="invoke http" scripts/bench-http.sh 1s
            else
                scripts/bench-http.sh 10s
            fi
            ;;
        memory)
            if [ $short = 1 ]; then ROUNDS=1 IDLE_S=1 scripts/bench-memory.sh; else scripts/bench-memory.sh; fi
            ;;
        queues)
            if [ $short = 1 ]; then
                N=2000 RATE=200 PACED_S=1 scripts/bench-queues.sh
            else
                scripts/bench-queues.sh
                NODES=3 scripts/bench-queues.sh
            fi
            ;;
        overload)
            if [ $short = 1 ]; then
                shoal_bench overload --functions 1 --workload cpu --fib 20 --rates 50 --duration 1s
            else
                taskset -c 0 "$abs_shoal" bench --node-cpus 1 --functions 1 --workload cpu --fib 27 \
                    --rates 250,500,750,1000,1500,2000 --duration 10s --out "$out/overload"
            fi
            ;;
        flat)
            if [ $short = 1 ]; then
                shoal_bench sweep --functions 1,10 --rates 200 --duration 1s --connections 64
                shoal_bench distinct --distinct --functions 1,10 --rates 200 --duration 1s --connections 64
            else
                shoal_bench sweep --functions 1,10,100,1000 --rates 5000,10000,15000,20000,30000,40000 \
                    --duration 4s --connections 512
                # Each function its own code (as a provider's are).
                shoal_bench distinct --distinct --functions 1,10,100,1000 --rates 2000,5000,10000 \
                    --duration 4s --connections 512
                # Item 7's comparison: pinned, N = 1 against 1,000 distinct
                # at ~50% and ~80% of N = 1,000's capacity, three runs.
                for run in 1 2 3; do
                    taskset -c 0 "$abs_shoal" bench --distinct --node-cpus 1 --functions 1,1000 \
                        --rates 5000,8000 --duration 6s --connections 512 --timeline \
                        --out "$out/flat-pinned-$run"
                done
            fi
            ;;
        slicing)
            if [ $short = 1 ]; then
                shoal_bench slicing --functions 1 --rates 100 --duration 1s --background-rate 1 --background-fib 25
            else
                shoal_bench slicing-alone --functions 1 --rates 1000 --duration 10s
                shoal_bench slicing-with-cpu-2 --functions 1 --rates 1000 --duration 10s \
                    --background-rate 2 --background-fib 38
            fi
            ;;
        fairness)
            if [ $short = 1 ]; then
                shoal_bench fairness --functions 2 --workload cpu --fib 20 --skew 10 --rates 110 --duration 1s
            else
                taskset -c 0 "$abs_shoal" bench --node-cpus 1 --functions 1 --workload cpu --fib 27 \
                    --rates 100,200 --duration 30s --out "$out/fairness-alone"
                taskset -c 0 "$abs_shoal" bench --node-cpus 1 --functions 2 --workload cpu --fib 27 \
                    --skew 10 --rates 1100,2200 --duration 30s --out "$out/fairness"
                # The node's core shared with a process spinning at the
                # calls' nice (10): queues drain slower than the cores
                # alone would let them, and admission has to see it.
                echo "fairness: the node's core shared with a spinning process at nice 10"
                taskset -c 1 nice -n 10 sh -c 'while :; do :; done' &
                spinner=$!
                rc=0
                taskset -c 0 "$abs_shoal" bench --node-cpus 1 --functions 2 --workload cpu --fib 27 \
                    --skew 10 --rates 2200 --duration 30s --out "$out/fairness-shared-core" || rc=$?
                kill "$spinner"
                [ $rc = 0 ]
            fi
            ;;
        noisy)
            if [ $short = 1 ]; then
                shoal_bench noisy --noisy --duration 1s
            else
                shoal_bench noisy --noisy --duration 10s
            fi
            ;;
    esac
}

failed=()
for part in "${parts[@]}"; do
    file=$out/$part.txt
    {
        echo "# $part: commit $commit, $(date -u '+%Y-%m-%d %H:%M UTC'), $machine$([ $short = 1 ] && echo ', short mode (debug build, small counts: not numbers to report)')"
    } > "$file"
    echo "== $part (-> $file)"
    start=$(date +%s)
    if run_part "$part" >> "$file" 2>&1; then
        echo "   done in $(( $(date +%s) - start )) s"
    else
        echo "   FAILED after $(( $(date +%s) - start )) s; the end of $file:"
        tail -20 "$file" | sed 's/^/   /'
        failed+=("$part")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench.sh: failed: ${failed[*]}" >&2
    exit 1
fi
