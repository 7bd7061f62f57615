#!/usr/bin/env bash
# The main job on a fresh machine: get Fashion-MNIST (Debian package) if it is missing, then
# pretrain a ViT-Tiny/4 with DINO on it with the small-image preset for a few minutes.
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
echo "logs, plot and checkpoint: runs/fashion-mnist (log.txt, training.png, checkpoint.safetensors)"
