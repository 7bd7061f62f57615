#!/usr/bin/env bash
# The Fashion-MNIST benchmark of BENCHMARKS.md: one training plan run for 10, then 20 more,
# then 30 more minutes (automatic resume continues the same schedule), the checkpoint kept
# after each stage, then the weighted 20-NN accuracy of each on the full 60k/10k split.
# Usage: scripts/bench_fashion_mnist.sh [OUTPUT_DIR]   (default runs/bench-fmnist)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench-fmnist}"
data=/usr/share/datasets/fashion-mnist
cargo build --release >&2
dino=target/release/dino
train=(train --data "$data" --output_dir "$out" --preset small --arch vit_micro --patch_size 7
  --local_crop_size 14 --local_crops_number 2 --out_dim 1024 --head_hidden_dim 512
  --head_bottleneck_dim 128 --norm_last_layer false --momentum_teacher 0.99
  --batch_size_per_gpu 256 --lr 0.0005 --warmup_epochs 1 --epochs 12 --drop_path_rate 0)
elapsed=0
for minutes in 10 20 30; do
  elapsed=$((elapsed + minutes))
  "$dino" "${train[@]}" --max_minutes "$minutes"
  cp "$out/checkpoint.safetensors" "$out/after-${elapsed}min.safetensors"
done
echo "raw pixels: $("$dino" knn --pixels --image_size 28 --center_crop 1 --nb_knn 20 | tail -1)"
echo "random ViT: $("$dino" knn --random_init --arch vit_micro --patch_size 7 --image_size 28 --center_crop 1 --nb_knn 20 | tail -1)"
for m in 10 30 60; do
  echo "DINO after $m min: $("$dino" knn --weights "$out/after-${m}min.safetensors" --center_crop 1 --nb_knn 20 | tail -1)"
done
