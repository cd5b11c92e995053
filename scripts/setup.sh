#!/usr/bin/env bash
# What building Shoal needs besides Rust, installed where the build looks
# for it: the wasm targets, the pinned componentize-py (which builds the
# shared Python runtime) in a virtualenv under target/tools/python, and the
# pinned componentize-js (the shared JavaScript runtime) under
# target/tools/js. Needs python3 with venv, node with npm, and clang with
# wasi-libc (for C functions). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_JS_VERSION=0.23.0

rustup target add wasm32-wasip1 wasm32-wasip2

venv=target/tools/python
if ! "$venv/bin/componentize-py" --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION"; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "setup: python3 with venv is needed (Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
fi
js=target/tools/js
if [ "$("$js/node_modules/.bin/componentize-js" --version 2>/dev/null)" != "$COMPONENTIZE_JS_VERSION" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: node and npm are needed (Debian/Ubuntu: apt-get install nodejs npm)" >&2
    exit 1
  fi
  mkdir -p "$js"
  npm install --prefix "$js" --silent --no-audit --no-fund "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION"
fi
# clang with wasi-libc builds C functions (`shoal new c`; its test builds
# one). Checked, not installed: they come from the system's packages.
probe=$(mktemp -d)
if ! printf 'int main(void) { return 0; }\n' >"$probe/probe.c" ||
   ! clang --target=wasm32-wasi -o "$probe/probe.wasm" "$probe/probe.c" >/dev/null 2>&1; then
  rm -rf "$probe"
  echo "setup: clang, lld and wasi-libc are needed for C functions (Debian/Ubuntu: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 make)" >&2
  exit 1
fi
rm -rf "$probe"
echo "setup: wasm targets, componentize-py $COMPONENTIZE_PY_VERSION, componentize-js $COMPONENTIZE_JS_VERSION and clang for wasm32-wasi ready"
