#!/usr/bin/env bash
# The OpenAPI document against the server it describes: schemathesis runs
# every check (`--checks all`) as a service caller against `quern serve` on
# SQLite and on a fresh PostgreSQL database. Any undocumented status, any
# response off its schema, any schema-valid request refused or schema-violating
# one accepted, any 5xx but the documented 503 (`.ci/schemathesis.toml`),
# fails. Needs the handlers built and target/debug/quern (both there after
# `cargo xtask test`).
#
# One exception: two values no schema can state are rightly refused when made
# up, a handler component (it must be WebAssembly of the handler world that
# compiles) and a page `cursor` (it must be one this server gave out). Their
# two operations run every check but `positive_data_acceptance`, in a second
# pass (schemathesis 4.x did not honour that check's settings per operation
# in its config file).
#
# Strings with NUL are not generated: PostgreSQL's text and jsonb cannot hold
# them, and quern refuses them with 400 `invalid_input` on both databases.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import schemathesis' 2>/dev/null || python3 -m pip install --quiet schemathesis
# The interpreter's own script (a fresh pyenv may not have its shim yet).
st="$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/schemathesis"
[ -x "$st" ] || st=schemathesis

pg_admin=${QUERN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
work=$(mktemp -d)
pid=
database=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    [ -n "$database" ] && psql "$pg_admin" -qc "DROP DATABASE IF EXISTS $database" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# schemathesis_run <name> <port> <schemathesis options…>
schemathesis_run() {
    local name=$1 port=$2
    shift 2
    "$st" --config-file .ci/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" --wait-for-schema 60 \
        -H "Authorization: Bearer $(cat "$work/$name/token")" --generation-allow-x00 false \
        --max-examples 25 --workers 1 --seed 20261204 "$@" \
        || { echo "schemathesis failed on $name; quern's log:"; tail -n 50 "$work/$name/quern.log"; exit 1; }
}

# fuzz <name> <DATABASE_URL or empty for SQLite> <port>
fuzz() {
    local name=$1 url=$2 port=$3
    echo "== schemathesis --checks all on $name"
    mkdir -p "$work/$name"
    (
        export QUERN_DATA_DIR="$work/$name/data" QUERN_HANDLERS_DIR=handlers-dist
        export QUERN_JWT_SECRET="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
        export PORT=$port QUERN_BIND=127.0.0.1 QUERN_RATE_LIMIT_PER_MIN=0 QUERN_MAX_ACTIVE_JOBS_PER_USER=0
        if [ -n "$url" ]; then export DATABASE_URL="$url"; else unset DATABASE_URL; fi
        ./target/debug/quern serve >"$work/$name/stdout" 2>"$work/$name/quern.log" &
        echo $! >"$work/$name/pid"
        ./target/debug/quern token --user schemathesis --role service_role >"$work/$name/token"
    )
    pid=$(cat "$work/$name/pid")
    # Every check on every operation but the two with values no schema can
    # state; on those two, every check but positive acceptance.
    local opaque=(--include-name "GET /v1/jobs" --include-name "POST /v1/handlers/{type}/versions")
    local rest=(--exclude-name "GET /v1/jobs" --exclude-name "POST /v1/handlers/{type}/versions")
    schemathesis_run "$name" "$port" --checks all "${rest[@]}"
    schemathesis_run "$name" "$port" --checks all --exclude-checks positive_data_acceptance "${opaque[@]}"
    kill "$pid" 2>/dev/null || true
    pid=
}

fuzz sqlite "" 39517

database="quern_schemathesis_$$"
psql "$pg_admin" -qc "CREATE DATABASE $database"
fuzz postgres "${pg_admin%/*}/$database" 39518
