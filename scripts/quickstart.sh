#!/usr/bin/env bash
# The main job on a fresh machine: get Fashion-MNIST (Debian package) if it is missing, then
# pretrain a ViT-Tiny/4 with DINO on it with the small-image preset for a few minutes, and
# report the teacher's k-NN accuracy (on 10000 train / 2000 test images, to stay quick).
# Usage: scripts/quickstart.sh [minutes] [extra dino train flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-5}
shift || true
data=/usr/share/datasets/fashion-mnist
if [ ! -d "$data" ]; then
  echo "installing dataset-fashion-mnist (needs root)"
  apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }
fi
cargo run --release -- train --data "$data" --preset small --output_dir runs/fashion-mnist \
  --max_minutes "$minutes" "$@"
cargo run --release -- knn --checkpoint runs/fashion-mnist/checkpoint.safetensors --center_crop 1 \
  --subset_train 10000 --subset_test 2000 --nb_knn 20
echo "logs, plot and checkpoint: runs/fashion-mnist (log.txt, training.png, checkpoint.safetensors)"
