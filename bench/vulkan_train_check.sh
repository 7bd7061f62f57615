#!/usr/bin/env bash
# Numerical check of a Vulkan build on a GPU machine: the same `dino` binary (built with
# `--features vulkan`) trains 8 steps on the CPU and on the GPU, for a ViT and a ResNet, and the
# per-step losses are printed side by side (they should agree to float rounding).
#   bench/vulkan_train_check.sh PATH/TO/dino IMAGE_DIR   (IMAGE_DIR: >= 256 images)
# VK_ICD_FILENAMES defaults to nvidia_egl_icd.json (see bench/vulkan_check.sh).
set -u
bin="${1:?usage: bench/vulkan_train_check.sh PATH/TO/dino IMAGE_DIR}"
data="${2:?usage: bench/vulkan_train_check.sh PATH/TO/dino IMAGE_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
export VK_ICD_FILENAMES="${VK_ICD_FILENAMES:-$here/nvidia_egl_icd.json}"
out="$(mktemp -d)"
for arch in vit_micro resnet_micro; do
  for dev in cpu vulkan; do
    timeout 200 "$bin" train --device "$dev" --data "$data" --subset 256 --arch "$arch" --preset small --local_crops_number 2 \
      --out_dim 256 --batch_size_per_gpu 32 --epochs 1 --warmup_epochs 1 --lr 0.004 --output_dir "$out/${arch}_$dev" > "$out/${arch}_$dev.log" 2>&1
    echo "== $arch $dev: exit $?"
  done
  echo "loss per step: cpu | vulkan"
  paste -d' ' <(grep -o '"loss":[^,]*' "$out/${arch}_cpu/metrics.jsonl") <(grep -o '"loss":[^,]*' "$out/${arch}_vulkan/metrics.jsonl")
done
