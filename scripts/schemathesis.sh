#!/usr/bin/env bash
# Property-based test of a live node against its OpenAPI description
# (crates/shoal-node/src/api/openapi.json) with Schemathesis.
#
# Starts `shoal serve` on a free loopback port with a fresh data directory
# (the example functions are deployed under tenant `demo`, the admin token
# is written to <data-dir>/admin.token), waits for /healthz, then runs
# Schemathesis with the admin token: every phase (examples, coverage,
# fuzzing, stateful), a few examples per operation, a time budget for the
# whole run. The node is stopped on exit.
#
# Checks: not_a_server_error, status_code_conformance,
# response_schema_conformance, content_type_conformance, ignored_auth (a
# route declaring bearer auth must refuse a request without it or with a
# wrong token), and `invoke_5xx_is_a_guest_failure` (below).
#
# Invoke and 5xx: a call whose guest fails is answered 500 (kind `trap`,
# `function_error` or `out_of_memory`) or 504 (kind `timeout`) by design —
# the function failed, not the platform (ARCHITECTURE.md, "How a call flows"). So for the invoke
# operation only, the generic not_a_server_error check is off and the
# custom check `invoke_5xx_is_a_guest_failure` takes its place: it fails on
# any invoke 5xx whose error kind is not one of those guest failures (e.g.
# `internal`), so a platform failure on the call path is still caught.
#
# Quotas and 507: a write past its tenant's quota is answered 507
# `limit_exceeded` by design — and the fuzzer sets `demo`'s limits too, so a
# state write may meet a quota of a few hundred bytes. So for the operations
# that document 507 (state and secret writes), not_a_server_error is off and
# `a_5xx_write_is_a_quota` takes its place: any other 5xx still fails.
#
# Expect one warning, "Schema validation mismatch" for the deploy: generated
# bodies are rarely valid wasm, so most deploys are refused with 422.
#
# Usage: scripts/schemathesis.sh [path/to/shoal]   (default target/debug/shoal)
# Env:   SCHEMATHESIS_MAX_TIME   time budget of the Schemathesis run, s (default 100)
#        SCHEMATHESIS_MAX_EXAMPLES  examples per operation and phase (default 25)
#        SCHEMATHESIS_SEED       a seed, to replay a run
#        SCHEMATHESIS_REPORT_DIR keep an NDJSON report (and the node's log) there
# Needs python3 (>= 3.11, for Schemathesis 4) and curl. Schemathesis is taken from PATH (`st` or
# `schemathesis`) if it is the pinned version, else installed into a venv
# under ${TMPDIR:-/tmp} (once; reused by later runs).
set -euo pipefail

ST_VERSION=4.32.5
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-target/debug/shoal}
[ -x "$bin" ] || { echo "no executable at $bin (build it, or pass the path of a shoal binary)" >&2; exit 2; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
spec=$repo/crates/shoal-node/src/api/openapi.json
max_time=${SCHEMATHESIS_MAX_TIME:-100}
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-25}

# --- Schemathesis at the pinned version -------------------------------------
st_version_of() { "$1" --version 2>/dev/null | awk '{print $NF}'; }
st=
for candidate in "$(command -v st || true)" "$(command -v schemathesis || true)"; do
  if [ -n "$candidate" ] && [ "$(st_version_of "$candidate")" = "$ST_VERSION" ]; then st=$candidate; break; fi
done
if [ -z "$st" ]; then
  venv=${TMPDIR:-/tmp}/shoal-schemathesis-$ST_VERSION
  if [ "$(st_version_of "$venv/bin/st")" != "$ST_VERSION" ]; then
    echo "installing schemathesis==$ST_VERSION into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
  fi
  st=$venv/bin/st
fi

# --- The node ----------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-schemathesis.XXXXXX")
node_pid=
st_pid=
cleanup() {
  local status=$?
  for pid in $st_pid $node_pid; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ] && [ -s "$work/node.log" ]; then
    echo "--- last lines of the node's log ---" >&2
    tail -n 20 "$work/node.log" >&2
  fi
  if [ -n "${SCHEMATHESIS_REPORT_DIR:-}" ] && [ -f "$work/node.log" ]; then
    mkdir -p "$SCHEMATHESIS_REPORT_DIR" && cp "$work/node.log" "$SCHEMATHESIS_REPORT_DIR/"
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
# The node's settings come from these flags only: no SHOAL_* from the caller's
# environment (a config file, an admin token, limits) leaks into the run.
(
  for var in $(compgen -e | grep '^SHOAL_' || true); do unset "$var"; done
  exec "$bin" serve --listen "127.0.0.1:$port" --data-dir "$work/data"
) >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 600); do
  if curl -fsS -o /dev/null "$url/healthz" 2>/dev/null; then break; fi
  kill -0 "$node_pid" 2>/dev/null || { echo "the node exited before serving" >&2; exit 1; }
  sleep 0.1
done
curl -fsS -o /dev/null "$url/healthz" || { echo "the node did not answer /healthz within 60 s" >&2; exit 1; }
token=$(cat "$work/data/admin.token")

# Removing functions is tested on a tenant of its own, `scratch`, holding
# the smallest valid command module under the examples' names:
# Schemathesis reuses names it has seen in responses, and deleting the
# `demo` functions would leave invoke nothing but 404s for the rest of the run.
printf '\x00asm\x01\x00\x00\x00\x01\x04\x01\x60\x00\x00\x03\x02\x01\x00\x07\x0a\x01\x06_start\x00\x00\x0a\x04\x01\x02\x00\x0b' >"$work/noop.wasm"
api() { curl -fsS -o /dev/null -H "Authorization: Bearer $token" "$@"; }
api -X POST --data '{"name":"scratch"}' "$url/v1/tenants"
for name in noop hello echo fib counter matvec wordcount fanout upper; do
  api -X PUT --data-binary "@$work/noop.wasm" "$url/v1/functions/scratch/$name"
done

# --- Schemathesis configuration ------------------------------------------------
cat >"$work/hooks.py" <<'PY'
import schemathesis

# A deploy's body is the wasm binary, as application/wasm or application/octet-stream.
schemathesis.serializer.alias("application/wasm", "application/octet-stream")

INVOKE = ("POST", "/v1/functions/{tenant}/{name}/invoke")
# What a failing guest is answered with, by design: not a platform failure.
GUEST_FAILURES = {500: {"trap", "function_error", "out_of_memory"}, 504: {"timeout"}}


@schemathesis.check
def invoke_5xx_is_a_guest_failure(ctx, response, case):
    """On invoke (where not_a_server_error is off), a 5xx must be a failure of the guest."""
    if (case.operation.method.upper(), case.operation.path) != INVOKE or response.status_code < 500:
        return None
    try:
        kind = response.json()["error"]["kind"]
    except Exception:
        kind = None
    if kind not in GUEST_FAILURES.get(response.status_code, set()):
        raise AssertionError(f"invoke answered {response.status_code} with error kind {kind!r}: a platform failure, "
                             "not a failure of the function")
    return None


QUOTA_WRITES = {("PUT", "/v1/state/{tenant}/{key}"), ("PUT", "/v1/tenants/{tenant}/secrets/{name}")}


@schemathesis.check
def a_5xx_write_is_a_quota(ctx, response, case):
    """On state and secret writes, a 5xx must be the tenant's quota (507 limit_exceeded)."""
    if (case.operation.method.upper(), case.operation.path) not in QUOTA_WRITES or response.status_code < 500:
        return None
    try:
        kind = response.json()["error"]["kind"]
    except Exception:
        kind = None
    if (response.status_code, kind) != (507, "limit_exceeded"):
        raise AssertionError(f"a write answered {response.status_code} with error kind {kind!r}: not a quota")
    return None
PY
cat >"$work/schemathesis.toml" <<TOML
hooks = "$work/hooks.py"
# One worker: concurrent workers crash Schemathesis' coverage phase on some
# CPython builds ("AST constructor recursion depth mismatch", CPython 3.11.7).
workers = 1
request-timeout = 20
continue-on-failure = true

# No project cache: it would be written to .schemathesis/ in the current
# directory (the checkout). Hypothesis's own files go to the temp directory
# (HYPOTHESIS_STORAGE_DIRECTORY, below), not to .hypothesis/ either.
[cache]
enabled = false

[auth.openapi.bearerAuth]
bearer = "\${SHOAL_SCHEMATHESIS_TOKEN}"

[generation]
database = "none"

[checks]
enabled = false
not_a_server_error = { enabled = true }
status_code_conformance = { enabled = true }
response_schema_conformance = { enabled = true }
content_type_conformance = { enabled = true }
ignored_auth = { enabled = true }
invoke_5xx_is_a_guest_failure = { enabled = true }
a_5xx_write_is_a_quota = { enabled = true }

# Names that exist, so calls reach the example functions (matvec is left
# out: its init builds a 16 MiB matrix) instead of mostly 404s.
[dictionaries.demo]
values = ["demo"]
[dictionaries.functions]
values = ["hello", "echo", "fib", "counter", "upper", "wordcount", "fanout", "noop"]

[[operations]]
include-operation-id = ["invokeFunction", "describeFunction", "getFunctionLogs"]
parameters = { "path.tenant" = { dictionary = "demo", probability = 0.7 }, "path.name" = { dictionary = "functions", probability = 0.7 } }

# See the top of this file: on invoke a 5xx may be the guest's failure.
[[operations]]
include-operation-id = "invokeFunction"
checks = { not_a_server_error = { enabled = false } }

# See the top of this file: a write may meet its tenant's quota.
[[operations]]
include-operation-id = ["putStateValue", "setSecret"]
checks = { not_a_server_error = { enabled = false } }

# A logs request may wait up to `wait` s for a new line: none here, so the
# run stays within its request timeout.
[[operations]]
include-operation-id = "getFunctionLogs"
parameters = { "query.wait" = 0 }

# See above: functions are removed from tenant scratch only.
[[operations]]
include-operation-id = "removeFunction"
parameters = { "path.tenant" = "scratch" }
TOML

args=(--url "$url" --max-examples "$max_examples" --max-time "$max_time")
[ -n "${SCHEMATHESIS_SEED:-}" ] && args+=(--seed "$SCHEMATHESIS_SEED")
[ -n "${SCHEMATHESIS_REPORT_DIR:-}" ] && args+=(--report ndjson --report-dir "$SCHEMATHESIS_REPORT_DIR")
# The spec is read from the file (the node serves the same bytes at
# /openapi.json, one of the operations checked).
echo "schemathesis $ST_VERSION against $bin at $url (max ${max_time}s, $max_examples examples per operation)" >&2
started=$(date +%s)
# In the background and waited for, so a signal to this script stops the run
# at once (bash runs traps only between foreground commands).
SHOAL_SCHEMATHESIS_TOKEN=$token HYPOTHESIS_STORAGE_DIRECTORY=$work/hypothesis \
  "$st" --config-file "$work/schemathesis.toml" run "$spec" "${args[@]}" &
st_pid=$!
status=0
wait "$st_pid" || status=$?
st_pid=
echo "schemathesis finished in $(( $(date +%s) - started )) s with status $status" >&2
exit "$status"
