#!/usr/bin/env bash
# Hostile input against a running `quern serve`: schemathesis generates
# requests from /openapi.json (a user's token, so every route is reached as
# an application would) and fails on any 5xx. Needs the handlers built and
# target/debug/quern (both there after `cargo xtask test`).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import schemathesis' 2>/dev/null || python3 -m pip install --quiet schemathesis
# The interpreter's own script (a fresh pyenv may not have its shim yet).
st="$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/schemathesis"
[ -x "$st" ] || st=schemathesis
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
export QUERN_DATA_DIR="$work/data" QUERN_HANDLERS_DIR=handlers-dist QUERN_JWT_SECRET="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export PORT=39517 QUERN_BIND=127.0.0.1 QUERN_RATE_LIMIT_PER_MIN=0 QUERN_MAX_ACTIVE_JOBS_PER_USER=0
./target/debug/quern serve >"$work/stdout" 2>"$work/quern.log" &
pid=$!
token=$(./target/debug/quern token --user schemathesis)
"$st" run "http://127.0.0.1:$PORT/openapi.json" --wait-for-schema 60 \
    -H "Authorization: Bearer $token" --checks not_a_server_error --max-examples 40 --workers 2 --seed 20261123 \
    || { echo "schemathesis found server errors; quern's log:"; tail -n 50 "$work/quern.log"; exit 1; }
