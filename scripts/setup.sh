#!/usr/bin/env bash
# What building Shoal needs besides Rust, installed where the build looks
# for it: the wasm targets, and the pinned componentize-py (which builds the
# shared Python runtime) in a virtualenv under target/tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPONENTIZE_PY_VERSION=0.25.1

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
echo "setup: wasm targets and componentize-py $COMPONENTIZE_PY_VERSION ready"
