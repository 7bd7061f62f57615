#!/usr/bin/env bash
# GPU check for a machine without Rust: runs a Vulkan build of examples/bench (built elsewhere with
# `CARGO_TARGET_DIR=target-vulkan cargo build --release --features vulkan --example bench`).
#   bench/vulkan_check.sh PATH/TO/bench
# In containers whose NVIDIA driver exposes Vulkan only through the headless EGL library (the
# lent H100/H200 machines: libGLX_nvidia.so.0 gives no vkCreateInstance), point the loader at
# nvidia_egl_icd.json. A machine without a Vulkan loader needs libvulkan.so.1 (Debian
# libvulkan1) on LD_LIBRARY_PATH.
set -u
bin="${1:?usage: bench/vulkan_check.sh PATH/TO/bench}"
here="$(cd "$(dirname "$0")" && pwd)"
export VK_ICD_FILENAMES="${VK_ICD_FILENAMES:-$here/nvidia_egl_icd.json}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -2
# The first run compiles the shaders (about 35 s on an H200).
VK_LOADER_DEBUG=error,warn timeout 120 "$bin" --device vulkan --mode extract --arch vit_tiny --patch 16 --batch 1 --steps 1 --warmup 0 2>&1 | tail -4 || exit 1
for c in "--mode extract --arch vit_small --patch 16 --batch 64" \
         "--mode step --arch vit_tiny --patch 16 --batch 8 --out_dim 65536" \
         "--mode step --arch vit_small --patch 16 --batch 32 --out_dim 65536"; do
  # shellcheck disable=SC2086
  echo "$c => $(timeout 120 "$bin" --device vulkan $c --steps 5 --warmup 2 2>&1 | tail -1)"
done
