#!/usr/bin/env bash
# The check to run on a lent GPU machine (issue 15), which has no Rust: a GPU build of `dino`
# and `examples/bench`, and a labelled IDX dataset (Fashion-MNIST's four .gz files; the first
# 4000 training and 1000 test images are enough). For cuda, bench/gpu_prepare.sh makes both in
# .gpu/ (carry `.gpu` and run the line its header gives); for vulkan,
# `CARGO_TARGET_DIR=target-vulkan cargo build --release --features vulkan --bin dino --example bench`.
# Every case has its own timeout, and no case starts with less than 15 of CHECK_SECONDS
# (default 480) left, so a hang or a slow start costs a case, not the machine's minutes.
# The most wanted numbers come first:
#   1. the GPU, driver and the CUDA libraries found (cubecl's LLVM path needs libcuda and CUDA's
#      libdevice, found through CUDA_PATH, which this script sets from what it finds);
#   2. the harness: ViT-S/16 extraction at batch 256, ViT-S/16 multi-crop steps at batch 32
#      and 64 (out_dim 65536), at bf16 and f32 (Vulkan refuses bf16), with the peak GPU
#      memory nvidia-smi saw during each case;
#   3. 8 training steps of ViT-micro (f32 on the CPU, f32 and bf16 on the GPU), the losses side
#      by side (f32 should agree to float rounding, bf16 within 0.5%: the first loss within 1e-3);
#   4. the reference's step and extraction in PyTorch on the same GPU (bench/dino_step.py), where
#      the machine's python3 has a CUDA PyTorch;
#   5. ResNet-micro's 8 steps (f32 on both) and the 20-NN of the ViT-micro teacher computed with
#      --device cpu and with the GPU.
#   bench/gpu_check.sh cuda|vulkan BIN_DIR IDX_DIR
set -u
device="${1:?usage: bench/gpu_check.sh cuda|vulkan BIN_DIR IDX_DIR}"
bin="${2:?usage: bench/gpu_check.sh cuda|vulkan BIN_DIR IDX_DIR}"
data="${3:?usage: bench/gpu_check.sh cuda|vulkan BIN_DIR IDX_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
# The lent NVIDIA machines expose Vulkan only through the headless EGL library (BENCHMARKS.md).
[ "$device" = vulkan ] && export VK_ICD_FILENAMES="${VK_ICD_FILENAMES:-$here/nvidia_egl_icd.json}"
out="$(mktemp -d)"
deadline=$(( $(date +%s) + ${CHECK_SECONDS:-480} ))

# Runs "$@" under a timeout of at most $1 seconds and never past the deadline; prints
# "skipped" instead when less than 15 seconds are left.
bounded() {
  local limit=$1 left=$(( deadline - $(date +%s) ))
  shift
  if [ "$left" -lt 15 ]; then echo "skipped: the check's time is spent"; return 124; fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout "$limit" "$@"
}

# Runs "$@", then prints its exit status and the largest GPU memory use (the whole device's,
# CUDA context included) nvidia-smi reported meanwhile, in MiB.
peak_gpu_mib() {
  : > "$out/memory.log"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 -f "$out/memory.log" 2>/dev/null &
  local sampler=$! status
  "$@"
  status=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  echo "exit $status, peak GPU memory $(sort -n "$out/memory.log" 2>/dev/null | tail -1) MiB"
}

echo "== 1. machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -2
ldconfig -p 2>/dev/null | grep -oE 'lib(cuda|nvrtc|nvJitLink)\.so[.0-9]*' | sort -u | tr '\n' ' '; echo
# cubecl's LLVM path reads $CUDA_PATH/nvvm/libdevice/libdevice.10.bc (else /usr/local/cuda and
# a few other roots). Where no toolkit has that layout, a copy elsewhere (Triton's, Debian's)
# is linked into one.
if [ -z "${CUDA_PATH:-}" ] && [ ! -d /usr/local/cuda/nvvm/libdevice ]; then
  libdevice=$(timeout 60 find /usr/local /opt /usr/lib -path '*/nvvm/libdevice/libdevice.10.bc' 2>/dev/null | head -1)
  if [ -n "$libdevice" ]; then
    export CUDA_PATH="${libdevice%/nvvm/libdevice/libdevice.10.bc}"
  else
    libdevice=$(timeout 60 find /usr/local /opt /usr/lib -name libdevice.10.bc 2>/dev/null | head -1)
    if [ -n "$libdevice" ]; then
      mkdir -p "$out/cuda/nvvm/libdevice" && ln -s "$libdevice" "$out/cuda/nvvm/libdevice/"
      export CUDA_PATH="$out/cuda"
    fi
  fi
fi
echo "CUDA_PATH=${CUDA_PATH:-unset}"

echo "== 2. harness on $device (img/s; the first case compiles the kernels)"
precisions="bf16 f32"
[ "$device" = vulkan ] && precisions=f32
for precision in $precisions; do
  for case in "--mode extract --arch vit_small --patch 16 --batch 256" \
              "--mode step --arch vit_small --patch 16 --batch 32 --out_dim 65536" \
              "--mode step --arch vit_small --patch 16 --batch 64 --out_dim 65536"; do
    # shellcheck disable=SC2086
    echo "$precision $case => $(peak_gpu_mib bounded 120 "$bin/bench" --device "$device" --precision "$precision" $case --steps 5 --warmup 2 2>&1 | tail -2 | paste -sd' ' -)"
  done
done

# 8 training steps of $1 on each "device:precision" that follows, then their losses side by side.
train_runs() {
  local arch=$1 run files=()
  shift
  for run in "$@"; do
    local dev="${run%:*}" precision="${run#*:}" name="${arch}_${run/:/_}"
    bounded 120 "$bin/dino" train --device "$dev" --precision "$precision" --data "$data" --subset 256 --arch "$arch" --preset small \
      --local_crops_number 2 --out_dim 256 --batch_size_per_gpu 32 --epochs 1 --warmup_epochs 1 --lr 0.004 \
      --output_dir "$out/$name" > "$out/$name.log" 2>&1
    echo "$arch $dev $precision: exit $? $(tail -1 "$out/$name.log" | cut -c1-160)"
    grep -o '"loss":[^,]*' "$out/$name/metrics.jsonl" > "$out/$name.losses" 2>/dev/null
    files+=("$out/$name.losses")
  done
  paste -d' ' "${files[@]}"
}

echo "== 3. 8 training steps, losses: cpu f32 | $device f32 [| $device bf16]"
if [ "$device" = vulkan ]; then train_runs vit_micro cpu:f32 vulkan:f32; else train_runs vit_micro cpu:f32 cuda:f32 cuda:bf16; fi

echo "== 4. the reference in PyTorch on the same GPU"
if [ "$device" = cuda ] && timeout 60 python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  for case in "bf16 --mode extract --arch vit_small --patch 16 --batch 256" \
              "bf16 --mode step --arch vit_small --patch 16 --batch 32 --out_dim 65536" \
              "bf16 --mode step --arch vit_small --patch 16 --batch 64 --out_dim 65536" \
              "f32 --mode step --arch vit_small --patch 16 --batch 32 --out_dim 65536" \
              "f32 --mode extract --arch vit_small --patch 16 --batch 256"; do
    # shellcheck disable=SC2086
    echo "pytorch $case => $(peak_gpu_mib bounded 90 python3 "$here/dino_step.py" --device cuda --precision $case --steps 5 --warmup 2 2>&1 | tail -2 | paste -sd' ' -)"
  done
else
  echo "no CUDA PyTorch here"
fi

echo "== 5. ResNet-micro steps, and the 20-NN of the ViT-micro teacher, cpu | $device"
train_runs resnet_micro cpu:f32 "$device:f32"
for dev in cpu "$device"; do
  echo "$dev: $(bounded 100 "$bin/dino" knn --device "$dev" --weights "$out/vit_micro_cpu_f32/checkpoint.safetensors" --data_path "$data" \
    --center_crop 1 --nb_knn 20 --subset_train 2000 --subset_test 500 2>&1 | tail -1)"
done
