#!/usr/bin/env bash
# The check to run on a lent GPU machine (issue 15), which has no Rust: one GPU build of
# `dino` and `examples/bench` (for cuda, scripts/build_cuda.sh --pack DIR writes DIR/dino.xz
# and DIR/bench.xz, ~35 MB each, to carry over in two transfers and `xz -d` there; for vulkan,
# `CARGO_TARGET_DIR=target-vulkan cargo build --release --features vulkan --bin dino --example bench`),
# with a labelled IDX dataset (Fashion-MNIST's four .gz files, 31 MB). It prints
#   1. the GPU, driver and the CUDA libraries found (cubecl needs libcuda, and libnvrtc or
#      CUDA's libdevice);
#   2. the harness: ViT-S/16 extraction at batch 256, ViT-S/16 multi-crop steps at batch 32
#      and 64 (out_dim 65536), each at f32 and asked at bf16;
#   3. 8 training steps of ViT-micro and ResNet-micro with --device cpu and with the GPU, the
#      losses side by side (they should agree to float rounding);
#   4. the 20-NN of the ViT-micro teacher computed with --device cpu and with the GPU.
#   bench/gpu_check.sh cuda|vulkan BIN_DIR IDX_DIR
# Every case has its own timeout, so a hang costs one case, not the machine's minutes.
set -u
device="${1:?usage: bench/gpu_check.sh cuda|vulkan BIN_DIR IDX_DIR}"
bin="${2:?usage: bench/gpu_check.sh cuda|vulkan BIN_DIR IDX_DIR}"
data="${3:?usage: bench/gpu_check.sh cuda|vulkan BIN_DIR IDX_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
# The lent NVIDIA machines expose Vulkan only through the headless EGL library (BENCHMARKS.md).
[ "$device" = vulkan ] && export VK_ICD_FILENAMES="${VK_ICD_FILENAMES:-$here/nvidia_egl_icd.json}"
out="$(mktemp -d)"

echo "== 1. machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -2
ldconfig -p 2>/dev/null | grep -oE 'lib(cuda|nvrtc|nvJitLink)\.so[.0-9]*' | sort -u | tr '\n' ' '; echo
find / -name 'libdevice.10.bc' -not -path '/proc/*' 2>/dev/null | head -2

echo "== 2. harness on $device (img/s; the first case compiles the kernels)"
timeout 150 "$bin/bench" --device "$device" --mode extract --arch vit_tiny --patch 16 --batch 1 --steps 1 --warmup 0 2>&1 | tail -2
for precision in f32 bf16; do
  for case in "--mode extract --arch vit_small --patch 16 --batch 256" \
              "--mode step --arch vit_small --patch 16 --batch 32 --out_dim 65536" \
              "--mode step --arch vit_small --patch 16 --batch 64 --out_dim 65536"; do
    # shellcheck disable=SC2086
    echo "$precision $case => $(timeout 150 "$bin/bench" --device "$device" --precision "$precision" $case --steps 5 --warmup 2 2>&1 | tail -1)"
  done
done

echo "== 3. 8 training steps, cpu | $device"
for arch in vit_micro resnet_micro; do
  for dev in cpu "$device"; do
    timeout 200 "$bin/dino" train --device "$dev" --data "$data" --subset 256 --arch "$arch" --preset small --local_crops_number 2 \
      --out_dim 256 --batch_size_per_gpu 32 --epochs 1 --warmup_epochs 1 --lr 0.004 --output_dir "$out/${arch}_$dev" > "$out/${arch}_$dev.log" 2>&1
    echo "$arch $dev: exit $? $(tail -1 "$out/${arch}_$dev.log" | cut -c1-160)"
  done
  paste -d' ' <(grep -o '"loss":[^,]*' "$out/${arch}_cpu/metrics.jsonl") <(grep -o '"loss":[^,]*' "$out/${arch}_$device/metrics.jsonl")
done

echo "== 4. 20-NN of the ViT-micro teacher, cpu | $device"
for dev in cpu "$device"; do
  echo "$dev: $(timeout 150 "$bin/dino" knn --device "$dev" --weights "$out/vit_micro_cpu/checkpoint.safetensors" --data_path "$data" \
    --center_crop 1 --nb_knn 20 --subset_train 2000 --subset_test 500 2>&1 | tail -1)"
done
