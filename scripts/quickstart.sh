#!/usr/bin/env bash
# The main job on a fresh machine: get Fashion-MNIST (Debian package) if it is missing, pretrain
# a small ViT with DINO on it for a few minutes (`--preset quick`, schedules planned for the time
# budget), then compare the teacher's 20-NN top-1 with an untrained network of the same shape
# and with raw pixels, on the same 10000 train / 2000 test images (drawn per class).
# Usage: scripts/quickstart.sh [minutes] [extra dino train flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-5}
shift || true
data=/usr/share/datasets/fashion-mnist
out=runs/fashion-mnist
if [ ! -d "$data" ]; then
  echo "installing dataset-fashion-mnist (needs root)"
  apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }
fi
cargo build --release
dino=target/release/dino
# A new run each time: an earlier one is kept under its start time.
if [ -e "$out" ]; then
  mv "$out" "$out.$(date -r "$out/config.json" +%Y%m%d-%H%M%S 2>/dev/null || date +%s)"
fi
"$dino" train --data "$data" --preset quick --output_dir "$out" --max_minutes "$minutes" "$@"

# The network the run trained, for the untrained baseline of the same shape.
setting() { sed -n "s/^ *\"$1\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$out/config.json"; }
arch=$(setting arch)
patch=$(setting patch_size)
size=$(setting global_crop_size)
top1() { "$dino" knn --data_path "$data" --center_crop 1 --subset_train 10000 --subset_test 2000 --nb_knn 20 "$@" 2>/dev/null | sed -n 's/.*Top1: \([0-9.]*\).*/\1/p'; }
trained=$(top1 --checkpoint "$out/checkpoint.safetensors")
trained_mean=$(top1 --checkpoint "$out/checkpoint.safetensors" --pooling mean)
untrained=$(top1 --random_init --arch "$arch" --patch_size "$patch" --image_size "$size")
pixels=$(top1 --pixels --image_size "$size")
echo
echo "20-NN top-1 on Fashion-MNIST (10000 train / 2000 test images):"
printf "  %-44s %6s%%\n" "DINO teacher after $minutes min ($arch/$patch)" "$trained" \
  "  with the mean patch token (--pooling mean)" "$trained_mean" \
  "the same network untrained" "$untrained" "raw pixels" "$pixels"
echo "logs, plot and checkpoint: $out (log.txt, training.png, checkpoint.safetensors)"
