#!/usr/bin/env bash
# A Rust file over 400 lines says why in its opening comment (the words
# "400 lines" in its first 25 lines), so a module that grows past the size
# one reads at a sitting is split or explained, never just left to grow.
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
while IFS= read -r file; do
    lines=$(wc -l < "$file")
    if [ "$lines" -gt 400 ] && ! head -n 25 "$file" | grep -q '400 lines'; then
        echo "error: $file has $lines lines and its opening comment does not say why (split it, or say why in \"… over 400 lines on purpose: …\")"
        fail=1
    fi
done < <(git ls-files '*.rs')
[ "$fail" -eq 0 ] && echo "ok: every Rust file over 400 lines says why"
exit "$fail"
