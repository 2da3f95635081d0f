#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds (default 30) from its committed seed corpus.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
# One target directory for every fuzz project: they share most dependencies (built with the
# sanitizer flags once, not once per crate).
target_dir="$PWD/target/fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: installing it (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi
for dir in crates/*/fuzz; do
  [ -d "$dir" ] || continue
  for target in $(cd "$dir" && RUSTC_BOOTSTRAP=1 cargo fuzz list); do
    corpus="$dir/corpus/$target"
    work=$(mktemp -d)
    cp -r "$corpus"/. "$work"/ 2>/dev/null || true
    echo "== fuzz $dir $target for ${secs}s (seed corpus: $(ls "$corpus" | wc -l) files)"
    (cd "$dir" && RUSTC_BOOTSTRAP=1 cargo fuzz run --target-dir "$target_dir" "$target" "$work" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=0 2>&1 | tail -n 3)
    rm -rf "$work"
  done
done
echo "fuzz smoke: all targets ran without a crash"
