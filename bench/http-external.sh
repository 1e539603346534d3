#!/usr/bin/env bash
# The gateway measured from outside: `wrk`, in its own process, against a
# release `quern serve` (gateway and worker) on SQLite, then on a fresh
# PostgreSQL database. Each path is measured beside the gateway's trivial
# route (`/health/live`) in the same run, so the figures say what the work of
# a path costs on this machine, not how fast the load generator is.
#
#   bash bench/http-external.sh            # 10 s per path, 32 connections
#   DURATION=20s CONNECTIONS=64 bash bench/http-external.sh
#   QUERN_BIN=/tmp/quern-before bash bench/http-external.sh   # a given build (A/B)
#
# Paths: GET /health/live; GET /v1/jobs/{id} (a completed job); POST /v1/jobs
# with an input whose result is cached (a lookup and a counted hit); POST
# /v1/jobs with a new input each time (an insert, the worker draining them).
# The per-IP rate limit is off and the per-user limit out of reach; each
# request carries a user token.
set -euo pipefail
cd "$(dirname "$0")/.."

duration="${DURATION:-10s}"
connections="${CONNECTIONS:-32}"
pg_url="${QUERN_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk; }
if [ -z "${QUERN_BIN:-}" ]; then
    cargo build --release --quiet -p quern
    QUERN_BIN=./target/release/quern
fi
[ -f handlers-dist/echo.wasm ] || cargo xtask build-handlers

work="$(mktemp -d)"
server=""
stop_server() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=""; }
trap 'stop_server; rm -rf "$work"' EXIT

# echo, made cacheable, is the one type served.
mkdir -p "$work/handlers"
cp handlers-dist/echo.wasm "$work/handlers/"
sed 's/^cacheable = false/cacheable = true/' handlers-dist/echo.toml >"$work/handlers/echo.toml"
secret="$(head -c 32 /dev/urandom | base64)"

cat >"$work/uncached.lua" <<'LUA'
-- A new input each request (a thread number and a counter): every enqueue is a miss.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"type":"echo","input":{"n":%d,"thread":%d}}', n, id)
  return wrk.format("POST", "/v1/jobs", nil, body)
end
LUA

# wrk's summary as one line: requests/s, p50, p99, non-2xx.
measure() {
    local label="$1"; shift
    local out
    out="$(wrk --latency -t 2 -c "$connections" -d "$duration" "$@")"
    local rps p50 p99 bad
    rps="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
    p50="$(awk '$1 == "50%" {print $2}' <<<"$out")"
    p99="$(awk '$1 == "99%" {print $2}' <<<"$out")"
    bad="$(awk '/Non-2xx/ {print $NF}' <<<"$out")"
    printf '  %-22s %10s req/s  p50 %8s  p99 %8s  non-2xx %s\n' "$label" "$rps" "$p50" "$p99" "${bad:-0}"
}

run_on() {
    local name="$1" database_url="$2" port
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    DATABASE_URL="$database_url" PORT="$port" QUERN_BIND=127.0.0.1 QUERN_JWT_SECRET="$secret" \
        QUERN_HANDLERS_DIR="$work/handlers" QUERN_DATA_DIR="$work/data-$name" QUERN_RATE_LIMIT_PER_MIN=0 \
        QUERN_MAX_ACTIVE_JOBS_PER_USER=1000000 WORKER_CONCURRENCY=10 QUERN_LOG=error \
        "$QUERN_BIN" serve >"$work/$name.log" 2>&1 &
    server=$!
    local base="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do curl -fs "$base/health/live" >/dev/null 2>&1 && break; sleep 0.1; done
    local token
    token="$(QUERN_JWT_SECRET="$secret" "$QUERN_BIN" token --user bench)"
    local auth="Authorization: Bearer $token" json="Content-Type: application/json"
    local cached='{"type":"echo","input":{"text":"arroz, feijão e bife"}}'
    local id
    id="$(curl -fs "$base/v1/jobs?wait=10" -H "$auth" -H "$json" -d "$cached" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')"
    echo "== $name ($(date -u +%FT%TZ)), $connections connections, $duration per path"
    measure "GET /health/live" "$base/health/live"
    measure "GET /v1/jobs/{id}" -H "$auth" "$base/v1/jobs/$id"
    measure "GET /health/live" "$base/health/live"
    printf 'wrk.method = "POST"\nwrk.body = [[%s]]\n' "$cached" >"$work/cached.lua"
    measure "POST /v1/jobs cached" -H "$auth" -H "$json" -s "$work/cached.lua" "$base/v1/jobs"
    measure "POST /v1/jobs uncached" -H "$auth" -H "$json" -s "$work/uncached.lua" "$base/v1/jobs"
    measure "GET /health/live" "$base/health/live"
    stop_server
}

run_on sqlite "sqlite://$work/quern.db"

database="quern_http_bench_$$"
psql "$pg_url" -qAtc "CREATE DATABASE $database" >/dev/null
run_on postgres "${pg_url%/*}/$database"
psql "$pg_url" -qAtc "DROP DATABASE $database" >/dev/null
