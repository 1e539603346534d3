#!/usr/bin/env bash
# The layers' arrows (ARCHITECTURE.md), checked with `cargo tree`: runtime and
# store depend on no other quern crate, api depends on queue, nothing depends
# on the binary, and no handler crate's build or tests pull in sqlx, axum or
# jsonwebtoken (their harness is quern-testing, on the runtime alone).
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
deps_of() { # the quern crates a package depends on directly (normal dependencies)
    cargo tree --locked -p "$1" -e normal --prefix none --depth 1 | grep -oE '^quern[a-z-]*' | grep -vx "$1" | sort -u | tr '\n' ' ' || true
}
expect() { # package, its quern dependencies exactly
    local got
    got=$(deps_of "$1")
    if [ "$got" != "$2" ]; then
        echo "error: $1 depends on [${got% }], the architecture allows [${2% }]"
        fail=1
    else
        echo "ok: $1 -> [${got% }]"
    fi
}
expect quern-runtime ""
expect quern-store ""
expect quern-queue "quern-runtime quern-store "
expect quern-api "quern-queue quern-runtime quern-store "
expect quern-testing "quern-runtime "

# `cargo tree -i quern` lists the binary and whatever depends on it.
dependents=$(cargo tree --locked -i quern --workspace -e normal,dev,build --prefix none | sort -u | grep -v '^quern v' || true)
if [ -n "$dependents" ]; then
    echo "error: crates depend on the quern binary crate: $dependents"
    fail=1
else
    echo "ok: nothing depends on the quern binary crate"
fi

for manifest in handlers/*/Cargo.toml handlers/fixtures/*/Cargo.toml; do
    package=$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -n1)
    heavy=$(cargo tree --locked -p "$package" -e normal,dev --prefix none | grep -oE '^(sqlx|axum|jsonwebtoken) ' | sort -u | tr -d ' ' | tr '\n' ' ' || true)
    if [ -n "$heavy" ]; then
        echo "error: handler crate $package pulls in ${heavy% } (its tests should depend on quern-testing alone)"
        fail=1
    fi
done
[ "$fail" = 0 ] && echo "ok: no handler crate pulls in sqlx, axum or jsonwebtoken"
exit "$fail"
