#!/usr/bin/env bash
# The Fashion-MNIST benchmark of BENCHMARKS.md: three separate runs of the hour's recipe
# (`--preset hour`; PRESET=quick for the quickstart's), each with its schedules planned for its
# own budget of 10, 30 and 60 minutes, then the weighted 20-NN top-1 of each teacher (cls
# token, and with the mean patch token) on the full 60k/10k split, next to the same network
# untrained and raw pixels.
# Usage: [PRESET=hour|quick] bench/fashion_mnist.sh [OUTPUT_DIR] [extra dino train flags...]
#        (default OUTPUT_DIR runs/bench-fmnist; takes 100 minutes plus evaluation)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench-fmnist}"
shift || true
data=/usr/share/datasets/fashion-mnist
preset="${PRESET:-hour}"
cargo build --release >&2
dino=target/release/dino
knn=(knn --data_path "$data" --center_crop 1 --nb_knn 20)
for minutes in 10 30 60; do
  run="$out/${minutes}min"
  rm -rf "$run"
  "$dino" train --data "$data" --output_dir "$run" --preset "$preset" --max_minutes "$minutes" "$@"
done
config="$out/10min/config.json"
setting() { sed -n "s/^ *\"$1\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$config"; }
echo "raw pixels: $("$dino" "${knn[@]}" --pixels --image_size 28 | tail -1)"
echo "untrained: $("$dino" "${knn[@]}" --random_init --arch "$(setting arch)" --patch_size "$(setting patch_size)" --image_size 28 | tail -1)"
for minutes in 10 30 60; do
  for pooling in cls mean; do
    echo "DINO ($preset) after $minutes min, --pooling $pooling: $("$dino" "${knn[@]}" --weights "$out/${minutes}min/checkpoint.safetensors" --pooling "$pooling" | tail -1)"
  done
done
