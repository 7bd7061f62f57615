#!/usr/bin/env bash
# Before/after of one change: two builds of `bench/bench.rs` run one after the other per
# round (three rounds per case), so a drifting machine affects both alike; prints img/s.
#   bench/ab.sh BEFORE_BINARY AFTER_BINARY "CASE" ...
#   e.g. bench/ab.sh /tmp/bench_before target/release/examples/bench "--mode extract --arch vit_small --patch 16 --batch 64"
# Build the "before" binary from the parent commit (git worktree, or checkout of src/ and
# bench/ then `cargo build --release --example bench`) and copy it out of target/ first.
set -euo pipefail
before=$1 after=$2
shift 2
rate() { "$1" $2 | tail -1 | sed -E 's/.*"img_per_s": ?([0-9.]+).*/\1/'; }
echo "| case | before img/s | after img/s |"
echo "|---|---|---|"
for c in "$@"; do
  for _ in 1 2 3; do
    echo "| $c | $(rate "$before" "$c") | $(rate "$after" "$c") |"
  done
done
