#!/usr/bin/env bash
# Speed harness: the same DINO step (and feature extraction) in dino and in PyTorch, case by
# case, each in a fresh process, printed as a Markdown table (img/s, ratio, peak RSS).
#   bench/run.sh [quick]        (quick: the ViT-Ti/16 batch-8 cases and extraction only;
#                               --precision bf16 runs PyTorch under bf16 autocast)
#   bench/run.sh -- "CASE" ...  (just these cases, e.g. "--mode step --arch vit_small --batch 32 --out_dim 4096")
# Needs a venv with torch: python3 -m venv .venv-bench && .venv-bench/bin/pip install torch
# (override with PYTHON=...). FEATURES=... adds cargo features; CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv-bench/bin/python}"
cargo build --release --example bench ${FEATURES:+--features "$FEATURES"} >&2
ours="${CARGO_TARGET_DIR:-target}/release/examples/bench"
cases=(
  "--mode step --arch vit_tiny --patch 16 --batch 8 --out_dim 65536"
  "--mode step --arch vit_tiny --patch 16 --batch 8 --out_dim 65536 --precision bf16"
  "--mode step --arch vit_tiny --patch 16 --batch 8 --out_dim 4096"
  "--mode step --arch vit_tiny --patch 16 --batch 8 --out_dim 4096 --precision bf16"
  "--mode extract --arch vit_small --patch 16 --batch 64"
  "--mode extract --arch vit_small --patch 16 --batch 64 --precision bf16"
)
if [ "${1:-}" = -- ]; then
  shift
  cases=("$@")
elif [ "${1:-}" != quick ]; then
  cases+=(
    "--mode step --arch vit_tiny --patch 16 --batch 32 --out_dim 65536"
    "--mode step --arch vit_tiny --patch 16 --batch 32 --out_dim 4096"
    "--mode step --arch vit_small --patch 16 --batch 8 --out_dim 65536"
    "--mode step --arch vit_small --patch 16 --batch 8 --out_dim 4096"
    "--mode step --arch vit_small --patch 16 --batch 32 --out_dim 65536"
    "--mode step --arch vit_small --patch 16 --batch 32 --out_dim 4096"
  )
fi
field() { sed -E "s/.*\"$1\": ?([0-9.e+-]+).*/\1/"; }
echo "| case | PyTorch img/s | dino img/s | dino / PyTorch | PyTorch peak RSS MB | dino peak RSS MB |"
echo "|---|---|---|---|---|---|"
for c in "${cases[@]}"; do
  # shellcheck disable=SC2086
  py=$("$PYTHON" bench/dino_step.py $c | tail -1)
  # shellcheck disable=SC2086
  rs=$("$ours" $c | tail -1)
  echo "$c => $rs" >&2
  awk -v c="$c" -v p="$(echo "$py" | field img_per_s)" -v r="$(echo "$rs" | field img_per_s)" \
      -v pm="$(echo "$py" | field peak_rss_mb)" -v rm="$(echo "$rs" | field peak_rss_mb)" \
      'BEGIN { printf "| %s | %.2f | %.2f | %.2fx | %.0f | %.0f |\n", c, p, r, r / p, pm, rm }'
done
