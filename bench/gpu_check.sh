#!/usr/bin/env bash
# The check to run on a lent GPU machine (issue 15), which has no Rust: one GPU build of
# `dino` and `examples/bench` (for cuda, scripts/build_cuda.sh --pack DIR writes DIR/dino.xz
# and DIR/bench.xz, ~35 MB each, to carry over in two transfers and `xz -d` there; for vulkan,
# `CARGO_TARGET_DIR=target-vulkan cargo build --release --features vulkan --bin dino --example bench`),
# with a labelled IDX dataset (Fashion-MNIST's four .gz files, 31 MB). It prints
#   1. the GPU, driver and the CUDA libraries found (cubecl needs libcuda, and libnvrtc or
#      CUDA's libdevice);
#   2. the harness: ViT-S/16 extraction at batch 256, ViT-S/16 multi-crop steps at batch 32
#      and 64 (out_dim 65536), each at f32 and at bf16 (Vulkan refuses bf16), with the peak
#      GPU memory nvidia-smi saw during each case;
#   3. 8 training steps of ViT-micro (f32 on the CPU, f32 and bf16 on the GPU) and of
#      ResNet-micro (f32 on both), the losses side by side (f32 should agree to float rounding,
#      bf16 within 0.5%: the first loss within 1e-3);
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

# The largest GPU memory use nvidia-smi reports while "$@" runs, in MiB.
peak_gpu_mib() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 -f "$out/memory.log" 2>/dev/null &
  local sampler=$!
  "$@"
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  echo "peak GPU memory $(sort -n "$out/memory.log" | tail -1) MiB"
}

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
    echo "$precision $case => $(peak_gpu_mib timeout 150 "$bin/bench" --device "$device" --precision "$precision" $case --steps 5 --warmup 2 2>&1 | tail -2 | paste -sd' ' -)"
  done
done

echo "== 3. 8 training steps, losses: cpu f32 | $device f32 [| $device bf16]"
for arch in vit_micro resnet_micro; do
  runs="cpu:f32 $device:f32"
  [ "$arch" = vit_micro ] && runs="$runs $device:bf16"
  for run in $runs; do
    dev="${run%:*}" precision="${run#*:}" name="${arch}_${run/:/_}"
    timeout 200 "$bin/dino" train --device "$dev" --precision "$precision" --data "$data" --subset 256 --arch "$arch" --preset small \
      --local_crops_number 2 --out_dim 256 --batch_size_per_gpu 32 --epochs 1 --warmup_epochs 1 --lr 0.004 \
      --output_dir "$out/$name" > "$out/$name.log" 2>&1
    echo "$arch $dev $precision: exit $? $(tail -1 "$out/$name.log" | cut -c1-160)"
    grep -o '"loss":[^,]*' "$out/$name/metrics.jsonl" > "$out/$name.losses" 2>/dev/null
  done
  paste -d' ' $(for run in $runs; do echo "$out/${arch}_${run/:/_}.losses"; done)
done

echo "== 4. 20-NN of the ViT-micro teacher, cpu | $device"
for dev in cpu "$device"; do
  echo "$dev: $(timeout 150 "$bin/dino" knn --device "$dev" --weights "$out/vit_micro_cpu_f32/checkpoint.safetensors" --data_path "$data" \
    --center_crop 1 --nb_knn 20 --subset_train 2000 --subset_test 500 2>&1 | tail -1)"
done
