#!/usr/bin/env bash
# Builds dino with `--features cuda` without internet access beyond the package registries
# (crates.io, PyPI): burn's CUDA backend needs CubeCL's LLVM 23, whose build script would
# download a bundle from GitHub; it skips the download when its install marker exists, so this
# script puts a static LLVM 23 with the NVPTX target from PyPI (the mlc-llvm-static wheels)
# where that script looks, then builds into target-cuda/ (the CPU build in target/ is left
# alone). No CUDA toolkit is needed to build; at run time the GPU machine needs the NVIDIA
# driver and CUDA's libdevice or libnvrtc (BENCHMARKS.md, GPUs).
#   scripts/build_cuda.sh            # target-cuda/release/dino and examples/bench
#   scripts/build_cuda.sh --pack DIR # also strips both into one archive, DIR/dino-gpu.tar.xz
# A cold build takes 20 to 27 minutes on 2 cores (BENCHMARKS.md); not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# The bundler version Cargo.lock pins, and the directory its build script checks.
bundler=$(awk '/^name = "tracel-llvm-bundler"/{getline; gsub(/[" ]/, "", $0); sub("version=", "", $0); print; exit}' Cargo.lock)
[ -n "$bundler" ] || { echo "scripts/build_cuda.sh: Cargo.lock names no tracel-llvm-bundler" >&2; exit 1; }
llvm_home="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-$bundler"
wheels="${DINO_LLVM_CACHE:-$HOME/.cache/dino/llvm-23}"
llvm_version=23.1.1.post0

if [ ! -e "$llvm_home/.tracel-llvm-installed" ]; then
  echo "LLVM 23 from PyPI into $wheels" >&2
  mkdir -p "$wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
    "mlc-llvm-static==$llvm_version" "mlc-llvm-static-extra-targets==$llvm_version"
  for w in "$wheels"/mlc_llvm_static-"$llvm_version"-*.whl "$wheels"/mlc_llvm_static_extra_targets-"$llvm_version"-*.whl; do
    python3 -m zipfile -e "$w" "$wheels/prefix"
  done
  prefix="$wheels/prefix/mlc_llvm_static/static"
  chmod +x "$prefix/bin/llvm-config" "$prefix/bin/llvm-config.py"
  "$prefix/bin/llvm-config" --targets-built | grep -qw NVPTX || { echo "scripts/build_cuda.sh: $prefix has no NVPTX target" >&2; exit 1; }
  mkdir -p "$(dirname "$llvm_home")"
  ln -sfn "$prefix" "$llvm_home"
  touch "$llvm_home/.tracel-llvm-installed"
fi

# cudarc picks its CUDA API version from nvcc, which this machine need not have.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-12080}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
start=$(date +%s)
cargo build --release --locked --features cuda --bin dino --example bench
echo "built in $(( $(date +%s) - start )) s: $CARGO_TARGET_DIR/release/dino ($(du -h "$CARGO_TARGET_DIR/release/dino" | cut -f1))" >&2

if [ "${1:-}" = "--pack" ]; then
  # Both stripped binaries (~170 MB each, most of it the same static LLVM) in one archive for a
  # GPU machine: with a dictionary larger than one binary, xz stores the second copy of LLVM as
  # references to the first, 45 MB in all against 70 MB for two separate archives (5 minutes
  # on one core), so both travel in one transfer capped near 64 MiB. Unpack with `tar -xJf`.
  out="${2:?scripts/build_cuda.sh --pack DIR}"
  mkdir -p "$out"
  stripped=$(mktemp -d)
  trap 'rm -rf "$stripped"' EXIT
  strip -o "$stripped/dino" "$CARGO_TARGET_DIR/release/dino"
  strip -o "$stripped/bench" "$CARGO_TARGET_DIR/release/examples/bench"
  tar -C "$stripped" -cf - dino bench | xz -9e -T1 --lzma2=preset=9e,dict=384MiB > "$out/dino-gpu.tar.xz"
  echo "packed: $out/dino-gpu.tar.xz ($(du -h "$out/dino-gpu.tar.xz" | cut -f1))" >&2
fi
